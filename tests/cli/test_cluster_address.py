"""A Ray address where nothing listens is refused at once, by every command that takes one, before anything is
recorded: one line, exit 1. Ray itself retried such an address for 3.5 minutes, printing its GCS warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.reading import count_jobs
from llmplan.runtime.store.repository import JobFilter, JobKind, JobSpec, JobStatus, create_job, transition

NOTHING_LISTENS = "127.0.0.1:1"
REFUSED = f"Error: cannot reach the Ray cluster at {NOTHING_LISTENS} (connection refused); start one there with "
GUARD_S = 60  # not a timing: old code hung past it


def llmplan(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "LLMPLAN_RAY_ADDRESS"}
    environment.update(LLMPLAN_DB=f"sqlite:///{tmp_path / 'jobs.db'}", LLMPLAN_JOBS_DIR=str(tmp_path / "jobs"), **env)
    return subprocess.run([str(Path(sys.executable).with_name("llmplan")), *args], capture_output=True, text=True,
                          env=environment, timeout=GUARD_S)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": str(i)}) + "\n" for i in range(8)))
    return path


def running_job(tmp_path: Path) -> int:
    """A job the scheduler placed (cancelling it needs the cluster)."""
    engine = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        job = create_job(engine, JobSpec(name="placed", kind=JobKind.FINETUNE, model="m", submitter="test",
                                         request={"runner": "scheduler"}))
        for status in (JobStatus.SCHEDULED, JobStatus.RUNNING):
            transition(engine, job.id, status)
        return job.id
    finally:
        engine.dispose()


def jobs_in_store(tmp_path: Path) -> int:
    engine = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        return count_jobs(engine, JobFilter())
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", [
    ["submit", "finetune", "--model", "smollm2-135m", "--data", "{data}"],
    ["submit", "infer", "--model", "smollm2-135m", "--prompt", "hello"],
    ["cluster"],
    ["ui", "--port", "0"],
])
def test_an_address_where_nothing_listens_is_refused_at_once_and_nothing_is_queued(
        tmp_path: Path, data: Path, command: list[str]) -> None:
    done = llmplan(tmp_path, *[part.format(data=data) for part in command], "--address", NOTHING_LISTENS)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(REFUSED) and done.stderr.count("\n") == 1, done.stderr
    assert "leave --address out" in done.stderr
    assert not (tmp_path / "jobs.db").exists() or jobs_in_store(tmp_path) == 0


def test_cancel_to_an_address_where_nothing_listens_is_refused_at_once(tmp_path: Path) -> None:
    job_id = running_job(tmp_path)
    done = llmplan(tmp_path, "cancel", str(job_id), "--address", NOTHING_LISTENS)
    assert (done.returncode, done.stderr.count("\n")) == (1, 1), done.stderr
    assert done.stderr.startswith(REFUSED), done.stderr


def test_the_address_variable_is_checked_the_same_way(tmp_path: Path) -> None:
    done = llmplan(tmp_path, "cluster", LLMPLAN_RAY_ADDRESS=NOTHING_LISTENS)
    assert (done.returncode, done.stderr.count("\n")) == (1, 1), done.stderr
    assert done.stderr.startswith(REFUSED) and "leave $LLMPLAN_RAY_ADDRESS out" in done.stderr, done.stderr
