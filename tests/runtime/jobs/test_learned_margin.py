"""Out-of-memory failures in the job store teach later plans of that model on that card more headroom."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmplan.runtime.jobs.retries import out_of_memory_count
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobFailure, JobKind, JobSpec, JobStatus, create_job, transition
from llmplan.runtime.store.status import ErrorClass
from llmplan.runtime.jobs.submission import learned_margin_in

A100 = {"gpu": "A100 80GB", "count": 1, "memory_bytes": 80 * 2**30, "source": "catalog"}


def failed_job(engine, model: str, card: dict | None, error: ErrorClass) -> None:
    job = create_job(engine, JobSpec(name="t", kind=JobKind.FINETUNE, model=model, submitter="t",
                                     request={"hardware": card}))
    transition(engine, job.id, JobStatus.SCHEDULED)
    transition(engine, job.id, JobStatus.RUNNING)
    transition(engine, job.id, JobStatus.FAILED, failure=JobFailure(error, "x"))


def test_each_oom_of_a_model_on_a_card_adds_headroom_there_only(tmp_path: Path) -> None:
    engine = open_store(str(tmp_path / "jobs.db"))
    failed_job(engine, "Llama-2-7B", A100, ErrorClass.OOM)
    failed_job(engine, "Llama-2-7B", A100, ErrorClass.OOM)
    failed_job(engine, "Llama-2-7B", A100, ErrorClass.USER_ERROR)  # not a memory lesson
    failed_job(engine, "Llama-2-7B", None, ErrorClass.OOM)  # on the CPU
    failed_job(engine, "Llama-2-13B", A100, ErrorClass.OOM)
    assert out_of_memory_count(engine, "Llama-2-7B", "A100 80GB") == 2
    margin = learned_margin_in(engine)
    assert margin("Llama-2-7B", "A100 80GB") == pytest.approx(0.20)
    assert margin("Llama-2-7B", "cpu") == pytest.approx(0.15)
    assert margin("Llama-2-7B", "H100 SXM") == pytest.approx(0.10)
    engine.dispose()
