"""alembic environment for the job store.

llmplan runs migrations itself (`llmplan.runtime.store.migrate.upgrade_to_head`), handing over a
connection that is already inside a locked transaction; alembic then migrates inside it. Developers
write a new revision with `llmplan.runtime.store.migrate.new_revision("message", url)`.
"""

from __future__ import annotations

from alembic import context

from llmplan.runtime.store.db import VERSION_TABLE, create_store_engine
from llmplan.runtime.store.models import STORE_METADATA


def run_migrations(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=STORE_METADATA,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given_connection = context.config.attributes.get("connection")
if given_connection is not None:
    run_migrations(given_connection)
else:
    engine = create_store_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()
