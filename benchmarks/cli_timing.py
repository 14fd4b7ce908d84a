"""Wall time of llmplan's commands as a user runs them: a fresh process each time, best of N.

    python benchmarks/cli_timing.py            # best of 5
    python benchmarks/cli_timing.py --repeat 9
    python benchmarks/cli_timing.py --generate # also `generate` of 8 tokens, repeated: time to first token

Times `llmplan --help`, `fit 7B --gpus 1` (and its --json form), `estimate 7B`, and `jobs` / `show 1` on a job
store of one finished job in a temporary folder, through the installed `llmplan` script next to this Python
(else `python -m llmplan.cli.main`): wall time, and CPU time (user + system of the process and its children),
which a loaded machine changes less. With --generate, `llmplan generate smollm2-135m-instruct` (pulled first, into
$LLMPLAN_CACHE when set) runs --repeat times in a row, with a Ray head of its own (a head file in the temporary
folder, stopped at the end): the first starts that head and the warm replica; the others find the replica. Each
run's stderr lines are timed as they arrive, so the table says when the job was recorded and when the first
token came. Prints markdown tables for BENCHMARKS.md and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = (
    ("llmplan --help", ["--help"]),
    ("llmplan fit 7B --gpus 1", ["fit", "7B", "--gpus", "1"]),
    ("llmplan fit 7B --gpus 1 --json", ["fit", "7B", "--gpus", "1", "--json"]),
    ("llmplan estimate 7B", ["estimate", "7B"]),
    ("llmplan jobs", ["jobs"]),
    ("llmplan show 1", ["show", "1"]),
)
GENERATE = ["generate", "smollm2-135m-instruct", "The capital of France is", "--max-new-tokens", "8"]


def launcher() -> list[str]:
    script = Path(sys.executable).parent / "llmplan"
    if script.exists():
        return [str(script)]
    found = shutil.which("llmplan")
    return [found] if found else [sys.executable, "-m", "llmplan.cli.main"]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run in a fresh process."""
    cpu_before = children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, children_cpu_s() - cpu_before


@dataclass
class StreamedRun:
    first_token_s: float = 0.0
    end_s: float = 0.0
    stderr: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)


def streamed_run(argv: list[str]) -> StreamedRun:
    """Seconds to the first byte on stdout (the first token, streamed), to the command's end, and to each line
    it wrote on stderr."""
    run = StreamedRun()
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read_stderr() -> None:
        for line in process.stderr:
            run.stderr.append((time.perf_counter() - started, line.rstrip()))

    reader = threading.Thread(target=read_stderr)
    reader.start()
    process.stdout.read(1)
    run.first_token_s = time.perf_counter() - started
    process.stdout.read()
    code = process.wait()
    reader.join()
    run.end_s = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {[line for _, line in run.stderr]}")
    return run


def seconds_to(run: StreamedRun, prefix: str) -> str:
    return next((f"{at:.2f} s" for at, line in run.stderr if line.startswith(prefix)), "-")


def one_finished_job(db_url: str) -> None:
    """A job store with one succeeded fine-tuning job, for `jobs` and `show` to read."""
    from llmplan.runtime.store.opening import open_store
    from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, transition

    engine = open_store(db_url)
    job = create_job(engine, JobSpec(name="bench", kind=JobKind.FINETUNE, model="SmolLM2-135M", submitter="bench",
                                     request={"task": "finetune"}))
    for status in (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        transition(engine, job.id, status)
    engine.dispose()


def time_generate(base: list[str], repeat: int, folder: str) -> None:
    os.environ["LLMPLAN_RAY_HEAD_FILE"] = f"{folder}/ray-head"  # a head of its own, started by the first run
    os.environ["LLMPLAN_JOBS_DIR"] = f"{folder}/jobs"
    subprocess.run(base + ["models", "pull", "smollm2-135m-instruct"], check=True, capture_output=True)
    print("\n| `llmplan generate smollm2-135m-instruct ... --max-new-tokens 8` | job recorded | first token | end |")
    print("|---|---:|---:|---:|")
    try:
        for number in range(1, repeat + 1):
            run = streamed_run(base + GENERATE)
            print(f"| run {number}{' (cold: starts Ray and the replica)' if number == 1 else ''} | "
                  f"{seconds_to(run, 'job ')} | {run.first_token_s:.2f} s | {run.end_s:.2f} s |", flush=True)
            if number == 1:
                print("\n".join(f"<!-- {at:6.2f} s  {line} -->" for at, line in run.stderr))
    finally:
        from llmplan.runtime.jobs.cluster import stop_local_head

        stop_local_head()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--generate", action="store_true", help="also time a repeated generate (needs the runtime)")
    args = parser.parse_args(argv)
    base = launcher()
    folder = tempfile.mkdtemp(prefix="llmplan-cli-timing-")
    os.environ["LLMPLAN_DB"] = f"sqlite:///{folder}/jobs.db"
    one_finished_job(os.environ["LLMPLAN_DB"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"best of {args.repeat} fresh processes\n")
    print(f"load average {os.getloadavg()[0]:.1f} before\n")
    print("| command | wall, best | wall, median | CPU, best |")
    print("|---|---:|---:|---:|")
    for label, command in COMMANDS:
        runs = [time_once(base + command) for _ in range(args.repeat)]
        walls = sorted(wall for wall, _ in runs)
        print(f"| `{label}` | {walls[0]:.2f} s | {walls[len(walls) // 2]:.2f} s | {min(cpu for _, cpu in runs):.2f} s |",
              flush=True)
    if args.generate:
        time_generate(base, args.repeat, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
