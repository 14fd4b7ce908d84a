"""Opening the job store: connect (`db`), then bring the schema to this llmplan's version (`migrate`) or refuse.

Above both `db` (connections) and `migrate` (alembic), so neither imports the other's caller; alembic is
imported only when the schema is not current (`jobs` and `show` on a current store never load it).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from llmplan.runtime.store.db import (SCHEMA_HEAD, create_store_engine, display_url, first_line, parse_database_url,
                                      read_schema_revision)
from llmplan.runtime.store.errors import DatabaseUnavailableError


def open_store(url_text: str) -> Engine:
    """Parse the URL, connect, and bring the schema to this llmplan's version (or refuse)."""
    url = parse_database_url(url_text)
    engine = create_store_engine(url)
    try:
        ensure_schema(engine)
    except DBAPIError as error:
        engine.dispose()
        raise DatabaseUnavailableError(f"cannot use database {display_url(url)}: {first_line(error.orig)}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def ensure_schema(engine: Engine) -> None:
    """Upgrade an older schema to SCHEMA_HEAD; raise SchemaTooNewError for a newer one."""
    with engine.connect() as connection:
        revision = read_schema_revision(connection)
    if revision == SCHEMA_HEAD:
        return
    # alembic is imported only when there is something to migrate (or to refuse).
    from llmplan.runtime.store.migrate import upgrade_to_head

    upgrade_to_head(engine)
