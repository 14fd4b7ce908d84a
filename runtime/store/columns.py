"""The store's column types, in SQLAlchemy Core only: the SQLModel tables (`models`) declare their columns with
them, and the read path (`reading`), which never imports SQLModel, types the columns it reflects with them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

import sqlalchemy as sa

from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


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
# Which enum each enum column holds (same name, same enum in every table) and the name of its type.
ENUM_COLUMNS: dict[str, tuple[type[Enum], str]] = {
    "kind": (JobKind, "job_kind"),
    "status": (JobStatus, "job_status"),
    "from_status": (JobStatus, "job_status"),
    "to_status": (JobStatus, "job_status"),
    "error_class": (ErrorClass, "error_class"),
}


def enum_column(column_name: str) -> sa.Enum:
    """The type of the enum column `column_name` (see ENUM_COLUMNS)."""
    return enum_column_type(*ENUM_COLUMNS[column_name])


def read_type(column_name: str, reflected: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    """The type a reflected column is read with: its enum, UTC-aware times; JSON and the rest as the database says."""
    if column_name in ENUM_COLUMNS:
        return enum_column(column_name)
    if isinstance(reflected, sa.DateTime):
        return UTCDateTime()
    return reflected
