"""`llmplan cancel JOB`: a queued job is withdrawn at once; a placed one is stopped by the scheduler."""

from __future__ import annotations

import time

import click

from .cluster import cluster_errors, reachable_address
from .jobs import db_option, open_engine
from .options import parse_job_id
from .options import UserError, json_option, print_json

STOP_TIMEOUT_S = 60.0
POLL_SECONDS = 0.2


@click.command("cancel")
@click.argument("job_ref", metavar="JOB")
@click.option("--address", metavar="HOST:PORT", callback=reachable_address,
              help="Ray cluster [default: $LLMPLAN_RAY_ADDRESS, else the local head].")
@click.option("--no-wait", is_flag=True, help="Return once the cancel is recorded, without waiting for the stop.")
@db_option
@json_option
def cancel(job_ref: str, address: str | None, no_wait: bool, db_url: str | None, as_json: bool) -> None:
    """Cancel a job: queued, it never starts; running, its driver and workers are killed and its GPUs freed."""
    from llmplan.runtime.jobs.scheduler import cancel_job
    from llmplan.runtime.store.repository import get_job

    job_id = parse_job_id(job_ref)
    with open_engine(db_url) as (engine, _):
        status = get_job(engine, job_id).status
        if status.is_terminal():
            raise UserError(f"job {job_id} already ended: {status.value}")
        with cluster_errors():
            cancel_job(engine, job_id, address)
        final = get_job(engine, job_id) if no_wait else wait_until_ended(engine, job_id)
    if as_json:
        print_json({"id": job_id, "status": final.status.value})
    else:
        click.echo(f"job {job_id}: {final.status.value}")


def wait_until_ended(engine, job_id: int):
    from llmplan.runtime.store.repository import get_job

    deadline = time.monotonic() + STOP_TIMEOUT_S
    job = get_job(engine, job_id)
    while not job.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        job = get_job(engine, job_id)
    return job
