"""Create, move and query jobs. Every write is one short transaction on the engine passed in.

The scheduler and the runtime call:

    engine = open_store(database_url_from_environment())
    job = create_job(engine, JobSpec(name=..., kind=JobKind.FINETUNE, model=..., submitter=..., request=...,
                                     plan=PlanRecord(plan=..., memory_per_gpu_bytes=..., tokens_per_s=...)))
    transition(engine, job.id, JobStatus.SCHEDULED, update=JobUpdate(ray=RayIds(placement_group_id=...)))
    transition(engine, job.id, JobStatus.RUNNING, expected_from=JobStatus.SCHEDULED,
               update=JobUpdate(placement=Placement(node="gpu-3", gpus=(0, 1))))
    record_metrics(engine, job.id, [MetricPoint(step=10, loss=1.9, learning_rate=2e-4)])
    transition(engine, job.id, JobStatus.SUCCEEDED, update=JobUpdate(results=..., artifacts=...))
    transition(engine, other.id, JobStatus.FAILED, failure=JobFailure(ErrorClass.OOM, "CUDA out of memory"))
    retry = retry_job(engine, other.id)

A transition is checked against the job's status *inside* the transaction, under a row lock
(PostgreSQL) or the database write lock (SQLite), so two processes can never both make a move
from the same status, and its JobEvent is written in that same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from llmplan.runtime.store.columns import utc_now
from llmplan.runtime.store.db import writing
from llmplan.runtime.store.errors import (
    IllegalTransitionError,
    InvalidJobDataError,
    StaleStatusError,
    TerminalJobError,
    UnknownJobError,
)
from llmplan.runtime.store.models import Job, JobEvent, JobMetric
from llmplan.runtime.store.reading import (  # JobFilter is also used from here
    JobDetails,
    JobFilter,
    events_query,
    job_list_query,
    latest_metric_query,
    metrics_query,
)
from llmplan.runtime.store.status import (
    FAILURE_ERROR_CLASSES,
    INITIAL_STATUS,
    ErrorClass,
    JobKind,
    JobStatus,
    is_allowed,
)

RETRYABLE_STATUSES = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


# ---- what callers pass in -----------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRecord:
    """The plan the planner chose: the full JSON (with its estimate breakdown) and its headline figures."""

    plan: Mapping[str, Any]
    memory_per_gpu_bytes: int | None = None  # planned peak memory on each GPU
    tokens_per_s: float | None = None  # planned throughput


@dataclass(frozen=True)
class JobSpec:
    name: str
    kind: JobKind
    model: str
    submitter: str
    request: Mapping[str, Any]
    plan: PlanRecord | None = None
    priority: int = 0


@dataclass(frozen=True)
class Placement:
    node: str
    gpus: tuple[int, ...]
    node_ip: str | None = None


@dataclass(frozen=True)
class RayIds:
    job_id: str | None = None
    actor_id: str | None = None
    placement_group_id: str | None = None


@dataclass(frozen=True)
class MeasuredResults:
    peak_memory_per_gpu_bytes: tuple[int, ...] | None = None
    tokens_per_s: float | None = None
    final_loss: float | None = None


@dataclass(frozen=True)
class Artifacts:
    output_dir: str | None = None
    adapter_path: str | None = None
    log_path: str | None = None


@dataclass(frozen=True)
class JobUpdate:
    """Facts learned about a job; `None` parts (and `None` fields inside them) leave the job as it is."""

    plan: PlanRecord | None = None
    placement: Placement | None = None
    ray: RayIds | None = None
    results: MeasuredResults | None = None
    artifacts: Artifacts | None = None


@dataclass(frozen=True)
class JobFailure:
    error_class: ErrorClass
    message: str


@dataclass(frozen=True)
class MetricPoint:
    step: int
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    memory_bytes: int | None = None
    recorded_at: datetime | None = None  # default: now


# ---- writes -------------------------------------------------------------------------------------
def create_job(engine: Engine, spec: JobSpec) -> Job:
    """Record a new queued job (and its submission event). Returns it with its id."""
    return _insert_job(engine, spec, attempt=1, retry_of=None, message=f"submitted by {spec.submitter}")


def retry_job(engine: Engine, job_id: int, *, submitter: str | None = None,
              request: Mapping[str, Any] | None = None, plan: PlanRecord | None = None, message: str = "") -> Job:
    """A new queued job repeating a failed or cancelled one, with attempt + 1 and retry_of set.

    `request` replaces the original request (a resumed fine-tuning asks to continue from its checkpoint),
    `plan` the original plan (a re-plan after running out of memory).
    A job is retried at most once (a unique index backs this up when two callers race).
    """
    original = get_job(engine, job_id)
    if original.status not in RETRYABLE_STATUSES:
        raise InvalidJobDataError(
            f"job {job_id} is {original.status.value}: only failed or cancelled jobs can be retried"
        )
    spec = JobSpec(
        name=original.name,
        kind=original.kind,
        model=original.model,
        submitter=submitter or original.submitter,
        request=original.request if request is None else dict(request),
        plan=plan or _plan_record_of(original),
        priority=original.priority,
    )
    try:
        return _insert_job(
            engine, spec, attempt=original.attempt + 1, retry_of=job_id, message=message or f"retry of job {job_id}"
        )
    except IntegrityError:
        raise InvalidJobDataError(f"job {job_id} was already retried as job {retry_of_job(engine, job_id)}") from None


def transition(
    engine: Engine,
    job_id: int,
    to_status: JobStatus,
    *,
    message: str = "",
    expected_from: JobStatus | None = None,
    failure: JobFailure | None = None,
    update: JobUpdate | None = None,
) -> Job:
    """Move a job to `to_status`, or raise TransitionRefusedError and change nothing.

    `expected_from` makes the move conditional ("only if it is still scheduled"). Moving to FAILED
    needs a `failure`; CANCELLED records ErrorClass.CANCELLED. `update` is applied in the same
    transaction, so a job's results land together with its final status.
    """
    to_status = JobStatus(to_status)
    _check_failure_fits(to_status, failure)
    with write_session(engine) as session:
        job = _locked_job(session, job_id)
        from_status = JobStatus(job.status)
        _check_move(job_id, from_status, to_status, expected_from)
        now = utc_now()
        _enter_status(job, to_status, now, failure)
        if update is not None:
            _apply_update(job, update)
        session.add(job)
        session.add(
            JobEvent(
                job_id=job_id,
                at=now,
                from_status=from_status,
                to_status=to_status,
                message=message or (failure.message if failure else ""),
            )
        )
    return job


def update_job(engine: Engine, job_id: int, update: JobUpdate) -> Job:
    """Record facts about a job that is not terminal (a terminal job never changes)."""
    with write_session(engine) as session:
        job = _locked_job(session, job_id)
        _refuse_if_terminal(job, "update it")
        _apply_update(job, update)
        session.add(job)
    return job


def record_metric(engine: Engine, job_id: int, point: MetricPoint) -> None:
    record_metrics(engine, job_id, [point])


def record_metrics(engine: Engine, job_id: int, points: Sequence[MetricPoint]) -> int:
    """Append curve points to a job that is not terminal; returns how many were stored."""
    for point in points:
        if point.step < 0:
            raise InvalidJobDataError(f"job {job_id}: metric step must be >= 0, got {point.step}")
    with write_session(engine) as session:
        job = _locked_job(session, job_id, shared=True)
        _refuse_if_terminal(job, "record metrics")
        now = utc_now()
        session.add_all(_metric_row(job_id, point, now) for point in points)
    return len(points)


# ---- reads --------------------------------------------------------------------------------------
def get_job(engine: Engine, job_id: int) -> Job:
    with read_session(engine) as session:
        job = session.get(Job, job_id)
    if job is None:
        raise UnknownJobError(job_id)
    return job


def get_job_details(engine: Engine, job_id: int) -> JobDetails:
    """A job with its events (oldest first) and metrics (by step), read in one transaction."""
    with read_session(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UnknownJobError(job_id)
        events = _events_of(session, job_id)
        metrics = _metrics_of(session, job_id)
    return JobDetails(job=job, events=events, metrics=metrics)


def latest_metric(engine: Engine, job_id: int) -> JobMetric | None:
    """The job's metric with the highest step (what a progress display shows), or None before the first."""
    with read_session(engine) as session:
        return _entities(session, JobMetric, latest_metric_query(JobMetric.__table__, job_id)).first()


def job_events(engine: Engine, job_id: int) -> list[JobEvent]:
    with read_session(engine) as session:
        return _events_of(session, job_id)


def list_jobs(engine: Engine, job_filter: JobFilter) -> list[Job]:
    """Newest first (creation time, then id)."""
    with read_session(engine) as session:
        return list(_entities(session, Job, list_query(job_filter)))


def list_query(job_filter: JobFilter) -> Any:
    """The SELECT behind list_jobs (for EXPLAIN in benchmarks)."""
    return job_list_query(Job.__table__, job_filter)


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """One write transaction: commits on success, rolls back on any exception."""
    with Session(writing(engine), expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


# ---- helpers ------------------------------------------------------------------------------------
def _insert_job(engine: Engine, spec: JobSpec, *, attempt: int, retry_of: int | None, message: str) -> Job:
    now = utc_now()
    job = Job(
        name=spec.name,
        kind=JobKind(spec.kind),
        status=INITIAL_STATUS,
        priority=spec.priority,
        submitter=spec.submitter,
        created_at=now,
        model=spec.model,
        request=dict(spec.request),
        attempt=attempt,
        retry_of=retry_of,
    )
    if spec.plan is not None:
        _apply_plan(job, spec.plan)
    with write_session(engine) as session:
        session.add(job)
        session.flush()  # assigns job.id
        assert job.id is not None
        session.add(JobEvent(job_id=job.id, at=now, from_status=None, to_status=INITIAL_STATUS, message=message))
    return job


def retry_of_job(engine: Engine, job_id: int) -> int | None:
    """The id of the job that retries `job_id`, if any."""
    with read_session(engine) as session:
        return session.exec(select(Job.id).where(col(Job.retry_of) == job_id)).first()


def _locked_job(session: Session, job_id: int, *, shared: bool = False) -> Job:
    """The job row, locked until commit (PostgreSQL row lock; SQLite already holds the write lock).

    `shared` (FOR SHARE) lets metric writers run side by side while still waiting for a transition;
    transitions take FOR NO KEY UPDATE, which does not block inserts of events and metrics.
    """
    statement = select(Job).where(col(Job.id) == job_id)
    statement = statement.with_for_update(read=True) if shared else statement.with_for_update(key_share=True)
    job = session.exec(statement).first()
    if job is None:
        raise UnknownJobError(job_id)
    return job


def _check_move(job_id: int, from_status: JobStatus, to_status: JobStatus, expected: JobStatus | None) -> None:
    if expected is not None and JobStatus(expected) != from_status:
        raise StaleStatusError(job_id, JobStatus(expected), from_status, to_status)
    if not is_allowed(from_status, to_status):
        raise IllegalTransitionError(job_id, from_status, to_status)


def _check_failure_fits(to_status: JobStatus, failure: JobFailure | None) -> None:
    if to_status is JobStatus.FAILED:
        if failure is None or failure.error_class not in FAILURE_ERROR_CLASSES:
            allowed = ", ".join(sorted(error.value for error in FAILURE_ERROR_CLASSES))
            raise InvalidJobDataError(f"a move to failed needs a JobFailure with an error class in: {allowed}")
    elif to_status is JobStatus.CANCELLED:
        if failure is not None and failure.error_class is not ErrorClass.CANCELLED:
            raise InvalidJobDataError("a move to cancelled takes no error class other than cancelled")
    elif failure is not None:
        raise InvalidJobDataError(f"a move to {to_status.value} takes no JobFailure")


def _enter_status(job: Job, to_status: JobStatus, now: datetime, failure: JobFailure | None) -> None:
    job.status = to_status
    if to_status is JobStatus.RUNNING and job.started_at is None:
        job.started_at = now
    if to_status.is_terminal():
        job.finished_at = now
    if to_status is JobStatus.FAILED and failure is not None:
        job.error_class = failure.error_class
        job.error_message = failure.message
    if to_status is JobStatus.CANCELLED:
        job.error_class = ErrorClass.CANCELLED
        job.error_message = failure.message if failure else "cancelled"


def _refuse_if_terminal(job: Job, what: str) -> None:
    status = JobStatus(job.status)
    if status.is_terminal():
        assert job.id is not None
        raise TerminalJobError(job.id, status, what)


def _apply_update(job: Job, update: JobUpdate) -> None:
    if update.plan is not None:
        _apply_plan(job, update.plan)
    if update.placement is not None:
        job.placement_node = update.placement.node
        job.placement_gpus = [int(gpu) for gpu in update.placement.gpus]
        job.placement_node_ip = update.placement.node_ip
    if update.ray is not None:
        _set_given(job, ray_job_id=update.ray.job_id, ray_actor_id=update.ray.actor_id,
                   ray_placement_group_id=update.ray.placement_group_id)
    if update.results is not None:
        peaks = update.results.peak_memory_per_gpu_bytes
        _set_given(
            job,
            peak_memory_per_gpu_bytes=None if peaks is None else [int(peak) for peak in peaks],
            measured_tokens_per_s=update.results.tokens_per_s,
            final_loss=update.results.final_loss,
        )
    if update.artifacts is not None:
        _set_given(job, output_dir=update.artifacts.output_dir, adapter_path=update.artifacts.adapter_path,
                   log_path=update.artifacts.log_path)


def _apply_plan(job: Job, plan: PlanRecord) -> None:
    job.plan = dict(plan.plan)
    job.planned_memory_per_gpu_bytes = plan.memory_per_gpu_bytes
    job.planned_tokens_per_s = plan.tokens_per_s


def _set_given(job: Job, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(job, name, value)


def _plan_record_of(job: Job) -> PlanRecord | None:
    if job.plan is None:
        return None
    return PlanRecord(plan=job.plan, memory_per_gpu_bytes=job.planned_memory_per_gpu_bytes,
                      tokens_per_s=job.planned_tokens_per_s)


def _metric_row(job_id: int, point: MetricPoint, now: datetime) -> JobMetric:
    return JobMetric(
        job_id=job_id,
        step=point.step,
        recorded_at=point.recorded_at or now,
        loss=point.loss,
        learning_rate=point.learning_rate,
        tokens_per_s=point.tokens_per_s,
        memory_bytes=point.memory_bytes,
    )


def _entities(session: Session, table_class: type[Any], statement: sa.Select[Any]) -> sa.ScalarResult[Any]:
    """The rows of a query built in `reading` (on the table of `table_class`) as `table_class` objects."""
    return session.scalars(sa.select(table_class).from_statement(statement))


def _events_of(session: Session, job_id: int) -> list[JobEvent]:
    return list(_entities(session, JobEvent, events_query(JobEvent.__table__, job_id)))


def _metrics_of(session: Session, job_id: int) -> list[JobMetric]:
    return list(_entities(session, JobMetric, metrics_query(JobMetric.__table__, job_id)))
