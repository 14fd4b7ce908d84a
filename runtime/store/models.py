"""The job store's tables: `Job`, its audit trail `JobEvent` and its curves `JobMetric`.

Their column types are in `columns` (SQLAlchemy Core), which the read path of `llmplan jobs`/`show`
(`reading`) uses without importing SQLModel. The tables live in their own SQLAlchemy metadata
(`STORE_METADATA`), not SQLModel's shared default, so the store's migrations only ever see llmplan's tables. Any change here needs a new migration in
`migrations/versions/`; `tests/runtime/store/test_store_migrations.py` fails when the two disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from llmplan.runtime.store.columns import BYTES, JSON_DOCUMENT, NAMING_CONVENTION, UTCDateTime, enum_column, utc_now
from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

STORE_METADATA = sa.MetaData(naming_convention=NAMING_CONVENTION)


class StoreModel(SQLModel, registry=registry(metadata=STORE_METADATA)):
    """Base of the store's tables (own metadata, see module docstring)."""


class Job(StoreModel, table=True):
    """One attempt at one fine-tuning or inference job, from submission to its end."""

    __tablename__ = "job"
    __table_args__ = (
        sa.Index("ix_job_created_at_id", "created_at", "id"),
        sa.Index("ix_job_status_created_at", "status", "created_at"),
        sa.Index("ix_job_kind_created_at", "kind", "created_at"),
        # A job is retried at most once: two schedulers cannot both start attempt N + 1.
        sa.Index("uq_job_retry_of", "retry_of", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=sa.String(200))
    kind: JobKind = Field(sa_type=enum_column("kind"))
    status: JobStatus = Field(sa_type=enum_column("status"))
    priority: int = Field(default=0)
    submitter: str = Field(sa_type=sa.String(200))
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    model: str = Field(sa_type=sa.String(300))

    # What was asked for, and what the planner chose (with its estimate breakdown).
    request: dict[str, Any] = Field(default_factory=dict, sa_type=JSON_DOCUMENT)
    plan: dict[str, Any] | None = Field(default=None, sa_type=JSON_DOCUMENT)
    planned_memory_per_gpu_bytes: int | None = Field(default=None, sa_type=BYTES)
    planned_tokens_per_s: float | None = None

    # Where it ran.
    ray_job_id: str | None = Field(default=None, sa_type=sa.String(128))
    ray_actor_id: str | None = Field(default=None, sa_type=sa.String(128))
    ray_placement_group_id: str | None = Field(default=None, sa_type=sa.String(128))
    placement_node: str | None = Field(default=None, sa_type=sa.String(255))
    placement_gpus: list[int] | None = Field(default=None, sa_type=JSON_DOCUMENT)
    # The node's IP, as users know it (placement_node is Ray's node id); None in rows older than 0002.
    placement_node_ip: str | None = Field(default=None, sa_type=sa.String(64))

    # What it measured.
    peak_memory_per_gpu_bytes: list[int] | None = Field(default=None, sa_type=JSON_DOCUMENT)
    measured_tokens_per_s: float | None = None
    final_loss: float | None = None

    # What it left behind.
    output_dir: str | None = Field(default=None, sa_type=sa.Text)
    adapter_path: str | None = Field(default=None, sa_type=sa.Text)
    log_path: str | None = Field(default=None, sa_type=sa.Text)

    # How it ended, when it did not succeed.
    error_class: ErrorClass | None = Field(default=None, sa_type=enum_column("error_class"))
    error_message: str | None = Field(default=None, sa_type=sa.Text)

    # Retries are new jobs: attempt 2 has retry_of = attempt 1's id.
    attempt: int = Field(default=1)
    retry_of: int | None = Field(default=None, foreign_key="job.id")


class JobEvent(StoreModel, table=True):
    """One status change: the audit trail. `from_status` is None for the submission event."""

    __tablename__ = "job_event"
    __table_args__ = (sa.Index("ix_job_event_job_id_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE")
    at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    from_status: JobStatus | None = Field(default=None, sa_type=enum_column("from_status"))
    to_status: JobStatus = Field(sa_type=enum_column("to_status"))
    message: str = Field(default="", sa_type=sa.Text)


class JobMetric(StoreModel, table=True):
    """One point of a job's training or serving curves."""

    __tablename__ = "job_metric"
    __table_args__ = (sa.Index("ix_job_metric_job_id_step", "job_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE")
    step: int
    recorded_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    memory_bytes: int | None = Field(default=None, sa_type=BYTES)
