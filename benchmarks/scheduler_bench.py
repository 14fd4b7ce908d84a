"""Scheduler benchmarks (CPU only; results in benchmarks/results/scheduler-cpu.json, BENCHMARKS.md).

1. submit -> running on an idle local cluster: `llmplan submit finetune` (SmolLM2-135M, LoRA, CPU) as a user
   runs it, without $LLMPLAN_RAY_ADDRESS, so the first submission also starts llmplan's local Ray head.
   Measured: the command's wall time until it prints the id, and from its start to the job's `running`
   event (the driver actor placed, the model resolved, Ray Train about to start).
2. admission throughput: 1,000 queued GPU jobs in a real SQLite store, a cluster of declared resources
   (16 nodes x 8 GPUs x 80 GiB), the scheduler's own admission step (`queued_jobs` -> `admissions` ->
   `record_admission`, the code the scheduler actor runs each cycle) until the queue drains; each admitted
   job ends a few cycles later (its own writes, not timed). Ray actor start-up is not in this figure: it is
   in (1).

    python benchmarks/scheduler_bench.py [--out benchmarks/results/scheduler-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from llmplan.planner.plan import FinetunePlan
from llmplan.runtime.jobs.admission import GpuSlot, Reservation
from llmplan.runtime.jobs.scheduler import RUNNER_KEY, SCHEDULER_RUNNER, admissions, queued_jobs, record_admission
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, PlanRecord, create_job, get_job, transition

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "alpaca_llmplan.jsonl"
LLMPLAN = str(Path(sys.executable).with_name("llmplan"))


# ---- 1. submit -> running ---------------------------------------------------------------------------------
def submit_to_running(work: Path, runs: int) -> list[dict]:
    env = {**os.environ, "LLMPLAN_DB": f"sqlite:///{work / 'jobs.db'}", "LLMPLAN_JOBS_DIR": str(work / "jobs"),
           "LLMPLAN_RAY_HEAD_FILE": str(work / "ray-head")}
    env.pop("LLMPLAN_RAY_ADDRESS", None)
    results = []
    try:
        for index in range(runs):
            started = time.time()
            done = subprocess.run([LLMPLAN, "submit", "finetune", "--model", "smollm2-135m-instruct", "--data",
                                   str(DATA), "--micro-batch", "1", "--batch-size", "1", "--seq-len", "64",
                                   "--max-steps", "2", "--json"], capture_output=True, text=True, env=env, check=True)
            returned = time.time()
            job_id = json.loads(done.stdout)["id"]
            engine = open_store(env["LLMPLAN_DB"])
            while (job := get_job(engine, job_id)).started_at is None:
                time.sleep(0.05)
            running = job.started_at.timestamp()
            while not get_job(engine, job_id).status.is_terminal():
                time.sleep(0.2)  # one job at a time: each submission finds the cluster idle
            engine.dispose()
            results.append({"run": index, "local_head_started": index == 0,
                            "command_s": round(returned - started, 2), "submit_to_running_s": round(running - started, 2)})
            print(results[-1], flush=True)
    finally:
        subprocess.run([LLMPLAN, "cluster", "stop"], env=env, capture_output=True)
    return results


# ---- 2. admission throughput --------------------------------------------------------------------------------
def gpu_plan(gpus: int, gib: int) -> dict:
    return FinetunePlan(model="Llama-2-7B", model_name="Llama-2-7B", device="cuda", method="lora", precision="bf16-true",
                        micro_batch=1, grad_accum=1, workers=gpus, backend="ddp" if gpus > 1 else "single", zero=0,
                        offload="none", gradient_checkpointing=False, optimizer="adamw", seq_len=512, lora_r=8,
                        lora_targets=("q_proj",), estimated_peak_bytes=gib * GIB, estimated_device_bytes=gib * GIB,
                        estimated_tokens_per_s=None).to_dict()


def admission_throughput(work: Path, jobs: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    engine = open_store(f"sqlite:///{work / 'admission.db'}")
    for _ in range(jobs):
        gpus, gib = rng.choice([(1, 20), (1, 40), (1, 70), (2, 40), (4, 60), (8, 70)])
        create_job(engine, JobSpec(name="bench", kind=JobKind.FINETUNE, model="Llama-2-7B", submitter="bench",
                                   request={RUNNER_KEY: SCHEDULER_RUNNER}, plan=PlanRecord(gpu_plan(gpus, gib)),
                                   priority=rng.randint(0, 3)))
    slots = [GpuSlot(f"node-{n:02d}", i, 80 * GIB) for n in range(16) for i in range(8)]
    placed: dict[int, tuple[Reservation, int]] = {}  # job id -> (reservation, cycle it ends)
    admitted = cycles = 0
    scheduler_seconds = 0.0
    while True:
        started = time.perf_counter()
        waiting = queued_jobs(engine)
        decided = admissions(waiting, slots, [r for r, _ in placed.values()])
        for job, admission in decided:
            if record_admission(engine, job, admission, node=admission.node_id or "", node_ip=None, ray_job_id=None, actor_id=None):
                placed[job.id] = (admission.reservation(), cycles + rng.randint(1, 5))
                admitted += 1
        scheduler_seconds += time.perf_counter() - started
        cycles += 1
        for job_id in [j for j, (_, ends) in placed.items() if ends <= cycles]:
            transition(engine, job_id, JobStatus.RUNNING)
            transition(engine, job_id, JobStatus.SUCCEEDED)
            del placed[job_id]
        if not waiting and not placed:
            break
    engine.dispose()
    return {"queued_jobs": jobs, "cluster": "16 nodes x 8 GPUs x 80 GiB (declared)", "cycles": cycles,
            "admitted": admitted, "scheduler_seconds": round(scheduler_seconds, 2),
            "admissions_per_minute": round(admitted / scheduler_seconds * 60),
            "mean_cycle_ms": round(scheduler_seconds / cycles * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheduler-cpu.json")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    import ray
    import sqlalchemy

    with tempfile.TemporaryDirectory(prefix="sb", dir="/tmp") as work:
        latency = submit_to_running(Path(work), args.runs)
        throughput = admission_throughput(Path(work), args.jobs)
    print(throughput)
    result = {"date": datetime.now(timezone.utc).date().isoformat(), "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
              "python": platform.python_version(), "ray": ray.__version__, "sqlalchemy": sqlalchemy.__version__,
              "store": "SQLite (WAL)", "submit_to_running": latency, "admission": throughput}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
