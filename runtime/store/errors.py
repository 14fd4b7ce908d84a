"""Errors the job store raises. Each message is one line a user (or the scheduler) can act on."""

from __future__ import annotations

from llmplan.runtime.store.status import JobStatus


class StoreError(Exception):
    """Base of every job-store error."""


# ---- the database itself ----------------------------------------------------------------------
class DatabaseURLError(StoreError):
    """The database URL is malformed or names a backend llmplan does not support (bad input)."""


class DatabaseUnavailableError(StoreError):
    """The database could not be opened or reached (a runtime failure)."""


class SchemaError(StoreError):
    """The database's schema is not one this llmplan can use."""


class SchemaTooNewError(SchemaError):
    """The database was written by a newer llmplan; this one must not touch it."""


# ---- jobs -------------------------------------------------------------------------------------
class UnknownJobError(StoreError, LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class TransitionRefusedError(StoreError):
    """A status change or update was refused; the job was left exactly as it was."""


class IllegalTransitionError(TransitionRefusedError):
    def __init__(self, job_id: int, from_status: JobStatus, to_status: JobStatus) -> None:
        reason = "it is terminal" if from_status.is_terminal() else "that move is not allowed"
        super().__init__(f"job {job_id}: refused {from_status.value} -> {to_status.value}: {reason}")
        self.job_id = job_id
        self.from_status = from_status
        self.to_status = to_status


class StaleStatusError(TransitionRefusedError):
    """The caller expected the job in one status but another process had already moved it."""

    def __init__(self, job_id: int, expected: JobStatus, actual: JobStatus, to_status: JobStatus) -> None:
        super().__init__(
            f"job {job_id}: refused {expected.value} -> {to_status.value}: the job is {actual.value} now"
        )
        self.job_id = job_id
        self.expected = expected
        self.actual = actual
        self.to_status = to_status


class TerminalJobError(TransitionRefusedError):
    def __init__(self, job_id: int, status: JobStatus, what: str) -> None:
        super().__init__(f"job {job_id} is {status.value} (terminal): refused to {what}")
        self.job_id = job_id
        self.status = status


class InvalidJobDataError(StoreError, ValueError):
    """Arguments that can never be stored (a failed job without an error class, a negative step...)."""
