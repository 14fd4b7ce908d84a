"""The read path without SQLModel (`reading`, behind `llmplan jobs`/`show` and the dashboard's JSON): the tables it
reflects are typed as the SQLModel classes declare them, and its rows equal the repository's objects. SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmplan.runtime.store.columns import UTCDateTime
from llmplan.runtime.store.errors import UnknownJobError
from llmplan.runtime.store.models import Job, JobEvent, JobMetric
from llmplan.runtime.store.reading import (
    JobFilter,
    read_job_details,
    read_jobs,
    read_latest_metric,
    reflected_table,
)
from llmplan.runtime.store.repository import (
    Artifacts,
    JobFailure,
    JobUpdate,
    MeasuredResults,
    MetricPoint,
    Placement,
    create_job,
    get_job_details,
    latest_metric,
    list_jobs,
    record_metrics,
    transition,
)
from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

from .factory import GiB, job_spec

TABLES = (Job, JobEvent, JobMetric)


def kind_of(column_type: sa.types.TypeEngine) -> tuple[object, ...]:
    """What reading a column gives back: its enum, UTC-aware times, JSON documents, else the Python type."""
    if isinstance(column_type, sa.Enum):
        return ("enum", column_type.enum_class)
    if isinstance(column_type, UTCDateTime):
        return ("utc",)
    if isinstance(column_type, sa.JSON) or isinstance(getattr(column_type, "impl_instance", None), sa.JSON):
        return ("json",)
    return ("plain", column_type.python_type)


@pytest.mark.parametrize("table_class", TABLES, ids=lambda table_class: table_class.__tablename__)
def test_reflected_tables_are_typed_as_the_sqlmodel_classes_declare_them(engine: Engine, table_class: type) -> None:
    declared = table_class.__table__
    with engine.connect() as connection:
        reflected = reflected_table(connection, declared.name)
    assert {column.name: kind_of(column.type) for column in reflected.columns} == {
        column.name: kind_of(column.type) for column in declared.columns}


def columns_of(row: object, table_class: type) -> dict[str, object]:
    return {name: getattr(row, name) for name in table_class.__table__.columns.keys()}


def test_rows_read_without_sqlmodel_equal_the_repository_objects(engine: Engine) -> None:
    done = create_job(engine, job_spec(name="done")).id
    transition(engine, done, JobStatus.SCHEDULED)
    transition(engine, done, JobStatus.RUNNING, update=JobUpdate(placement=Placement("node-1", (0, 1), "10.0.0.7")))
    record_metrics(engine, done, [MetricPoint(step=step, loss=2.0 / (step + 1), tokens_per_s=100.0)
                                  for step in range(3)])
    transition(engine, done, JobStatus.SUCCEEDED, update=JobUpdate(
        results=MeasuredResults(peak_memory_per_gpu_bytes=(19 * GiB, 18 * GiB), tokens_per_s=2870.0, final_loss=0.5),
        artifacts=Artifacts(output_dir="/out", adapter_path="/out/adapter")))
    failed = create_job(engine, job_spec(name="failed", kind=JobKind.INFER)).id
    transition(engine, failed, JobStatus.FAILED, failure=JobFailure(ErrorClass.OOM, "out of memory"))

    for job_filter in (JobFilter(), JobFilter(statuses=(JobStatus.FAILED,)), JobFilter(kind=JobKind.FINETUNE)):
        assert [columns_of(row, Job) for row in read_jobs(engine, job_filter)] == [
            columns_of(job, Job) for job in list_jobs(engine, job_filter)]
    rows, objects = read_job_details(engine, done), get_job_details(engine, done)
    assert columns_of(rows.job, Job) == columns_of(objects.job, Job)
    assert rows.job.status is JobStatus.SUCCEEDED and rows.job.created_at.utcoffset().total_seconds() == 0
    assert [columns_of(row, JobEvent) for row in rows.events] == [columns_of(e, JobEvent) for e in objects.events]
    assert [columns_of(row, JobMetric) for row in rows.metrics] == [columns_of(m, JobMetric) for m in objects.metrics]
    assert columns_of(read_latest_metric(engine, done), JobMetric) == columns_of(latest_metric(engine, done), JobMetric)
    assert read_job_details(engine, failed).job.error_class is ErrorClass.OOM
    with pytest.raises(UnknownJobError):
        read_job_details(engine, failed + 1)
