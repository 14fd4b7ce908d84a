"""`llmplan submit infer ...`: record a job, start it detached, print its id (and follow it with --wait)."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time
from pathlib import Path

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.resolve import ModelConfigError, UnknownModelError

from .generate import announce_model, describe_plan, generation_options, jobs_dir, prepare
from .jobs import open_engine
from .options import print_json, user_errors

POLL_SECONDS = 0.5


@click.group("submit")
def submit() -> None:
    """Submit a job: it is recorded, runs on its own, and outlives this terminal."""


@submit.command("infer")
@click.option("--model", required=True, help="Catalog name, Hugging Face directory or Meta checkpoint directory.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several); or --input FILE.jsonl.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 1 if it failed.")
@generation_options
@user_errors(PlanError, UnknownModelError, ModelConfigError)
def submit_infer(model: str, prompts: tuple[str, ...], wait: bool, db_url: str | None, as_json: bool, **options) -> None:
    """Batch inference as a job: prints the job id and returns (or follows it with --wait)."""
    from llmplan.runtime import inference_job
    from llmplan.runtime.store.db import database_url_from_environment
    from llmplan.runtime.store.repository import Artifacts, JobUpdate, update_job

    plan, inputs = prepare(model, prompts, **options)
    announce_model(plan.model)
    with open_engine(db_url) as (engine, _):
        job = inference_job.submit(engine, plan, inputs, name=f"infer {plan.model_name}", submitter=getpass.getuser())
        log = start_detached(job.id, database_url_from_environment(db_url), jobs_dir())
        update_job(engine, job.id, JobUpdate(artifacts=Artifacts(log_path=str(log))))
        if as_json and not wait:
            print_json({"id": job.id, "plan": plan.to_dict(), "log": str(log)})
            return
        click.echo(f"job {job.id} submitted: {describe_plan(plan)}; log {log}", err=True)
        if not as_json:
            click.echo(job.id)
        if wait:
            final = follow(engine, job.id)
            if as_json:
                print_json({"id": job.id, "status": final.status.value, "output_dir": final.output_dir,
                            "error": final.error_message})
            if final.status.value != "succeeded":
                raise SystemExit(1)


def start_detached(job_id: int, db_url: str, folder: Path) -> Path:
    """Run the job in its own process session, so closing this terminal does not stop it."""
    log = folder / str(job_id) / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "llmplan.runtime.inference_job", str(job_id), "--db", db_url, "--jobs-dir", str(folder)]
    with log.open("ab") as sink:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return log


def follow(engine, job_id: int):
    """Print each status the job reaches until it ends; return the final record."""
    from llmplan.runtime.store.repository import get_job

    seen = None
    while True:
        job = get_job(engine, job_id)
        if job.status != seen:
            seen = job.status
            click.echo(f"job {job_id}: {job.status.value}", err=True)
        if job.status.is_terminal():
            if job.error_message:
                click.echo(f"job {job_id}: {job.error_class}: {job.error_message}", err=True)
            return job
        time.sleep(POLL_SECONDS)
