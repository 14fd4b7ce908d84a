"""Where the job database is, how to connect to it safely, and whether its schema is current.

- URL: `--db` beats `$LLMPLAN_DB` beats `~/.llmplan/llmplan.db`. A bare path means a SQLite file;
  `postgresql://` and `postgresql+psycopg://` mean PostgreSQL through psycopg 3.
- SQLite is opened in WAL mode with a busy timeout, and every write transaction starts with
  `BEGIN IMMEDIATE`, so several processes (Ray actors, the CLI) can write without "database is
  locked" failures or lost updates. WAL needs a local disk: on a shared (NFS) home directory, or
  with actors on several nodes, use PostgreSQL.
- Schema: alembic revisions in `migrations/versions/`, recorded in `llmplan_schema_version`, which
  `read_schema_revision` reads. Opening a store and bringing its schema up to date is `opening.open_store`,
  a floor above this one and `migrate`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError

from llmplan.runtime.store.errors import DatabaseUnavailableError, DatabaseURLError

DB_ENV_VAR = "LLMPLAN_DB"
DEFAULT_DB_PATH = Path("~/.llmplan/llmplan.db")
VERSION_TABLE = "llmplan_schema_version"
# The newest migration this llmplan ships; tests check it equals alembic's head.
SCHEMA_HEAD = "0002_placement_node_ip"

SQLITE_BUSY_TIMEOUT_S = 60.0
POSTGRES_CONNECT_TIMEOUT_S = 10
# Execution option that marks a connection as about to write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "llmplan_write"

_BEGIN_DEFERRED = "BEGIN"
_BEGIN_IMMEDIATE = "BEGIN IMMEDIATE"
_SQLITE_WAL = "PRAGMA journal_mode = WAL"
# Switching a new database to WAL needs its exclusive lock, and SQLite answers "database is locked"
# at once, without its busy handler, when another connection holds a lock it might upgrade (the
# deadlock rule of sqlite3_busy_handler): processes opening a new database together must retry.
SQLITE_WAL_RETRY_S = 0.05
_SQLITE_PRAGMAS = (
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
)
_POSTGRES_DRIVER = "postgresql+psycopg"
_POSTGRES_SPELLINGS = frozenset({"postgresql", "postgres", "postgresql+psycopg"})
_SUPPORTED = "use a SQLite path (sqlite:///path/to/llmplan.db) or postgresql+psycopg://user@host/db"


# ---- which database -----------------------------------------------------------------------------
def resolve_database_url(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """The URL text to use: the --db value, else $LLMPLAN_DB, else the default SQLite file."""
    for candidate in (cli_value, environ.get(DB_ENV_VAR)):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return f"sqlite:///{default_database_path()}"


def default_database_path() -> Path:
    return DEFAULT_DB_PATH.expanduser()


def parse_database_url(text: str) -> URL:
    """A validated SQLAlchemy URL; a plain file path is taken as a SQLite database."""
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser()))
    try:
        url = sa.make_url(text)
    except ArgumentError:
        raise DatabaseURLError(f"malformed database URL {text!r}: {_SUPPORTED}") from None
    if url.drivername in _POSTGRES_SPELLINGS:
        return _checked_postgres_url(url)
    if url.drivername in {"sqlite", "sqlite+pysqlite"}:
        return _checked_sqlite_url(url, text)
    raise DatabaseURLError(f"unsupported database {url.drivername!r} in {display_url(url)}: {_SUPPORTED}")


def _checked_postgres_url(url: URL) -> URL:
    if not url.host and "host" not in url.query:
        raise DatabaseURLError(f"database URL {display_url(url)} names no host: {_SUPPORTED}")
    if not url.database:
        raise DatabaseURLError(f"database URL {display_url(url)} names no database: {_SUPPORTED}")
    return url.set(drivername=_POSTGRES_DRIVER)


def _checked_sqlite_url(url: URL, text: str) -> URL:
    if not url.database or url.database == ":memory:" or url.database.startswith("file::memory:"):
        raise DatabaseURLError(f"{text!r} is an in-memory database, which would forget every job: {_SUPPORTED}")
    return url.set(drivername="sqlite", database=str(Path(url.database).expanduser()))


def display_url(url: URL | str) -> str:
    """The URL with any password hidden, for messages."""
    if isinstance(url, str):
        return url
    return url.render_as_string(hide_password=True)


# ---- engines ------------------------------------------------------------------------------------
def create_store_engine(url: URL | str) -> Engine:
    """An engine for the job store, configured for safe concurrent writers. Connects lazily."""
    url = parse_database_url(url) if isinstance(url, str) else url
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url)
    return _create_postgres_engine(url)


def _create_sqlite_engine(url: URL) -> Engine:
    path = Path(url.database or "")
    _ensure_sqlite_directory(path)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    sa.event.listen(engine, "connect", _configure_sqlite_connection)
    sa.event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _ensure_sqlite_directory(path: Path) -> None:
    if path.parent.is_dir():
        return
    if path == default_database_path():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    raise DatabaseUnavailableError(f"cannot create SQLite database {path}: directory {path.parent} does not exist")


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (SQLAlchemy's documented recipe), so reads
    # are real transactions and writes can take the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        _switch_to_wal(cursor)
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute(_SQLITE_WAL)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(SQLITE_WAL_RETRY_S)


def _begin_sqlite_transaction(connection: Connection) -> None:
    # A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY when
    # another process wrote in between (the busy timeout cannot help there); IMMEDIATE waits instead.
    if connection.get_execution_options().get(WRITE_OPTION):
        connection.exec_driver_sql(_BEGIN_IMMEDIATE)
    else:
        connection.exec_driver_sql(_BEGIN_DEFERRED)


def _create_postgres_engine(url: URL) -> Engine:
    try:
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S, "application_name": "llmplan"},
        )
    except ModuleNotFoundError:
        raise DatabaseURLError(
            "PostgreSQL needs the psycopg driver: pip install 'llmplan[postgres]'"
        ) from None


def writing(engine: Engine) -> Engine:
    """The same engine, marked so that its transactions take the write lock first (SQLite)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def read_schema_revision(connection: Connection) -> str | None:
    """The alembic revision recorded in the database; None for a database llmplan never touched."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    version_table = sa.table(VERSION_TABLE, sa.column("version_num", sa.String))
    revisions = sorted(connection.execute(sa.select(version_table.c.version_num)).scalars())
    # llmplan's history is linear, so one row; several would be branches of a newer llmplan.
    return "+".join(revisions) or None


def first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else ""
    return text.splitlines()[0] if text else type(error).__name__


def database_url_from_environment(cli_value: str | None = None) -> str:
    """resolve_database_url with this process's environment."""
    return resolve_database_url(cli_value, os.environ)
