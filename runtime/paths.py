"""Where jobs keep their logs and default outputs: $LLMPLAN_JOBS_DIR, else ~/.llmplan/jobs (one folder per job)."""

from __future__ import annotations

import os
from pathlib import Path

JOBS_DIR_ENV = "LLMPLAN_JOBS_DIR"
DEFAULT_JOBS_DIR = Path("~/.llmplan/jobs")
LOG_NAME = "log.txt"


def jobs_dir() -> Path:
    return Path(os.environ.get(JOBS_DIR_ENV) or DEFAULT_JOBS_DIR).expanduser()


def job_folder(jobs_root: str | Path | None, job_id: int) -> Path:
    """<jobs dir>/<job id>: `jobs_root` as the job's submission recorded it, else this process's jobs dir."""
    return (Path(jobs_root).expanduser() if jobs_root else jobs_dir()) / str(job_id)
