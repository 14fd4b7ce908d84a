"""Helpers shared by the store tests: job specs and walking a job to a given status."""

from __future__ import annotations

from collections import deque
from typing import Any

from sqlalchemy.engine import Engine

from llmplan.runtime.store.repository import JobFailure, JobSpec, PlanRecord, transition
from llmplan.runtime.store.status import ALLOWED_TRANSITIONS, INITIAL_STATUS, ErrorClass, JobKind, JobStatus

GiB = 2**30


def job_spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "sft-llama",
        "kind": JobKind.FINETUNE,
        "model": "meta-llama/Llama-3.1-8B",
        "submitter": "alice",
        "request": {"dataset": "alpaca", "epochs": 1, "lora": {"r": 16}},
        "plan": PlanRecord(
            plan={"strategy": "lora", "estimate": {"weights": 16 * GiB, "activations": 3 * GiB}},
            memory_per_gpu_bytes=20 * GiB,
            tokens_per_s=3100.0,
        ),
    }
    values.update(overrides)
    return JobSpec(**values)


def failure_for(status: JobStatus) -> JobFailure | None:
    """What a move into `status` must carry."""
    if status is JobStatus.FAILED:
        return JobFailure(ErrorClass.INFRASTRUCTURE, "node lost")
    return None


def path_to(target: JobStatus) -> list[JobStatus]:
    """The shortest list of allowed moves from the initial status to `target` (excluding the start)."""
    previous: dict[JobStatus, JobStatus | None] = {INITIAL_STATUS: None}
    queue = deque([INITIAL_STATUS])
    while queue:
        status = queue.popleft()
        for following in sorted(ALLOWED_TRANSITIONS[status], key=lambda s: s.value):
            if following not in previous:
                previous[following] = status
                queue.append(following)
    if target not in previous:
        raise ValueError(f"{target} cannot be reached from {INITIAL_STATUS}")
    path: list[JobStatus] = []
    step: JobStatus | None = target
    while step is not None and step is not INITIAL_STATUS:
        path.append(step)
        step = previous[step]
    return list(reversed(path))


def bring_to(engine: Engine, job_id: int, target: JobStatus) -> None:
    for status in path_to(target):
        transition(engine, job_id, status, failure=failure_for(status), message="setup")
