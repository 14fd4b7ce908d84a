"""Store fixtures: every store test runs against SQLite and against a real PostgreSQL server.

PostgreSQL comes from $LLMPLAN_TEST_POSTGRES_URL (`.ci/run` starts one and sets it). Without it the
PostgreSQL cases are skipped, and the skip says so; when $CI is set they fail instead, so CI can never
pass without having tested PostgreSQL. Each test gets its own PostgreSQL schema, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ci_required import unavailable
from llmplan.runtime.store.db import parse_database_url
from llmplan.runtime.store.opening import open_store

POSTGRES_URL_VAR = "LLMPLAN_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


def postgres_server_url() -> str:
    """The test server's URL, or skip (locally) / fail (in CI) when there is none."""
    url = os.environ.get(POSTGRES_URL_VAR, "").strip()
    if url:
        return url
    unavailable(f"PostgreSQL store tests skipped: ${POSTGRES_URL_VAR} is unset and CI is not set "
                "(run .ci/run, or start a server and set it, to run them)",
                f"CI is set but ${POSTGRES_URL_VAR} is not: the PostgreSQL store tests must run in CI "
                "(.ci/run starts a server and sets it)")


class PostgresSchemas:
    """Creates a throw-away schema per test and a URL whose search_path points at it."""

    def __init__(self, server_url: str) -> None:
        self.server_url = parse_database_url(server_url)
        self.admin = sa.create_engine(self.server_url, isolation_level="AUTOCOMMIT")

    def create(self) -> tuple[str, str]:
        schema = f"llmplan_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(sa.schema.CreateSchema(schema))
        url = self.server_url.update_query_dict({"options": f"-csearch_path={schema}"})
        return schema, url.render_as_string(hide_password=False)

    def drop(self, schema: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True))

    def close(self) -> None:
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_schemas() -> Iterator[PostgresSchemas]:
    schemas = PostgresSchemas(postgres_server_url())
    yield schemas
    schemas.close()


def _fresh_database_url(backend: str, directory: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'llmplan.db'}"
        return
    schemas: PostgresSchemas = request.getfixturevalue("postgres_schemas")
    schema, url = schemas.create()
    yield url
    schemas.drop(schema)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (nothing created yet) on each backend."""
    yield from _fresh_database_url(request.param, tmp_path, request)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated, empty store."""
    store = open_store(database_url)
    yield store
    store.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def shared_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One migrated store per module and backend, for tests that each work on jobs of their own."""
    urls = _fresh_database_url(request.param, tmp_path_factory.mktemp("store"), request)
    store = open_store(next(urls))
    yield store
    store.dispose()
    next(urls, None)
