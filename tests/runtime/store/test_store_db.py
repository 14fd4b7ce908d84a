"""Database URLs, SQLite settings, schema versions and import weight."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmplan.runtime.store import migrate
from llmplan.runtime.store.db import DB_ENV_VAR, SCHEMA_HEAD, SQLITE_BUSY_TIMEOUT_S, VERSION_TABLE, create_store_engine, parse_database_url, read_schema_revision, resolve_database_url
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.errors import (
    DatabaseUnavailableError,
    DatabaseURLError,
    SchemaError,
    SchemaTooNewError,
)
from llmplan.runtime.store.repository import JobFilter, create_job, list_jobs

from .factory import job_spec


# ---- URLs ---------------------------------------------------------------------------------------
def test_db_option_beats_environment_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_database_url("x.db", {DB_ENV_VAR: "y.db"}) == "x.db"
    assert resolve_database_url(None, {DB_ENV_VAR: "y.db"}) == "y.db"
    assert resolve_database_url("  ", {DB_ENV_VAR: ""}) == f"sqlite:///{tmp_path}/.llmplan/llmplan.db"


def test_default_location_is_created_but_other_missing_directories_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    open_store(resolve_database_url(None, {})).dispose()
    assert (tmp_path / ".llmplan" / "llmplan.db").is_file()
    with pytest.raises(DatabaseUnavailableError, match="does not exist"):
        open_store(str(tmp_path / "missing" / "jobs.db"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv/llmplan/jobs.db", "sqlite:////srv/llmplan/jobs.db"),
        ("sqlite:////srv/jobs.db", "sqlite:////srv/jobs.db"),
        ("postgresql://llm@db.internal/llmplan", "postgresql+psycopg://llm@db.internal/llmplan"),
        ("postgres://llm@db.internal:5433/llmplan", "postgresql+psycopg://llm@db.internal:5433/llmplan"),
        ("postgresql+psycopg://llm:secret@db/llmplan", "postgresql+psycopg://llm:***@db/llmplan"),
    ],
)
def test_urls_are_normalised(text: str, expected: str) -> None:
    assert parse_database_url(text).render_as_string(hide_password=True) == expected


def test_relative_and_home_paths_become_sqlite_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_database_url("~/jobs.db").database == f"{tmp_path}/jobs.db"
    assert parse_database_url("sqlite:///~/jobs.db").database == f"{tmp_path}/jobs.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://u@h/db", r"unsupported database 'postgresql\+psycopg2'"),
        ("://nothing", "malformed database URL"),
        ("postgresql+psycopg:///llmplan", "names no host"),
        ("postgresql+psycopg://u@h", "names no database"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(DatabaseURLError, match=message):
        parse_database_url(text)


def test_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(DatabaseUnavailableError, match=r"cannot use database postgresql\+psycopg://u@127.0.0.1:9/x"):
        open_store("postgresql+psycopg://u@127.0.0.1:9/x")


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not sqlite at all " * 100)
    with pytest.raises(DatabaseUnavailableError, match="file is not a database"):
        open_store(str(path))


# ---- SQLite settings ----------------------------------------------------------------------------
def test_sqlite_uses_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = open_store(str(tmp_path / "jobs.db"))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(SQLITE_BUSY_TIMEOUT_S * 1000)
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_switching_a_new_database_to_wal_waits_for_another_writer(tmp_path: Path) -> None:
    # SQLite refuses this switch at once (no busy handler) while another connection writes: the
    # race of several processes opening a new database together, made deterministic.
    path = tmp_path / "jobs.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    threading.Timer(0.5, writer.commit).start()
    engine = open_store(str(path))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    writer.close()


def test_sqlite_writes_begin_immediate(tmp_path: Path) -> None:
    engine = open_store(str(tmp_path / "jobs.db"))
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, *rest: statements.append(stmt))
    create_job(engine, job_spec())
    list_jobs(engine, JobFilter())
    begins = [s for s in statements if s.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]  # the write, then the read
    engine.dispose()


# ---- schema versions ----------------------------------------------------------------------------
def test_schema_head_constant_matches_the_migrations() -> None:
    assert migrate.head_revision() == SCHEMA_HEAD
    assert SCHEMA_HEAD in migrate.known_revisions()


def test_a_new_database_is_stamped_with_the_head(engine: Engine) -> None:
    with engine.connect() as connection:
        assert read_schema_revision(connection) == SCHEMA_HEAD
        assert sa.inspect(connection).has_table(VERSION_TABLE)


def test_opening_twice_keeps_the_jobs(database_url: str) -> None:
    first = open_store(database_url)
    job_id = create_job(first, job_spec()).id
    first.dispose()
    second = open_store(database_url)
    assert [job.id for job in list_jobs(second, JobFilter())] == [job_id]
    second.dispose()


def test_a_database_from_a_newer_llmplan_is_refused_untouched(database_url: str) -> None:
    engine = open_store(database_url)
    job_id = create_job(engine, job_spec()).id
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :revision"),
                           {"revision": "0099_from_the_future"})
    engine.dispose()
    with pytest.raises(SchemaTooNewError, match="written by a newer llmplan.*upgrade llmplan"):
        open_store(database_url)
    raw = create_store_engine(database_url)
    with raw.connect() as connection:
        assert read_schema_revision(connection) == "0099_from_the_future"
    assert [job.id for job in list_jobs(raw, JobFilter())] == [job_id]
    raw.dispose()


def test_a_foreign_job_table_is_not_adopted(database_url: str) -> None:
    raw = create_store_engine(database_url)
    with raw.begin() as connection:
        connection.execute(sa.text("CREATE TABLE job (id INTEGER PRIMARY KEY, payload TEXT)"))
    raw.dispose()
    with pytest.raises(SchemaError, match="not created by llmplan"):
        open_store(database_url)


# ---- weight -------------------------------------------------------------------------------------
def test_importing_the_store_and_its_cli_pulls_no_heavy_stack() -> None:
    code = (
        "import sys\n"
        "import llmplan.runtime.store, llmplan.runtime.store.repository, llmplan.runtime.store.migrate\n"
        "import llmplan.cli.jobs\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ray', 'peft'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_package_list_ships_the_migrations() -> None:
    # A regular (non-editable) install only contains the packages pyproject.toml lists.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[3]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    store = root / "runtime" / "store"
    for init in store.rglob("__init__.py"):
        relative = init.parent.relative_to(root / "runtime")
        assert ".".join(("llmplan", "runtime", *relative.parts)) in listed
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "script.py.mako" in package_data["llmplan.runtime.store.migrations"]
