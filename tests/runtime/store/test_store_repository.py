"""Creating, reading, filtering and retrying jobs; metrics; time zones. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmplan.runtime.store.errors import InvalidJobDataError
from llmplan.runtime.store.models import Job
from llmplan.runtime.store.reading import count_jobs
from llmplan.runtime.store.repository import (
    JobFailure,
    JobFilter,
    MetricPoint,
    create_job,
    get_job,
    get_job_details,
    list_jobs,
    record_metrics,
    retry_job,
    transition,
)
from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

from .factory import GiB, bring_to, job_spec


def set_created_at(engine: Engine, job_id: int, moment: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(sa.update(Job).where(Job.id == job_id).values(created_at=moment))


def test_create_records_everything_and_a_submission_event(engine: Engine) -> None:
    job = create_job(engine, job_spec(priority=5))
    details = get_job_details(engine, job.id)
    stored = details.job
    assert stored.id == job.id and stored.status is JobStatus.QUEUED
    assert (stored.name, stored.kind, stored.model, stored.submitter, stored.priority) == (
        "sft-llama", JobKind.FINETUNE, "meta-llama/Llama-3.1-8B", "alice", 5)
    assert stored.request == {"dataset": "alpaca", "epochs": 1, "lora": {"r": 16}}
    assert stored.plan == {"strategy": "lora", "estimate": {"weights": 16 * GiB, "activations": 3 * GiB}}
    assert (stored.planned_memory_per_gpu_bytes, stored.planned_tokens_per_s) == (20 * GiB, 3100.0)
    assert (stored.attempt, stored.retry_of) == (1, None)
    assert stored.created_at.tzinfo is timezone.utc
    assert abs(stored.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert [(e.from_status, e.to_status, e.message) for e in details.events] == [
        (None, JobStatus.QUEUED, "submitted by alice")]


def test_times_come_back_in_utc_whatever_zone_went_in(engine: Engine) -> None:
    job_id = create_job(engine, job_spec()).id
    tokyo = timezone(timedelta(hours=9))
    set_created_at(engine, job_id, datetime(2025, 3, 1, 9, 0, tzinfo=tokyo))
    created = get_job(engine, job_id).created_at
    assert created == datetime(2025, 3, 1, 0, 0, tzinfo=timezone.utc)
    assert created.tzinfo is timezone.utc


def test_naive_times_are_refused(engine: Engine) -> None:
    job_id = create_job(engine, job_spec()).id
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        set_created_at(engine, job_id, datetime(2025, 3, 1, 9, 0))


def test_list_is_newest_first_and_limited(engine: Engine) -> None:
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ids = [create_job(engine, job_spec(name=f"job-{i}")).id for i in range(5)]
    for offset, job_id in enumerate(ids):
        set_created_at(engine, job_id, start + timedelta(hours=offset))
    # Two jobs created at the same instant: the higher id is newer.
    set_created_at(engine, ids[1], start + timedelta(hours=4))
    listed = [job.id for job in list_jobs(engine, JobFilter(limit=10))]
    assert listed == [ids[4], ids[1], ids[3], ids[2], ids[0]]
    assert [job.id for job in list_jobs(engine, JobFilter(limit=2))] == [ids[4], ids[1]]
    assert count_jobs(engine, JobFilter(limit=2)) == 5
    assert count_jobs(engine, JobFilter(limit=2), at_most=3) == 3


def test_filters_combine(engine: Engine) -> None:
    old = datetime(2024, 6, 1, tzinfo=timezone.utc)
    llama_ft = create_job(engine, job_spec()).id
    qwen_infer = create_job(engine, job_spec(kind=JobKind.INFER, model="Qwen/Qwen2-7B-Instruct")).id
    llama_old = create_job(engine, job_spec(model="meta-llama/Llama-2-7b-hf")).id
    set_created_at(engine, llama_old, old)
    bring_to(engine, llama_ft, JobStatus.RUNNING)
    transition(engine, qwen_infer, JobStatus.FAILED, failure=JobFailure(ErrorClass.OOM, "CUDA out of memory"))

    def ids(**criteria: object) -> set[int]:
        return {job.id for job in list_jobs(engine, JobFilter(**criteria))}  # type: ignore[arg-type]

    assert ids(statuses=(JobStatus.RUNNING,)) == {llama_ft}
    assert ids(statuses=(JobStatus.RUNNING, JobStatus.FAILED)) == {llama_ft, qwen_infer}
    assert ids(kind=JobKind.INFER) == {qwen_infer}
    assert ids(model="LLAMA") == {llama_ft, llama_old}
    assert ids(model="llama-2") == {llama_old}
    assert ids(model="%") == set()  # LIKE wildcards are matched literally
    assert ids(since=old + timedelta(days=1)) == {llama_ft, qwen_infer}
    assert ids(model="llama", since=old + timedelta(days=1), kind=JobKind.FINETUNE) == {llama_ft}
    assert count_jobs(engine, JobFilter(model="llama")) == 2
    with pytest.raises(InvalidJobDataError):
        list_jobs(engine, JobFilter(limit=0))


def test_metrics_come_back_by_step(engine: Engine) -> None:
    job_id = create_job(engine, job_spec()).id
    bring_to(engine, job_id, JobStatus.RUNNING)
    assert record_metrics(engine, job_id, [MetricPoint(step=20, loss=1.5), MetricPoint(step=10, loss=2.0)]) == 2
    record_metrics(engine, job_id, [MetricPoint(step=30, loss=1.2, learning_rate=1e-4, tokens_per_s=2900.0,
                                                memory_bytes=70 * GiB)])
    metrics = get_job_details(engine, job_id).metrics
    assert [(m.step, m.loss) for m in metrics] == [(10, 2.0), (20, 1.5), (30, 1.2)]
    assert (metrics[-1].learning_rate, metrics[-1].tokens_per_s, metrics[-1].memory_bytes) == (1e-4, 2900.0, 70 * GiB)
    assert all(m.recorded_at.tzinfo is timezone.utc for m in metrics)
    with pytest.raises(InvalidJobDataError, match="step"):
        record_metrics(engine, job_id, [MetricPoint(step=-1)])


def test_retry_is_a_new_job_linked_to_the_old_one(engine: Engine) -> None:
    first = create_job(engine, job_spec()).id
    with pytest.raises(InvalidJobDataError, match="only failed or cancelled"):
        retry_job(engine, first)
    transition(engine, first, JobStatus.FAILED, failure=JobFailure(ErrorClass.INFRASTRUCTURE, "head restarted"))
    second = retry_job(engine, first, submitter="scheduler")
    assert (second.attempt, second.retry_of, second.status) == (2, first, JobStatus.QUEUED)
    assert (second.submitter, second.request, second.plan) == ("scheduler", get_job(engine, first).request,
                                                              get_job(engine, first).plan)
    with pytest.raises(InvalidJobDataError, match=f"already retried as job {second.id}"):
        retry_job(engine, first)
    transition(engine, second.id, JobStatus.CANCELLED)
    third = retry_job(engine, second.id)
    assert (third.attempt, third.retry_of) == (3, second.id)
    assert get_job(engine, first).status is JobStatus.FAILED  # the old attempt is history, unchanged
