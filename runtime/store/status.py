"""Job lifecycle: the statuses a job can be in and the only moves allowed between them.

A job record is one attempt. A job that failed or was lost with its Ray cluster never goes back to
``queued``: the scheduler submits a new job with ``attempt + 1`` and ``retry_of`` pointing here, so
history is never rewritten. The only backward move is ``scheduled -> queued`` (placement released
before anything ran).

    queued ──> scheduled ──> running ──> succeeded
      │  ^        │  │          │
      │  └────────┘  │          ├──> failed
      │              │          └──> cancelling ──> cancelled | failed | succeeded
      └──> cancelled | failed   (scheduled may also go to cancelling, cancelled or failed)
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Where a job is in its life. The value is what the database stores."""

    QUEUED = "queued"  # accepted and recorded; waiting for the scheduler to place it
    SCHEDULED = "scheduled"  # GPUs reserved (Ray placement group), work submitted, not yet running
    RUNNING = "running"  # the Ray task/actor reported that the job started
    CANCELLING = "cancelling"  # cancel requested; waiting for Ray to stop the work
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        """A terminal job is final: no transition, update or metric may change it."""
        return self in TERMINAL_STATUSES

    def __str__(self) -> str:
        return self.value


class JobKind(str, Enum):
    FINETUNE = "finetune"
    INFER = "infer"
    SERVE = "serve"  # `llmplan serve`: an HTTP server of a model, running until cancelled

    def __str__(self) -> str:
        return self.value


class ErrorClass(str, Enum):
    """Why a job did not succeed; decides whether a retry can help."""

    OOM = "oom"  # out of GPU/host memory: retry only with a different plan
    USER_ERROR = "user_error"  # bad request, data or code: retrying the same request cannot help
    INFRASTRUCTURE = "infrastructure"  # node lost, Ray head restarted, disk full: a retry may help
    CANCELLED = "cancelled"  # someone cancelled it

    def __str__(self) -> str:
        return self.value


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)

INITIAL_STATUS = JobStatus.QUEUED

# The complete table: a move not listed here is refused.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.SCHEDULED, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.SCHEDULED: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.QUEUED,
            JobStatus.CANCELLING,
            JobStatus.CANCELLED,
            JobStatus.FAILED,
        }
    ),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING}),
    # A job may finish or fail before the cancel reaches it; the record says what really happened.
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

# Failed jobs must say why; cancelled jobs are always ErrorClass.CANCELLED; others carry no error.
FAILURE_ERROR_CLASSES: frozenset[ErrorClass] = frozenset(
    {ErrorClass.OOM, ErrorClass.USER_ERROR, ErrorClass.INFRASTRUCTURE}
)


def is_allowed(from_status: JobStatus, to_status: JobStatus) -> bool:
    return to_status in ALLOWED_TRANSITIONS[from_status]
