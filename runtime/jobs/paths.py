"""Where jobs keep their logs and default outputs: $LLMPLAN_JOBS_DIR, else ~/.llmplan/jobs.

Each job store (database) has a folder of its own there, named by a short hash of its URL, so that job 1
of one store never shares a folder (or a log) with job 1 of another: <jobs dir>/<store key>/<job id>/.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

JOBS_DIR_ENV = "LLMPLAN_JOBS_DIR"
DEFAULT_JOBS_DIR = Path("~/.llmplan/jobs")
LOG_NAME = "log.txt"


def jobs_dir() -> Path:
    return Path(os.environ.get(JOBS_DIR_ENV) or DEFAULT_JOBS_DIR).expanduser()


def store_key(db_url: str) -> str:
    """A short, stable name for a job store: the first 12 hex digits of its URL's SHA-1."""
    return hashlib.sha1(db_url.encode()).hexdigest()[:12]


def store_jobs_dir(db_url: str) -> Path:
    """<jobs dir>/<store key>: the folder of one job store's jobs (`db_url` as every process opens it)."""
    return jobs_dir() / store_key(db_url)


def job_folder(jobs_root: str | Path | None, job_id: int) -> Path:
    """<jobs root>/<job id>: `jobs_root` as the job's submission recorded it, else this process's jobs dir
    (jobs recorded before stores had folders of their own)."""
    return (Path(jobs_root).expanduser() if jobs_root else jobs_dir()) / str(job_id)


def default_output(jobs_root: Path, task: str, model_name: str) -> Path:
    """A new job's default output folder: <jobs root>/<task>/<model>-<date>-<time>-<random>, unique per job
    even for submissions in the same second."""
    return jobs_root / task / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
