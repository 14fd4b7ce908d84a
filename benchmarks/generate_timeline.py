"""Where the time of a repeated `llmplan generate` goes, step by step, up to its first token and after.

    python benchmarks/generate_timeline.py            # 4 warm calls after a cold one
    python benchmarks/generate_timeline.py --repeat 6

Like `cli_timing.py --generate` (a Ray head of its own in a temporary folder, stopped at the end; SmolLM2 pulled
into $LLMPLAN_CACHE when set), but each warm call runs in a process that wraps the command's steps (imports,
planning, the store, Ray's connect, the warm replica, the first token, Ray's shutdown at exit) and reports when
each began and ended, in seconds since the process was started. Prints a markdown table: one row per mark, one
column per call.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time

from cli_timing import GENERATE, launcher

START_ENV = "LLMPLAN_TIMELINE_START"  # time.time() when the parent started the child
STEPS = (("llmplan.cli.generate", ("prepare_inference", "announce_model", "prompt_template", "run_on_a_server")),
         ("llmplan.runtime.infer.inference_job", ("submit", "start", "mark_scheduled", "_generate", "record_success")),
         ("llmplan.runtime.jobs.cluster", ("connect",)),
         ("llmplan.runtime.infer.ray_inference", ("start_replicas", "loaded")))


def child() -> None:
    """One `generate`, its steps timed (run with START_ENV set)."""
    import atexit
    import importlib

    offset = time.time() - float(os.environ[START_ENV])
    origin = time.perf_counter() - offset
    marks: list[tuple[float, str]] = []

    def mark(text: str) -> None:
        marks.append((time.perf_counter() - origin, text))

    def timed(module, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            mark(f"> {name}")
            try:
                return original(*args, **kwargs)
            finally:
                mark(f"< {name}")

        setattr(module, name, wrapper)

    mark("python started")
    import click

    from llmplan.cli import main as cli_main

    mark("click, llmplan.cli.main imported")
    modules = {}
    for module_name, names in STEPS:
        modules[module_name] = importlib.import_module(module_name)
        mark(f"{module_name} imported")
        for name in names:
            timed(modules[module_name], name)
    echo = click.echo

    def first_piece(message=None, *args, **kwargs):
        if kwargs.get("nl") is False and not any(text == "first token" for _, text in marks):
            mark("first token")
        return echo(message, *args, **kwargs)

    modules["llmplan.cli.generate"].click.echo = first_piece
    atexit.register(lambda: (mark("exit: after Ray's shutdown"),
                             print("\n".join(f"{at:.3f}\t{text}" for at, text in marks), file=sys.__stderr__)))
    sys.argv = ["llmplan", *GENERATE]
    try:
        cli_main.main()
    finally:
        mark("command returned")


def timeline(argv: list[str]) -> list[tuple[float, str]]:
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, START_ENV: repr(started)})
    ended = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    lines = [line.split("\t", 1) for line in done.stderr.splitlines() if "\t" in line]
    marks = [(float(at), text) for at, text in lines]
    return marks + [(ended, "process ended")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="warm calls after the cold one")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="llmplan-generate-timeline-")
    os.environ.update(LLMPLAN_RAY_HEAD_FILE=f"{folder}/ray-head", LLMPLAN_JOBS_DIR=f"{folder}/jobs",
                      LLMPLAN_DB=f"sqlite:///{folder}/jobs.db")
    base = launcher()
    subprocess.run(base + ["models", "pull", "smollm2-135m-instruct"], check=True, capture_output=True)
    try:
        subprocess.run(base + GENERATE, check=True, capture_output=True)  # cold: starts the head and the replica
        print(f"load average {os.getloadavg()[0]:.1f} before the warm calls\n")
        runs = [timeline([sys.executable, __file__, "--child"]) for _ in range(args.repeat)]
    finally:
        from llmplan.runtime.jobs.cluster import stop_local_head

        stop_local_head()
    print("| mark | " + " | ".join(f"call {n}" for n in range(1, len(runs) + 1)) + " |")
    print("|---|" + "---:|" * len(runs))
    for index, (_, text) in enumerate(runs[0]):
        print(f"| {text} | " + " | ".join(f"{run[index][0]:.2f} s" for run in runs) + " |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        sys.exit(main())
