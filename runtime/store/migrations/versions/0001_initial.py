"""Jobs, their events and their metrics.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01

A migration is a frozen snapshot: it spells out its columns instead of importing models.py, so
later model changes cannot silently change what an old upgrade does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
ENUM_VALUE = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", ENUM_VALUE, nullable=False),
        sa.Column("status", ENUM_VALUE, nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("submitter", sa.String(200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("request", JSON_DOCUMENT, nullable=False),
        sa.Column("plan", JSON_DOCUMENT, nullable=True),
        sa.Column("planned_memory_per_gpu_bytes", sa.BigInteger(), nullable=True),
        sa.Column("planned_tokens_per_s", sa.Float(), nullable=True),
        sa.Column("ray_job_id", sa.String(128), nullable=True),
        sa.Column("ray_actor_id", sa.String(128), nullable=True),
        sa.Column("ray_placement_group_id", sa.String(128), nullable=True),
        sa.Column("placement_node", sa.String(255), nullable=True),
        sa.Column("placement_gpus", JSON_DOCUMENT, nullable=True),
        sa.Column("peak_memory_per_gpu_bytes", JSON_DOCUMENT, nullable=True),
        sa.Column("measured_tokens_per_s", sa.Float(), nullable=True),
        sa.Column("final_loss", sa.Float(), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=True),
        sa.Column("adapter_path", sa.Text(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("error_class", ENUM_VALUE, nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job"),
        sa.ForeignKeyConstraint(["retry_of"], ["job.id"], name="fk_job_retry_of_job"),
    )
    op.create_index("ix_job_created_at_id", "job", ["created_at", "id"])
    op.create_index("ix_job_status_created_at", "job", ["status", "created_at"])
    op.create_index("ix_job_kind_created_at", "job", ["kind", "created_at"])
    op.create_index("uq_job_retry_of", "job", ["retry_of"], unique=True)

    op.create_table(
        "job_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("from_status", ENUM_VALUE, nullable=True),
        sa.Column("to_status", ENUM_VALUE, nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_job_event"),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name="fk_job_event_job_id_job", ondelete="CASCADE"),
    )
    op.create_index("ix_job_event_job_id_id", "job_event", ["job_id", "id"])

    op.create_table(
        "job_metric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("learning_rate", sa.Float(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_metric"),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name="fk_job_metric_job_id_job", ondelete="CASCADE"),
    )
    op.create_index("ix_job_metric_job_id_step", "job_metric", ["job_id", "step"])


def downgrade() -> None:
    op.drop_table("job_metric")
    op.drop_table("job_event")
    op.drop_table("job")
