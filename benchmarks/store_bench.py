"""Benchmark the job store's history queries on a large database (a benchmark, not a test).

    python benchmarks/store_bench.py [--jobs 100000] [--repeat 7] [--postgres-url URL] [--explain]

Fills a fresh SQLite file (and, with --postgres-url or $LLMPLAN_TEST_POSTGRES_URL, a throw-away
schema on that PostgreSQL server) with synthetic jobs (a year of history, realistic status and model
mix, ~1 KB of request + plan JSON each, 4 events per job), then times, as medians over --repeat runs:

* the whole command, `llmplan jobs --limit 50` and a filtered `llmplan jobs`, in a fresh process
  (Python start-up and imports included: what a user waits for);
* the same queries in-process (list_jobs + count_jobs capped as the CLI caps it: what the database
  costs);
* `llmplan show` of one job.

Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmplan.cli.jobs import COUNT_CAP
from llmplan.runtime.store.db import parse_database_url
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.models import Job, JobEvent
from llmplan.runtime.store.reading import count_jobs
from llmplan.runtime.store.repository import JobFilter, list_jobs, list_query
from llmplan.runtime.store.status import ErrorClass, JobKind, JobStatus

BATCH = 5_000
MODELS = (
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-2-7b-hf",
    "mistralai/Mistral-7B-v0.3", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-1.5B",
    "google/gemma-2-9b", "google/gemma-2b", "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-medium-4k-instruct",
)
# status -> weight: a year of history is mostly finished jobs.
STATUS_MIX = {
    JobStatus.SUCCEEDED: 70, JobStatus.FAILED: 15, JobStatus.CANCELLED: 8, JobStatus.QUEUED: 3,
    JobStatus.SCHEDULED: 1, JobStatus.RUNNING: 2, JobStatus.CANCELLING: 1,
}
# The filtered query, as CLI arguments and as the JobFilter they become.
FILTERED_ARGS = ("--status", "failed", "--model", "llama", "--since", "30d", "--limit", "50")


@dataclass(frozen=True)
class Timing:
    label: str
    median_ms: float
    min_ms: float


# ---- synthetic history --------------------------------------------------------------------------
def synthetic_jobs(count: int, now: datetime, rng: random.Random) -> Iterator[dict[str, object]]:
    statuses, weights = zip(*STATUS_MIX.items(), strict=True)
    for index in range(count):
        created = now - timedelta(seconds=(count - index) * 365 * 86_400 / count)
        status = rng.choices(statuses, weights)[0]
        model = rng.choice(MODELS)
        started = created + timedelta(minutes=rng.randint(0, 30))
        finished = started + timedelta(minutes=rng.randint(5, 600))
        gpus = rng.choice(([0], [0, 1], [0, 1, 2, 3]))
        planned = rng.randint(8, 78) * 2**30
        yield {
            "name": f"job-{index}", "kind": JobKind.INFER if index % 5 == 0 else JobKind.FINETUNE,
            "status": status, "priority": rng.randint(0, 3), "submitter": f"user{index % 40}",
            "created_at": created, "model": model,
            "started_at": started if status is not JobStatus.QUEUED else None,
            "finished_at": finished if status.is_terminal() else None,
            "request": {"model": model, "dataset": f"s3://datasets/set-{index % 300}.jsonl", "epochs": 3,
                        "seq_len": 4096, "batch_size": 8, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                        "notes": "synthetic benchmark job " * 4},
            "plan": {"strategy": "lora", "precision": "bf16", "gpus": len(gpus), "micro_batch": 2,
                     "estimate": {"weights": planned // 2, "gradients": planned // 10, "optimizer": planned // 8,
                                  "activations": planned // 5, "kv_cache": 0, "overhead": planned // 20,
                                  "total_per_gpu": planned, "tokens_per_s": 3100.0}},
            "planned_memory_per_gpu_bytes": planned, "planned_tokens_per_s": 3100.0,
            "placement_node": f"gpu-{index % 16}", "placement_gpus": gpus,
            "peak_memory_per_gpu_bytes": [int(planned * 0.95)] * len(gpus) if status is JobStatus.SUCCEEDED else None,
            "measured_tokens_per_s": 2900.0 if status is JobStatus.SUCCEEDED else None,
            "final_loss": 0.8 if status is JobStatus.SUCCEEDED else None,
            "error_class": (ErrorClass.OOM if status is JobStatus.FAILED else
                            ErrorClass.CANCELLED if status is JobStatus.CANCELLED else None),
            "error_message": "CUDA out of memory" if status is JobStatus.FAILED else None,
            "attempt": 1,
        }


def events_for(job_id: int, job: dict[str, object]) -> list[dict[str, object]]:
    created = job["created_at"]
    assert isinstance(created, datetime)
    path = [(None, JobStatus.QUEUED), (JobStatus.QUEUED, JobStatus.SCHEDULED),
            (JobStatus.SCHEDULED, JobStatus.RUNNING), (JobStatus.RUNNING, job["status"])]
    return [{"job_id": job_id, "at": created + timedelta(minutes=step), "from_status": before, "to_status": after,
             "message": ""} for step, (before, after) in enumerate(path)]


def fill(engine: Engine, count: int) -> float:
    """Insert `count` jobs and their events in batches; returns seconds taken."""
    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    batch: list[dict[str, object]] = []
    for job in synthetic_jobs(count, now, rng):
        batch.append(job)
        if len(batch) == BATCH:
            insert_batch(engine, batch)
            batch = []
    if batch:
        insert_batch(engine, batch)
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")  # fresh statistics, as a long-lived database has
    return time.perf_counter() - started


def insert_batch(engine: Engine, jobs: list[dict[str, object]]) -> None:
    with engine.begin() as connection:
        ids = connection.execute(sa.insert(Job).returning(Job.id, sort_by_parameter_order=True), jobs).scalars().all()
        events = [event for job_id, job in zip(ids, jobs, strict=True) for event in events_for(job_id, job)]
        connection.execute(sa.insert(JobEvent), events)


# ---- timing -------------------------------------------------------------------------------------
def median_of(label: str, repeat: int, action: Callable[[], object]) -> Timing:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return Timing(label, statistics.median(samples), min(samples))


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("llmplan")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmplan.cli.main"]


def run_cli(url: str, *args: str) -> Callable[[], object]:
    command = [*cli_command(), *args, "--db", url]

    def action() -> None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})

    return action


def bench_backend(name: str, url: str, jobs: int, repeat: int, explain: bool) -> tuple[float, list[Timing]]:
    engine = open_store(url)
    fill_s = fill(engine, jobs)
    since = datetime.now(timezone.utc) - timedelta(days=30)
    filtered = JobFilter(statuses=(JobStatus.FAILED,), model="llama", since=since, limit=50)
    newest = JobFilter(limit=50)
    some_job = list_jobs(engine, JobFilter(limit=1))[0].id
    if explain:
        print_plans(engine, newest, filtered)
    timings = [
        median_of(f"{name}: `llmplan jobs --limit 50` (process)", repeat, run_cli(url, "jobs", "--limit", "50")),
        median_of(f"{name}: `llmplan jobs {' '.join(FILTERED_ARGS)}` (process)", repeat,
                  run_cli(url, "jobs", *FILTERED_ARGS)),
        median_of(f"{name}: `llmplan show {some_job}` (process)", repeat, run_cli(url, "show", str(some_job))),
        median_of(f"{name}: newest 50 + count (in-process)", repeat,
                  lambda: (list_jobs(engine, newest), count_jobs(engine, newest, at_most=COUNT_CAP))),
        median_of(f"{name}: filtered 50 + count (in-process)", repeat,
                  lambda: (list_jobs(engine, filtered), count_jobs(engine, filtered, at_most=COUNT_CAP))),
    ]
    engine.dispose()
    return fill_s, timings


def print_plans(engine: Engine, *filters: JobFilter) -> None:
    for job_filter in filters:
        statement = list_query(job_filter)
        compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
        prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(prefix + str(compiled)).all()
        print(f"-- {engine.dialect.name} plan for {job_filter}:", file=sys.stderr)
        for row in rows:
            print("   ", " | ".join(str(part) for part in row), file=sys.stderr)


# ---- PostgreSQL scratch schema ------------------------------------------------------------------
def postgres_scratch_url(server_url: str) -> tuple[str, Callable[[], None]]:
    url = parse_database_url(server_url)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    schema = f"llmplan_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.schema.CreateSchema(schema))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()

    scratch = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return scratch.render_as_string(hide_password=False), drop


def postgres_version(url: str) -> str:
    engine = sa.create_engine(parse_database_url(url))
    with engine.connect() as connection:
        version = str(connection.exec_driver_sql("SHOW server_version").scalar())
    engine.dispose()
    return version


# ---- report -------------------------------------------------------------------------------------
def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"


def report(jobs: int, repeat: int, fills: dict[str, float], timings: list[Timing], postgres: str | None) -> str:
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {machine_line()}"
        + (f", PostgreSQL {postgres} (local, loopback)" if postgres else "") + ".",
        f"{jobs:,} jobs ({4 * jobs:,} events); median (min) of {repeat} runs.",
        "",
        "| what | median | min |",
        "|---|---:|---:|",
    ]
    lines += [f"| {t.label} | {t.median_ms:.1f} ms | {t.min_ms:.1f} ms |" for t in timings]
    lines.append("")
    lines += [f"Filling {name}: {seconds:.1f} s." for name, seconds in fills.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--postgres-url", default=os.environ.get("LLMPLAN_TEST_POSTGRES_URL"))
    parser.add_argument("--explain", action="store_true", help="print the query plans to stderr")
    args = parser.parse_args()

    fills: dict[str, float] = {}
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="llmplan-bench-") as scratch:
        sqlite_url = f"sqlite:///{Path(scratch) / 'bench.db'}"
        fills["SQLite"], measured = bench_backend("SQLite", sqlite_url, args.jobs, args.repeat, args.explain)
        timings += measured
    postgres = None
    if args.postgres_url:
        postgres = postgres_version(args.postgres_url)
        url, drop = postgres_scratch_url(args.postgres_url)
        try:
            fills["PostgreSQL"], measured = bench_backend("PostgreSQL", url, args.jobs, args.repeat, args.explain)
            timings += measured
        finally:
            drop()
    baseline = median_of("start-up and imports only: `python -c 'import llmplan.cli.jobs'` (process)", args.repeat,
                         lambda: subprocess.run([sys.executable, "-c", "import llmplan.cli.jobs"], check=True))
    print(report(args.jobs, args.repeat, fills, [*timings, baseline], postgres))


if __name__ == "__main__":
    main()
