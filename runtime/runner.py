"""The entry point of a detached job runner (`python -m llmplan.runtime.<kind>_job JOB --db URL`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def detached_main(argv: Sequence[str] | None, description: str, run_recorded: Callable[..., Any],
                  *, needs_jobs_dir: bool = False) -> int:
    """Run one recorded job from the store and print how it ended; exit 0 only if it succeeded."""
    from llmplan.runtime.store.db import open_store
    from llmplan.runtime.store.status import JobStatus

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("job_id", type=int)
    parser.add_argument("--db", required=True)
    if needs_jobs_dir:
        parser.add_argument("--jobs-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    extra = {"jobs_dir": args.jobs_dir} if needs_jobs_dir else {}
    outcome = run_recorded(open_store(args.db), args.job_id, **extra)
    print(f"job {outcome.job_id}: {outcome.status.value}" + (f": {outcome.error}" if outcome.error else ""), flush=True)
    return 0 if outcome.status is JobStatus.SUCCEEDED else 1
