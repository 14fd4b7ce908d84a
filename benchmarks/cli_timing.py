"""Wall time of the planning commands as a user runs them: a fresh process each time, best of N.

    python benchmarks/cli_timing.py            # best of 5
    python benchmarks/cli_timing.py --repeat 9

Times `llmplan fit 7B --gpus 1` (and its --json form) and `llmplan estimate 7B`, through the installed
`llmplan` script next to this Python (else `python -m llmplan.cli.main`). Prints a markdown table for
BENCHMARKS.md and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ("llmplan fit 7B --gpus 1", ["fit", "7B", "--gpus", "1"]),
    ("llmplan fit 7B --gpus 1 --json", ["fit", "7B", "--gpus", "1", "--json"]),
    ("llmplan estimate 7B", ["estimate", "7B"]),
)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    base = launcher()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"best of {args.repeat} fresh processes\n")
    print("| command | best | median |")
    print("|---|---:|---:|")
    for label, command in COMMANDS:
        times = sorted(time_once(base + command) for _ in range(args.repeat))
        print(f"| `{label}` | {times[0]:.2f} s | {times[len(times) // 2]:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
