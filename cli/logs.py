"""`llmplan logs JOB [--follow]`: the output of a job's runner process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .jobs import db_option, open_engine
from .options import JOB_ID, UserError

POLL_SECONDS = 0.5


@click.command("logs")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
@db_option
def logs(job_id: int, follow: bool, db_url: str | None) -> None:
    """Print a job's log; with --follow, keep printing until the job ends."""
    from llmplan.runtime.store.repository import get_job

    with open_engine(db_url) as (engine, _):
        job = get_job(engine, job_id)
        while follow and not job.log_path and not job.status.is_terminal():
            time.sleep(POLL_SECONDS)  # queued: the log starts when its driver does
            job = get_job(engine, job_id)
        if not job.log_path:
            if job.status.value == "queued":
                raise UserError(f"job {job_id} is queued: its log starts when it runs (`llmplan logs {job_id} --follow` waits)")
            raise UserError(f"job {job_id} has no log: it ran in the foreground (llmplan generate / chat); "
                            f"see `llmplan show {job_id}`")
        path = Path(job.log_path)
        position = copy_new(path, 0)
        while follow and not get_job(engine, job_id).status.is_terminal():
            time.sleep(POLL_SECONDS)
            position = copy_new(path, position)
        copy_new(path, position)


def copy_new(path: Path, position: int) -> int:
    """Write what the log gained since `position` to stdout; return the new position."""
    if not path.exists():
        return position
    with path.open("rb") as source:
        source.seek(position)
        chunk = source.read()
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return position + len(chunk)
