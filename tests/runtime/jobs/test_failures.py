from __future__ import annotations

from llmplan.runtime.jobs.failures import classify, describe
from llmplan.runtime.store.status import ErrorClass


class RayTaskError(Exception):
    """Shaped like Ray's wrapper: the original exception in `.cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"task failed: {cause}")
        self.cause = cause


class ActorDiedError(Exception):
    pass


class OutOfMemoryError(RuntimeError):
    pass


def test_out_of_memory_is_oom_through_the_wrapper() -> None:
    assert classify(RayTaskError(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))) is ErrorClass.OOM


def test_bad_input_is_a_user_error() -> None:
    assert classify(RayTaskError(FileNotFoundError("no config.json"))) is ErrorClass.USER_ERROR
    assert classify(ValueError("temperature must be positive")) is ErrorClass.USER_ERROR


def test_a_dead_actor_or_an_unknown_crash_is_infrastructure() -> None:
    assert classify(ActorDiedError("the actor died")) is ErrorClass.INFRASTRUCTURE
    assert classify(RuntimeError("NCCL timeout")) is ErrorClass.INFRASTRUCTURE


def test_describe_names_the_original_exception_in_one_line() -> None:
    assert describe(RayTaskError(FileNotFoundError("no weights in /x\nmore"))) == "FileNotFoundError: no weights in /x"
