"""The migrations build exactly the schema models.py describes, keep data, and survive races."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from llmplan.runtime.store import migrate
from llmplan.runtime.store.db import SCHEMA_HEAD, VERSION_TABLE, create_store_engine, read_schema_revision
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.models import STORE_METADATA
from llmplan.runtime.store.repository import JobFilter, JobUpdate, Placement, create_job, get_job_details, list_jobs, transition
from llmplan.runtime.store.status import JobStatus

from .factory import job_spec


def schema_differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        return list(compare_metadata(context, STORE_METADATA))


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    assert schema_differences(engine) == []


def test_the_revision_chain_is_linear_and_ends_at_the_head() -> None:
    script = migrate.script_directory()
    assert isinstance(script, ScriptDirectory)
    assert script.get_heads() == [SCHEMA_HEAD]
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None  # one base
    assert all(len(r.nextrev) <= 1 for r in revisions)  # no branches


def test_upgrading_again_keeps_every_row(database_url: str) -> None:
    engine = open_store(database_url)
    job_id = create_job(engine, job_spec()).id
    transition(engine, job_id, JobStatus.SCHEDULED)
    before = get_job_details(engine, job_id)
    migrate.upgrade_to_head(engine)  # what every later llmplan does on open
    after = get_job_details(engine, job_id)
    assert after.job.model_dump() == before.job.model_dump()
    assert [e.model_dump() for e in after.events] == [e.model_dump() for e in before.events]
    engine.dispose()


def test_an_untouched_database_is_migrated_from_the_base(database_url: str) -> None:
    raw = create_store_engine(database_url)
    with raw.connect() as connection:
        assert read_schema_revision(connection) is None
    raw.dispose()
    engine = open_store(database_url)
    with engine.connect() as connection:
        assert read_schema_revision(connection) == SCHEMA_HEAD
        assert set(sa.inspect(connection).get_table_names()) >= {"job", "job_event", "job_metric", VERSION_TABLE}
    engine.dispose()


def test_processes_opening_a_new_database_together_migrate_it_once(database_url: str) -> None:
    code = (
        "import sys\n"
        "from llmplan.runtime.store.opening import open_store\n"
        "from llmplan.runtime.store.repository import create_job, JobSpec\n"
        "engine = open_store(sys.argv[1])\n"
        "create_job(engine, JobSpec(name='race', kind='finetune', model='m', submitter='s', request={}))\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code, database_url], stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], errors
    engine = open_store(database_url)
    with engine.connect() as connection:
        versions = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    assert versions == [SCHEMA_HEAD]
    assert len(list_jobs(engine, JobFilter())) == 4
    engine.dispose()


def test_a_row_placed_before_the_store_kept_node_ips_stays_readable(database_url: str) -> None:
    """0001 -> 0002 adds placement_node_ip: an old placed job keeps its node id and reads with no IP."""
    engine = open_store(database_url)
    job_id = create_job(engine, job_spec()).id
    transition(engine, job_id, JobStatus.SCHEDULED, update=JobUpdate(placement=Placement("a" * 56, (0,), "10.0.0.7")))
    with engine.begin() as connection:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0001_initial")
    engine.dispose()

    upgraded = open_store(database_url)
    job = get_job_details(upgraded, job_id).job
    assert (job.placement_node, job.placement_gpus, job.placement_node_ip) == ("a" * 56, [0], None)
    upgraded.dispose()
