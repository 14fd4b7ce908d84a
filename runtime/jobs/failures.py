"""Why a job failed, as the job store's `ErrorClass`: what decides whether a retry can help.

Ray wraps an exception raised inside an actor in a `RayTaskError` whose `.cause` is the original; a
dead actor or worker is an infrastructure failure, whatever the work was.
"""

from __future__ import annotations

from llmplan.runtime.store.status import ErrorClass

OOM_MARKERS = ("out of memory", "CUDA error: out of memory", "OutOfMemoryError")
# Exceptions that describe a bad request, model or input: retrying the same job cannot help.
USER_ERROR_NAMES = frozenset({
    "InferenceError", "DialogError", "PromptFileError", "ModelStoreError", "ModelConfigError", "UnknownModelError",
    "RequestError", "PlanError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "ValueError",
})
INFRASTRUCTURE_NAMES = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "RaySystemError", "ObjectLostError", "OwnerDiedError", "GetTimeoutError",
})


def root_cause(error: BaseException) -> BaseException:
    """The exception the work raised, beneath Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def classify(error: BaseException) -> ErrorClass:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & INFRASTRUCTURE_NAMES:
        return ErrorClass.INFRASTRUCTURE
    cause = root_cause(error)
    cause_names = {cls.__name__ for cls in type(cause).__mro__}
    if isinstance(cause, MemoryError) or "OutOfMemoryError" in cause_names or any(m in str(cause) for m in OOM_MARKERS):
        return ErrorClass.OOM
    if cause_names & USER_ERROR_NAMES:
        return ErrorClass.USER_ERROR
    return ErrorClass.INFRASTRUCTURE


def describe(error: BaseException) -> str:
    """One line: the original exception's type and message."""
    cause = root_cause(error)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__


def fail_job(engine, job_id: int, error: BaseException) -> str:
    """End a job as failed with the error's class (unless it already ended); return the one-line message."""
    from llmplan.runtime.store.repository import JobFailure, JobStatus, get_job, transition

    message = describe(error)
    if not get_job(engine, job_id).status.is_terminal():
        transition(engine, job_id, JobStatus.FAILED, message=message, failure=JobFailure(classify(error), message))
    return message


def mark_scheduled(engine, job_id: int, message: str) -> None:
    """queued -> scheduled when a recipe runs a job itself; a job the scheduler placed is scheduled already."""
    from llmplan.runtime.store.repository import JobStatus, get_job, transition

    if get_job(engine, job_id).status is JobStatus.QUEUED:
        transition(engine, job_id, JobStatus.SCHEDULED, message=message, expected_from=JobStatus.QUEUED)
