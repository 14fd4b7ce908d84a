"""Reading jobs: the queries behind `llmplan jobs`, `llmplan show` and the dashboard, in SQLAlchemy Core.

Each query is built once here, on the tables it is given: the repository runs them on the SQLModel tables and
gets `Job` objects (the scheduler's reads); the read functions below run them on the tables reflected from the
database and get rows with the same attributes (`row.status` a JobStatus, `row.created_at` UTC-aware), without
importing SQLModel, pydantic or the ORM: a third of a second of each `llmplan jobs`. The SQLModel classes stay
the one schema: the database was created from them (through the migrations), and the columns are typed by
`columns.read_type`, the types the classes are declared with (`tests/runtime/store/test_store_reading.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from llmplan.runtime.store.columns import read_type
from llmplan.runtime.store.errors import InvalidJobDataError, UnknownJobError
from llmplan.runtime.store.status import JobKind, JobStatus

DEFAULT_LIST_LIMIT = 50
JOB_TABLE, EVENT_TABLE, METRIC_TABLE = "job", "job_event", "job_metric"


@dataclass(frozen=True)
class JobFilter:
    statuses: tuple[JobStatus, ...] = ()
    kind: JobKind | None = None
    model: str | None = None  # case-insensitive substring of the model name
    since: datetime | None = None  # created at or after
    limit: int = DEFAULT_LIST_LIMIT


@dataclass(frozen=True)
class JobDetails:
    """A job with its events (oldest first) and metrics (by step): SQLModel objects from the repository, rows
    from `read_job_details`; both have the columns as attributes."""

    job: Any
    events: list[Any] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)


# ---- the queries, on given tables ---------------------------------------------------------------
def job_list_query(job: sa.Table, job_filter: JobFilter) -> sa.Select[Any]:
    """The jobs matching the filter, newest first (creation time, then id), at most its limit."""
    if job_filter.limit < 1:
        raise InvalidJobDataError(f"limit must be at least 1, got {job_filter.limit}")
    newest_first = (job.c.created_at.desc(), job.c.id.desc())
    return _filtered(sa.select(job), job, job_filter).order_by(*newest_first).limit(job_filter.limit)


def job_count_query(job: sa.Table, job_filter: JobFilter, *, at_most: int | None = None) -> sa.Select[Any]:
    """How many jobs match the filter, ignoring its limit; counting stops at `at_most`, which keeps the cost
    bounded on a huge history (a plain COUNT reads every matching row)."""
    matching = _filtered(sa.select(job.c.id), job, job_filter)
    if at_most is not None:
        matching = matching.limit(at_most)
    return sa.select(sa.func.count()).select_from(matching.subquery())


def job_query(job: sa.Table, job_id: int) -> sa.Select[Any]:
    return sa.select(job).where(job.c.id == job_id)


def events_query(event: sa.Table, job_id: int) -> sa.Select[Any]:
    return sa.select(event).where(event.c.job_id == job_id).order_by(event.c.id)


def metrics_query(metric: sa.Table, job_id: int) -> sa.Select[Any]:
    return sa.select(metric).where(metric.c.job_id == job_id).order_by(metric.c.step, metric.c.id)


def latest_metric_query(metric: sa.Table, job_id: int) -> sa.Select[Any]:
    """The job's metric with the highest step (what a progress display shows)."""
    return sa.select(metric).where(metric.c.job_id == job_id).order_by(metric.c.step.desc()).limit(1)


def _filtered(statement: sa.Select[Any], job: sa.Table, job_filter: JobFilter) -> sa.Select[Any]:
    if job_filter.statuses:
        statement = statement.where(job.c.status.in_([JobStatus(s) for s in job_filter.statuses]))
    if job_filter.kind is not None:
        statement = statement.where(job.c.kind == JobKind(job_filter.kind))
    if job_filter.model:
        statement = statement.where(job.c.model.icontains(job_filter.model, autoescape=True))
    if job_filter.since is not None:
        statement = statement.where(job.c.created_at >= job_filter.since)
    return statement


# ---- the tables, from the database --------------------------------------------------------------
def reflected_table(connection: Connection, name: str) -> sa.Table:
    """The store's table `name` as the database has it, its columns typed as the SQLModel classes declare them."""
    columns = sa.inspect(connection).get_columns(name)
    return sa.Table(name, sa.MetaData(), *(sa.Column(info["name"], read_type(info["name"], info["type"]))
                                           for info in columns))


# ---- reads as rows ------------------------------------------------------------------------------
def read_jobs(engine: Engine, job_filter: JobFilter) -> list[Row[Any]]:
    with engine.connect() as connection:
        return list(connection.execute(job_list_query(reflected_table(connection, JOB_TABLE), job_filter)))


def count_jobs(engine: Engine, job_filter: JobFilter, *, at_most: int | None = None) -> int:
    """See `job_count_query`."""
    with engine.connect() as connection:
        statement = job_count_query(reflected_table(connection, JOB_TABLE), job_filter, at_most=at_most)
        return int(connection.execute(statement).scalar_one())


def read_job_details(engine: Engine, job_id: int) -> JobDetails:
    """The job, its events and its metrics, read in one transaction."""
    with engine.connect() as connection:
        job = connection.execute(job_query(reflected_table(connection, JOB_TABLE), job_id)).first()
        if job is None:
            raise UnknownJobError(job_id)
        events = connection.execute(events_query(reflected_table(connection, EVENT_TABLE), job_id))
        metrics = connection.execute(metrics_query(reflected_table(connection, METRIC_TABLE), job_id))
        return JobDetails(job=job, events=list(events), metrics=list(metrics))


def read_latest_metric(engine: Engine, job_id: int) -> Row[Any] | None:
    with engine.connect() as connection:
        return connection.execute(latest_metric_query(reflected_table(connection, METRIC_TABLE), job_id)).first()
