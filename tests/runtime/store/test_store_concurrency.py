"""8 processes x 200 transitions on 4 shared jobs: no lost update, no illegal state, no lock error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from llmplan.runtime.store.repository import create_job, get_job_details
from llmplan.runtime.store.status import INITIAL_STATUS, JobStatus, is_allowed

from .factory import job_spec

WORKERS = 8
TRANSITIONS_PER_WORKER = 200
SHARED_JOBS = 4
WORKER_SCRIPT = Path(__file__).with_name("concurrency_worker.py")


def start_workers(database_url: str, job_ids: list[int], barrier: Path) -> list[subprocess.Popen[str]]:
    jobs_arg = ",".join(str(job_id) for job_id in job_ids)
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), database_url, str(worker), str(TRANSITIONS_PER_WORKER),
             jobs_arg, str(barrier)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for worker in range(WORKERS)
    ]


def release_when_ready(barrier: Path, processes: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < WORKERS:
        assert time.monotonic() < deadline, "workers did not start"
        assert all(process.poll() is None for process in processes), "a worker died before starting"
        time.sleep(0.01)
    (barrier / "go").touch()


@pytest.mark.timeout(300)
def test_concurrent_transitions_lose_nothing(engine, database_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_ids = [create_job(engine, job_spec(name=f"shared-{i}")).id for i in range(SHARED_JOBS)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = start_workers(database_url, job_ids, barrier)
    try:
        release_when_ready(barrier, processes)
        outputs = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    failures = [(p.returncode, err) for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode != 0]
    assert failures == [], failures  # no "database is locked", no deadlock, no illegal move applied
    summaries = [json.loads(out) for out, _ in outputs]
    assert all(s["done"] == TRANSITIONS_PER_WORKER for s in summaries)
    assert all(s["illegal_refused"] > 0 for s in summaries)

    events_by_worker: Counter[str] = Counter()
    total_moves = 0
    for job_id in job_ids:
        details = get_job_details(engine, job_id)
        events = details.events
        assert (events[0].from_status, events[0].to_status) == (None, INITIAL_STATUS)
        for previous, event in zip(events, events[1:], strict=False):
            # A lost update would show as two moves from the same status in a row.
            assert event.from_status is previous.to_status, (job_id, previous, event)
            assert is_allowed(event.from_status, event.to_status)
        assert details.job.status is events[-1].to_status
        assert details.job.status in (JobStatus.QUEUED, JobStatus.SCHEDULED)
        total_moves += len(events) - 1
        events_by_worker.update(event.message for event in events[1:])

    assert total_moves == WORKERS * TRANSITIONS_PER_WORKER
    # Every move a worker was told succeeded is in the audit trail exactly once, under its name.
    assert events_by_worker == Counter({f"worker {s['worker']}": s["done"] for s in summaries})
