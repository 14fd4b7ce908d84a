"""`llmplan show` and `jobs` say CPU things for CPU jobs, and name a scheduler's placement by the node's IP."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from llmplan.cli.main import cli
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import (
    JobSpec,
    JobUpdate,
    MeasuredResults,
    Placement,
    PlanRecord,
    create_job,
    transition,
)
from llmplan.runtime.store.status import JobKind, JobStatus

GiB = 2**30
NODE_ID = "5bb24dc46c0cc81bdb67e5797fd6cef8a1a0e3da3055758ec18b78ed"  # a Ray node id, as the scheduler records it


def job_on(engine, device: str, *, node: str, gpus: tuple[int, ...], running: str, node_ip: str | None = None) -> int:
    plan = PlanRecord(plan={"device": device, "model_name": "SmolLM2-135M-Instruct"}, memory_per_gpu_bytes=2 * GiB,
                      tokens_per_s=None)
    job = create_job(engine, JobSpec(name=f"sft on {device}", kind=JobKind.FINETUNE, model="SmolLM2-135M-Instruct",
                                     submitter="alice", request={}, plan=plan)).id
    transition(engine, job, JobStatus.SCHEDULED, update=JobUpdate(placement=Placement(node, gpus, node_ip)))
    transition(engine, job, JobStatus.RUNNING, message=running)
    transition(engine, job, JobStatus.SUCCEEDED, update=JobUpdate(results=MeasuredResults((GiB, GiB))))
    return job


def show(db: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--db", str(db)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_cpu_job_reports_memory_per_process_and_its_node_by_ip(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    engine = open_store(str(db))
    cpu = job_on(engine, "cpu", node=NODE_ID, gpus=(), running="on 192.0.2.2: model /models/smollm2")
    gpu = job_on(engine, "cuda", node=NODE_ID, gpus=(0, 1), running="model /models/smollm2")
    engine.dispose()

    on_cpu = show(db, "show", str(cpu))
    assert "peak memory per process" in on_cpu and "  process 1" in on_cpu and "GPU" not in on_cpu
    assert any(line.split() == ["placement", "192.0.2.2"] for line in on_cpu.splitlines())
    assert NODE_ID[12:] not in on_cpu.split("Request")[0]

    on_gpu = show(db, "show", str(gpu))
    assert "peak memory per GPU" in on_gpu and "  GPU 1" in on_gpu
    assert any(line.split() == ["placement", "node", NODE_ID[:12], "GPU", "0,1"] for line in on_gpu.splitlines())

    listed = show(db, "jobs")
    assert NODE_ID not in listed and f"node {NODE_ID[:12]}" in listed  # rows from before the store kept IPs


def test_a_job_the_scheduler_placed_shows_its_node_ip_in_jobs_and_show(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    engine = open_store(str(db))
    job = job_on(engine, "cuda", node=NODE_ID, gpus=(0,), running="model /models/smollm2", node_ip="192.0.2.9")
    engine.dispose()

    shown = show(db, "show", str(job))
    assert any(line.split() == ["placement", "192.0.2.9", "GPU", "0"] for line in shown.splitlines()), shown
    listed = show(db, "jobs")
    assert "192.0.2.9 GPU 0" in listed and NODE_ID[:12] not in listed, listed
