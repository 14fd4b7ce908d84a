"""Wall time of llmplan's commands as a user runs them: a fresh process each time, best of N.

    python benchmarks/cli_timing.py            # best of 5
    python benchmarks/cli_timing.py --repeat 9
    python benchmarks/cli_timing.py --generate # also `generate` of 8 tokens, repeated: time to first token

Times `llmplan --help`, `fit 7B --gpus 1` (and its --json form), `estimate 7B`, and `jobs` / `show 1` on a job
store of one finished job in a temporary folder, through the installed `llmplan` script next to this Python
(else `python -m llmplan.cli.main`). With --generate, `llmplan generate smollm2-135m-instruct` (pulled first)
runs --repeat times in a row: the first starts llmplan's local Ray head (if none runs) and the warm replica;
the others find it. Prints markdown tables for BENCHMARKS.md and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
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


def time_once(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def first_output_and_end(argv: list[str]) -> tuple[float, float]:
    """Seconds to the first byte on stdout (the first token, streamed) and to the command's end."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdout.read(1)
    first = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode})")
    return first, time.perf_counter() - started


def one_finished_job(db_url: str) -> None:
    """A job store with one succeeded fine-tuning job, for `jobs` and `show` to read."""
    from llmplan.runtime.store.db import open_store
    from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, transition

    engine = open_store(db_url)
    job = create_job(engine, JobSpec(name="bench", kind=JobKind.FINETUNE, model="SmolLM2-135M", submitter="bench",
                                     request={"task": "finetune"}))
    for status in (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        transition(engine, job.id, status)
    engine.dispose()


def time_generate(base: list[str], repeat: int) -> None:
    print("\n| `llmplan generate smollm2-135m-instruct ... --max-new-tokens 8` | first token | end |")
    print("|---|---:|---:|")
    subprocess.run(base + ["models", "pull", "smollm2-135m-instruct"], check=True, capture_output=True)
    for run in range(1, repeat + 1):
        first, end = first_output_and_end(base + GENERATE)
        print(f"| run {run}{' (cold)' if run == 1 else ''} | {first:.2f} s | {end:.2f} s |")


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
    print("| command | best | median |")
    print("|---|---:|---:|")
    for label, command in COMMANDS:
        times = sorted(time_once(base + command) for _ in range(args.repeat))
        print(f"| `{label}` | {times[0]:.2f} s | {times[len(times) // 2]:.2f} s |")
    if args.generate:
        time_generate(base, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
