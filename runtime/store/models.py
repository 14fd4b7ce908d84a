"""The job store's rows and tables: `Job`, its audit trail `JobEvent` and its curves `JobMetric`.

Each row type is a frozen dataclass whose fields are also its table's columns (`column(...)` gives the SQL
type); the SQLAlchemy Core tables (`JOB`, `JOB_EVENT`, `JOB_METRIC`) are derived from them, so the schema is
written once. A column is nullable exactly when its field defaults to None. Only SQLAlchemy Core is used (no
ORM, no pydantic): reading jobs stays cheap to import. The tables live in their own metadata
(`STORE_METADATA`), so the store's migrations only ever see llmplan's tables. Any change here needs a new
migration in `migrations/versions/`; `tests/store/test_store_migrations.py` fails when the two disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, TypeVar

import sqlalchemy as sa

from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
STORE_METADATA = sa.MetaData(naming_convention=NAMING_CONVENTION)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as naive UTC
    (which also keeps SQLite's text timestamps sortable) and come back with UTC attached.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; the store only takes timezone-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _enum_values(enum_class: type[Enum]) -> list[str]:
    return [member.value for member in enum_class]


def enum_column_type(enum_class: type[Enum], name: str) -> sa.Enum:
    """A VARCHAR holding the enum's *value*: adding a status later needs no ALTER TYPE."""
    return sa.Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=_enum_values,
        validate_strings=True,
    )


class JSONDocument(sa.types.TypeDecorator[Any]):
    """JSON; JSONB on PostgreSQL. Picked per dialect so that importing the store does not import
    SQLAlchemy's PostgreSQL dialects (and asyncio with them): a tenth of `llmplan jobs`'s start-up."""

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.JSON())


JSON_DOCUMENT = JSONDocument()
BYTES = sa.BigInteger()
_COLUMN = "llmplan_column"  # a dataclass field's metadata key for its column
Row = TypeVar("Row")


@dataclass(frozen=True)
class ColumnSpec:
    sql_type: sa.types.TypeEngine[Any]
    primary_key: bool = False
    references: str | None = None  # "table.column" of a foreign key
    on_delete: str | None = None


def column(sql_type: Any, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
           primary_key: bool = False, references: str | None = None, on_delete: str | None = None) -> Any:
    """A row field that is also a table column of `sql_type`."""
    spec = ColumnSpec(sql_type, primary_key=primary_key, references=references, on_delete=on_delete)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_COLUMN: spec})


def table_of(row_type: type, name: str, *indexes: sa.Index) -> sa.Table:
    """The Core table whose columns are `row_type`'s fields, in order."""
    columns = []
    for item in dataclasses.fields(row_type):
        spec: ColumnSpec = item.metadata[_COLUMN]
        foreign = [sa.ForeignKey(spec.references, ondelete=spec.on_delete)] if spec.references else []
        columns.append(sa.Column(item.name, spec.sql_type, *foreign, primary_key=spec.primary_key,
                                 nullable=item.default is None and not spec.primary_key))
    return sa.Table(name, STORE_METADATA, *columns, *indexes)


def row_from(row_type: type[Row], values: Mapping[str, Any]) -> Row:
    """A row type's instance from a result row's mapping (`result.mappings()`)."""
    return row_type(**{item.name: values[item.name] for item in dataclasses.fields(row_type)})


def column_values(row: Any) -> dict[str, Any]:
    """The row's columns as a mapping, for an INSERT (an id of None is left to the database)."""
    values = {item.name: getattr(row, item.name) for item in dataclasses.fields(row)}
    return {name: value for name, value in values.items() if not (name == "id" and value is None)}


@dataclass(frozen=True, kw_only=True)
class Job:
    """One attempt at one fine-tuning or inference job, from submission to its end."""

    id: int | None = column(sa.Integer(), primary_key=True, default=None)  # None until inserted
    name: str = column(sa.String(200))
    kind: JobKind = column(enum_column_type(JobKind, "job_kind"))
    status: JobStatus = column(enum_column_type(JobStatus, "job_status"))
    priority: int = column(sa.Integer(), default=0)
    submitter: str = column(sa.String(200))
    created_at: datetime = column(UTCDateTime(), default_factory=utc_now)
    started_at: datetime | None = column(UTCDateTime(), default=None)
    finished_at: datetime | None = column(UTCDateTime(), default=None)
    model: str = column(sa.String(300))

    # What was asked for, and what the planner chose (with its estimate breakdown).
    request: dict[str, Any] = column(JSON_DOCUMENT, default_factory=dict)
    plan: dict[str, Any] | None = column(JSON_DOCUMENT, default=None)
    planned_memory_per_gpu_bytes: int | None = column(BYTES, default=None)
    planned_tokens_per_s: float | None = column(sa.Float(), default=None)

    # Where it ran.
    ray_job_id: str | None = column(sa.String(128), default=None)
    ray_actor_id: str | None = column(sa.String(128), default=None)
    ray_placement_group_id: str | None = column(sa.String(128), default=None)
    placement_node: str | None = column(sa.String(255), default=None)
    placement_gpus: list[int] | None = column(JSON_DOCUMENT, default=None)
    # The node's IP, as users know it (placement_node is Ray's node id); None in rows older than 0002.
    placement_node_ip: str | None = column(sa.String(64), default=None)

    # What it measured.
    peak_memory_per_gpu_bytes: list[int] | None = column(JSON_DOCUMENT, default=None)
    measured_tokens_per_s: float | None = column(sa.Float(), default=None)
    final_loss: float | None = column(sa.Float(), default=None)

    # What it left behind.
    output_dir: str | None = column(sa.Text(), default=None)
    adapter_path: str | None = column(sa.Text(), default=None)
    log_path: str | None = column(sa.Text(), default=None)

    # How it ended, when it did not succeed.
    error_class: ErrorClass | None = column(enum_column_type(ErrorClass, "error_class"), default=None)
    error_message: str | None = column(sa.Text(), default=None)

    # Retries are new jobs: attempt 2 has retry_of = attempt 1's id.
    attempt: int = column(sa.Integer(), default=1)
    retry_of: int | None = column(sa.Integer(), default=None, references="job.id")


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One status change: the audit trail. `from_status` is None for the submission event."""

    id: int | None = column(sa.Integer(), primary_key=True, default=None)  # None until inserted
    job_id: int = column(sa.Integer(), references="job.id", on_delete="CASCADE")
    at: datetime = column(UTCDateTime(), default_factory=utc_now)
    from_status: JobStatus | None = column(enum_column_type(JobStatus, "job_status"), default=None)
    to_status: JobStatus = column(enum_column_type(JobStatus, "job_status"))
    message: str = column(sa.Text(), default="")


@dataclass(frozen=True, kw_only=True)
class JobMetric:
    """One point of a job's training or serving curves."""

    id: int | None = column(sa.Integer(), primary_key=True, default=None)  # None until inserted
    job_id: int = column(sa.Integer(), references="job.id", on_delete="CASCADE")
    step: int = column(sa.Integer())
    recorded_at: datetime = column(UTCDateTime(), default_factory=utc_now)
    loss: float | None = column(sa.Float(), default=None)
    learning_rate: float | None = column(sa.Float(), default=None)
    tokens_per_s: float | None = column(sa.Float(), default=None)
    memory_bytes: int | None = column(BYTES, default=None)


JOB = table_of(
    Job, "job",
    sa.Index("ix_job_created_at_id", "created_at", "id"),
    sa.Index("ix_job_status_created_at", "status", "created_at"),
    sa.Index("ix_job_kind_created_at", "kind", "created_at"),
    # A job is retried at most once: two schedulers cannot both start attempt N + 1.
    sa.Index("uq_job_retry_of", "retry_of", unique=True),
)
JOB_EVENT = table_of(JobEvent, "job_event", sa.Index("ix_job_event_job_id_id", "job_id", "id"))
JOB_METRIC = table_of(JobMetric, "job_metric", sa.Index("ix_job_metric_job_id_step", "job_id", "step"))
