"""`llmplan ui` outlives its Ray cluster: with the head gone it still serves history, logs and plans, answers
503 for what needs Ray, and uses the cluster again once a head is back at its address.

Ray ends a driver whose cluster is unreachable for `gcs_rpc_server_reconnect_timeout_s` (60 s by default,
3 s here so that the test is short): the dashboard must never be that driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("ray")

from llmplan.runtime.jobs.scheduler import RUNNER_KEY, SCHEDULER_RUNNER  # noqa: E402
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, transition  # noqa: E402

from ..conftest import TEST_CACHE  # noqa: E402
from ..ray_nodes import start_node  # noqa: E402
from .test_dashboard import EXAMPLE_DATA, LLMPLAN, SMALL_RUN, Dashboard, wait_for_address  # noqa: E402

RECONNECT_TIMEOUT_S = 1  # Ray's own limit for a driver, set low for the dashboard's process


def placed_job(db: str) -> int:
    """A job of the scheduler's that is placed (scheduled): cancelling it wakes the scheduler through Ray."""
    engine = open_store(db)
    try:
        job = create_job(engine, JobSpec(name="placed", kind=JobKind.FINETUNE, model="Llama-2-7B", submitter="t",
                                         request={RUNNER_KEY: SCHEDULER_RUNNER}))
        transition(engine, job.id, JobStatus.SCHEDULED)
        return job.id
    finally:
        engine.dispose()


@pytest.mark.slow
def test_the_dashboard_serves_history_and_plans_while_ray_is_down_and_uses_it_again_when_back(tmp_path) -> None:
    head = start_node(cpus=1)
    port = int(head.address.rsplit(":", 1)[1])
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(EXAMPLE_DATA, root / "train.jsonl")
    site = Dashboard(url="", root=root, db=f"sqlite:///{tmp_path / 'jobs.db'}")
    env = {**os.environ, "LLMPLAN_DB": site.db, "LLMPLAN_JOBS_DIR": str(tmp_path / "jobs"),
           "LLMPLAN_CACHE": str(TEST_CACHE), "LLMPLAN_RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled",
           "RAY_gcs_rpc_server_reconnect_timeout_s": str(RECONNECT_TIMEOUT_S)}
    log = tmp_path / "ui.log"
    with log.open("w") as sink:
        process = subprocess.Popen([LLMPLAN, "ui", "--port", "0", "--root", str(root)], cwd=root, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
    try:
        site.url = wait_for_address(process, log)
        first = placed_job(site.db)
        assert site.call(f"/api/jobs/{first}/cancel", {}) == (200, {"id": first, "status": "cancelling"})

        head.kill()
        time.sleep(3 * RECONNECT_TIMEOUT_S)  # past the point where Ray ends a driver of the lost cluster
        assert process.poll() is None, log.read_text()[-2000:]
        status, jobs = site.call("/api/jobs")
        assert status == 200 and [job["id"] for job in jobs] == [first]
        assert site.call(f"/api/jobs/{first}")[0] == 200
        assert site.call(f"/api/jobs/{first}/log")[0] == 200
        status, plan = site.call("/api/plan", {"model": "7B", "gpu": "A100-80GB"})
        assert status == 200 and plan["feasible"]
        status, answer = site.call("/api/jobs", {"task": "finetune", **SMALL_RUN, "data": "train.jsonl"})
        assert status == 503 and f"the Ray cluster at {head.address} is unreachable" in answer["error"], answer
        second = placed_job(site.db)
        status, answer = site.call(f"/api/jobs/{second}/cancel", {})  # recorded; the scheduler acts when back
        assert (status, answer["status"]) == (200, "cancelling") and "unreachable" in answer["note"]

        head = start_node(cpus=1, port=port)
        third = placed_job(site.db)
        assert site.call(f"/api/jobs/{third}/cancel", {}) == (200, {"id": third, "status": "cancelling"})
        assert process.poll() is None
    finally:
        head.kill()
        process.terminate()
        process.wait(timeout=30)
