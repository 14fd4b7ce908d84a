"""`llmplan jobs` and `llmplan show` against a real SQLite store (the store tests cover PostgreSQL)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from llmplan.cli.jobs import parse_since
from llmplan.cli.main import cli
from llmplan.runtime.store.db import VERSION_TABLE
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.models import Job
from llmplan.runtime.store.repository import (
    Artifacts,
    JobFailure,
    JobSpec,
    JobUpdate,
    MeasuredResults,
    MetricPoint,
    Placement,
    PlanRecord,
    RayIds,
    create_job,
    record_metrics,
    transition,
)
from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

GiB = 2**30
NOW = datetime.now(timezone.utc)


def spec(name: str, kind: JobKind = JobKind.FINETUNE, model: str = "meta-llama/Llama-3.1-8B") -> JobSpec:
    plan = PlanRecord(plan={"strategy": "lora", "estimate": {"weights": 16 * GiB}},
                      memory_per_gpu_bytes=20 * GiB, tokens_per_s=3100.0)
    return JobSpec(name=name, kind=kind, model=model, submitter="alice", request={"epochs": 1}, plan=plan)


def backdate(engine: sa.Engine, job_id: int, moment: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(sa.update(Job).where(Job.id == job_id).values(created_at=moment))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Four jobs: an old failed inference, a succeeded fine-tune with metrics, a queued and a cancelled one."""
    path = tmp_path_factory.mktemp("cli") / "history.db"
    engine = open_store(str(path))
    old = create_job(engine, spec("qwen-serve", JobKind.INFER, "Qwen/Qwen2-7B-Instruct")).id
    transition(engine, old, JobStatus.FAILED, failure=JobFailure(ErrorClass.OOM, "CUDA out of memory"))
    backdate(engine, old, NOW - timedelta(days=10))

    done = create_job(engine, spec("sft-llama")).id
    transition(engine, done, JobStatus.SCHEDULED, update=JobUpdate(ray=RayIds(placement_group_id="pg-1")))
    transition(engine, done, JobStatus.RUNNING, update=JobUpdate(placement=Placement("gpu-3", (0, 1))))
    record_metrics(engine, done, [MetricPoint(step=10 * i, loss=2.5 * math.exp(-i / 20) + 0.8) for i in range(100)])
    transition(engine, done, JobStatus.SUCCEEDED, update=JobUpdate(
        results=MeasuredResults((19 * GiB, 18 * GiB), tokens_per_s=2870.0, final_loss=0.81),
        artifacts=Artifacts(output_dir="/out/sft", adapter_path="/out/sft/adapter", log_path="/out/sft/log.txt"),
    ))
    backdate(engine, done, NOW - timedelta(hours=5))

    queued = create_job(engine, spec("dpo-mistral", model="mistralai/Mistral-7B-v0.3")).id
    backdate(engine, queued, NOW - timedelta(hours=2))
    cancelled = create_job(engine, spec("sft-llama-2")).id
    transition(engine, cancelled, JobStatus.CANCELLED, message="cancelled by bob")
    backdate(engine, cancelled, NOW - timedelta(hours=1))
    engine.dispose()
    yield {"db": str(path), "old": old, "done": done, "queued": queued, "cancelled": cancelled}


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def run_on(history: dict[str, object], *args: str) -> Result:
    return run(*args, "--db", str(history["db"]))


def listed_ids(result: Result) -> list[int]:
    assert result.exit_code == 0, result.output
    return [job["id"] for job in json.loads(result.stdout)]


def assert_one_line_error(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


# ---- llmplan jobs -------------------------------------------------------------------------------
def test_jobs_lists_newest_first_in_a_table(history: dict[str, object]) -> None:
    result = run_on(history, "jobs")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "STATUS" in out and "CREATED (UTC)" in out
    positions = [out.index(name) for name in ("sft-llama-2 ", "dpo-mistral", "sft-llama ", "qwen-serve")]
    assert positions == sorted(positions)
    assert "gpu-3 GPU 0,1" in out and "oom" in out and "succeeded" in out


def test_jobs_limit_says_how_many_more_match(history: dict[str, object]) -> None:
    result = run_on(history, "jobs", "--limit", "2")
    assert result.exit_code == 0
    assert "2 of 4 matching jobs" in result.stdout
    assert listed_ids(run_on(history, "jobs", "--limit", "2", "--json")) == [history["cancelled"], history["queued"]]


def test_jobs_stops_counting_at_the_cap(history: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llmplan.cli.jobs.COUNT_CAP", 3)
    assert "2 of 3+ matching jobs" in run_on(history, "jobs", "--limit", "2").stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--status", "failed"), ["old"]),
        (("--status", "failed,cancelled"), ["cancelled", "old"]),
        (("--status", "queued", "--status", "SUCCEEDED"), ["queued", "done"]),
        (("--kind", "infer"), ["old"]),
        (("--model", "LLAMA"), ["cancelled", "done"]),
        (("--since", "3h"), ["cancelled", "queued"]),
        (("--since", "1w", "--kind", "finetune", "--model", "llama"), ["cancelled", "done"]),
        (("--since", (NOW - timedelta(days=1)).date().isoformat()), ["cancelled", "queued", "done"]),
    ],
)
def test_jobs_filters(history: dict[str, object], args: tuple[str, ...], expected: list[str]) -> None:
    assert listed_ids(run_on(history, "jobs", *args, "--json")) == [history[key] for key in expected]


def test_jobs_json_has_every_column_in_iso_utc(history: dict[str, object]) -> None:
    jobs = json.loads(run_on(history, "jobs", "--json").stdout)
    done = next(job for job in jobs if job["id"] == history["done"])
    assert set(done) == set(Job.model_fields)
    assert done["status"] == "succeeded" and done["placement_gpus"] == [0, 1]
    assert datetime.fromisoformat(done["created_at"].replace("Z", "+00:00")).utcoffset() == timedelta(0)


def test_jobs_on_an_empty_database_says_so(tmp_path: Path) -> None:
    result = run("jobs", "--db", str(tmp_path / "new.db"))
    assert result.exit_code == 0 and "No jobs recorded" in result.stdout
    assert run("jobs", "--db", str(tmp_path / "new.db"), "--json").stdout.strip() == "[]"
    filtered = run("jobs", "--db", str(tmp_path / "new.db"), "--status", "failed")
    assert "No jobs match" in filtered.stdout


# ---- llmplan show -------------------------------------------------------------------------------
def test_show_compares_plan_and_measurements(history: dict[str, object]) -> None:
    result = run_on(history, "show", str(history["done"]))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"Job {history['done']}" in out and "sft-llama" in out and "succeeded" in out
    assert "Planned vs measured" in out
    assert "20.0 GiB" in out and "19.0 GiB" in out and "0.95x" in out  # memory, busiest GPU
    assert "3,100" in out and "2,870" in out and "0.93x" in out  # throughput
    assert "0.8100" in out  # final loss
    for fragment in ("gpu-3 GPU 0,1", "placement group pg-1", "/out/sft/adapter", "/out/sft/log.txt"):
        assert fragment in out
    for status in ("queued", "scheduled", "running", "succeeded"):
        assert status in out.split("Events", 1)[1]
    assert "Loss curve" in out and "steps 0-990 (100 points)" in out
    assert any(block in out for block in "▁▂▃▄▅▆▇█")


def test_show_a_failed_job_without_metrics(history: dict[str, object]) -> None:
    result = run_on(history, "show", str(history["old"]))
    assert result.exit_code == 0
    assert "oom: CUDA out of memory" in result.stdout
    assert "Loss curve" not in result.stdout


def test_show_json_has_job_comparison_events_and_metrics(history: dict[str, object]) -> None:
    document = json.loads(run_on(history, "show", str(history["done"]), "--json").stdout)
    assert document["job"]["id"] == history["done"]
    memory = document["planned_vs_measured"]["peak_memory_per_gpu_bytes"]
    assert (memory["planned"], memory["measured"]) == (20 * GiB, 19 * GiB)
    assert memory["measured_per_gpu"] == [19 * GiB, 18 * GiB]
    assert memory["measured_over_planned"] == pytest.approx(0.95)
    assert document["planned_vs_measured"]["tokens_per_s"]["measured_over_planned"] == pytest.approx(2870 / 3100)
    assert [e["to_status"] for e in document["events"]] == ["queued", "scheduled", "running", "succeeded"]
    assert len(document["metrics"]) == 100 and document["metrics"][0]["step"] == 0


# ---- where the database is ----------------------------------------------------------------------
def test_environment_variable_and_db_option(history: dict[str, object], tmp_path: Path) -> None:
    from_env = run("jobs", "--json", env={"LLMPLAN_DB": str(history["db"])})
    assert len(json.loads(from_env.stdout)) == 4
    overridden = run("jobs", "--json", "--db", str(tmp_path / "other.db"), env={"LLMPLAN_DB": str(history["db"])})
    assert json.loads(overridden.stdout) == []


def test_default_database_lives_in_the_home_directory(tmp_path: Path) -> None:
    result = run("jobs", env={"HOME": str(tmp_path), "LLMPLAN_DB": ""})
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".llmplan" / "llmplan.db").is_file()


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_job_is_bad_input(history: dict[str, object]) -> None:
    assert_one_line_error(run_on(history, "show", "999999"), 2, "no job 999999 in sqlite:///")
    assert_one_line_error(run_on(history, "show", "abc"), 2, "JOB must be a job id")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--status", "runing"), "unknown status 'runing'"),
        (("--kind", "train"), "unknown kind 'train'"),
        (("--limit", "0"), "must be positive"),
        (("--limit", "ten"), "not a whole number"),
        (("--since", "yesterday"), "cannot read 'yesterday'"),
    ],
)
def test_bad_options_are_bad_input(history: dict[str, object], args: tuple[str, ...], fragment: str) -> None:
    assert_one_line_error(run_on(history, "jobs", *args), 2, fragment)


@pytest.mark.parametrize(
    ("url", "exit_code", "fragment"),
    [
        ("mysql://u@h/db", 2, "unsupported database 'mysql'"),
        ("postgresql+psycopg://u@h", 2, "names no database"),
        ("sqlite://", 2, "in-memory"),
        ("postgresql+psycopg://nobody@127.0.0.1:9/llmplan", 1, "cannot use database postgresql+psycopg://nobody@"),
    ],
)
def test_bad_or_unreachable_databases(url: str, exit_code: int, fragment: str) -> None:
    for command in (("jobs",), ("show", "1")):
        assert_one_line_error(run(*command, "--db", url), exit_code, fragment)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("just notes " * 200)
    assert_one_line_error(run("jobs", "--db", str(path)), 1, "file is not a database")


def test_a_database_from_a_newer_llmplan(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    engine = open_store(str(path))
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :revision"), {"revision": "0042_future"})
    engine.dispose()
    assert_one_line_error(run("jobs", "--db", str(path)), 1, "written by a newer llmplan")


def test_since_reads_relative_and_absolute_times() -> None:
    now = datetime(2025, 6, 15, 12, 0, tzinfo=timezone.utc)
    assert parse_since("90m", now=now) == now - timedelta(minutes=90)
    assert parse_since("2w", now=now) == now - timedelta(weeks=2)
    assert parse_since("2025-06-01", now=now) == datetime(2025, 6, 1, tzinfo=timezone.utc)
    assert parse_since("2025-06-01T14:00Z", now=now) == datetime(2025, 6, 1, 14, tzinfo=timezone.utc)
    assert parse_since("2025-06-01T14:00+02:00", now=now) == datetime(2025, 6, 1, 12, tzinfo=timezone.utc)
