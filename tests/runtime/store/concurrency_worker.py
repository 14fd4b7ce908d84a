"""One of the processes of test_store_concurrency: run as a script, prints a JSON summary.

usage: concurrency_worker.py DATABASE_URL WORKER TRANSITIONS JOB_IDS BARRIER_DIR

It waits until every worker is ready (files in BARRIER_DIR), then makes TRANSITIONS successful
moves on the shared jobs: it asks to toggle a job queued <-> scheduled *expecting the status it last
saw* (read from the database at the start, then learned from its own moves and refusals), which is
the read-decide-write pattern that loses updates when the store gets it wrong; a refusal because
another worker got there first is counted. Every tenth attempt it also asks for a move that is
illegal from both statuses, which must be refused. Any other error (such as "database is locked")
ends the process with a traceback and a non-zero exit status.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.errors import IllegalTransitionError, StaleStatusError
from llmplan.runtime.store.repository import get_job, transition
from llmplan.runtime.store.status import JobStatus

TOGGLE = {JobStatus.QUEUED: JobStatus.SCHEDULED, JobStatus.SCHEDULED: JobStatus.QUEUED}
BARRIER_TIMEOUT_S = 120


def wait_for_everyone(barrier: Path, worker: int) -> None:
    (barrier / f"ready-{worker}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers never became ready")
        time.sleep(0.005)


def main(url: str, worker: int, transitions: int, job_ids: list[int], barrier: Path) -> dict[str, int]:
    engine = open_store(url)
    rng = random.Random(worker)
    done = stale = illegal_refused = attempts = 0
    wait_for_everyone(barrier, worker)
    last_seen = {job_id: JobStatus(get_job(engine, job_id).status) for job_id in job_ids}
    while done < transitions:
        attempts += 1
        job_id = rng.choice(job_ids)
        current = last_seen[job_id]
        if attempts % 10 == 0:
            try:
                transition(engine, job_id, JobStatus.SUCCEEDED, message=f"illegal from worker {worker}")
            except IllegalTransitionError:
                illegal_refused += 1
            else:
                raise AssertionError(f"job {job_id}: an illegal move to succeeded was applied")
        try:
            transition(engine, job_id, TOGGLE[current], expected_from=current, message=f"worker {worker}")
        except StaleStatusError as refused:
            stale += 1
            last_seen[job_id] = refused.actual
        else:
            done += 1
            last_seen[job_id] = TOGGLE[current]
    engine.dispose()
    return {"worker": worker, "done": done, "stale": stale, "illegal_refused": illegal_refused}


if __name__ == "__main__":
    url_arg, worker_arg, transitions_arg, jobs_arg, barrier_arg = sys.argv[1:6]
    summary = main(url_arg, int(worker_arg), int(transitions_arg), [int(j) for j in jobs_arg.split(",")],
                   Path(barrier_arg))
    print(json.dumps(summary))
