"""What every submit command shares: the queue options, the errors of a submission as one line, the
hand-off to `runtime.submission` and the report of the queued job (followed with --wait)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from llmplan.runtime.jobs.job_request import DEFAULT_MAX_RETRIES

from .cluster import reachable_address
from .options import PRIORITY, UserError

PRIORITY_HELP = "Higher runs first; equal priorities run in submission order."


def scheduling_options(command: Callable) -> Callable:
    options = [
        click.option("--priority", type=PRIORITY, default=0, show_default=True, help=PRIORITY_HELP),
        click.option("--max-retries", type=click.IntRange(0, 10), default=DEFAULT_MAX_RETRIES, show_default=True,
                     help="Re-planned retries after running out of memory."),
        click.option("--address", metavar="HOST:PORT", callback=reachable_address,
                     help="Ray cluster [default: $LLMPLAN_RAY_ADDRESS, else llmplan's local Ray head]."),
        click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 1 if it failed."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def submission_errors(function: Callable) -> Callable:
    """A submission's refusals as one line: bad input exits 2, a cluster that cannot run or be joined 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmplan.runtime.jobs.cluster import ClusterError
        from llmplan.runtime.jobs.submission import NeverFits, SubmissionError

        try:
            return function(*args, **kwargs)
        except SubmissionError as error:
            raise UserError(str(error)) from error
        except (NeverFits, ClusterError) as error:  # the system, not the input: exit 1
            raise click.ClickException(str(error)) from None

    return wrapper


@submission_errors
def queue_and_report(submission: Any, address: str | None, db_url: str | None, as_json: bool, wait: bool) -> None:
    """Queue the submission on the cluster at `address` (`runtime.submission`), then report it."""
    from llmplan.runtime.jobs.submission import (Cluster, FinetuneSubmission, InferenceResumption, InferenceSubmission,
                                            queue_finetune, queue_inference, queue_resumed_inference)

    from .jobs import open_engine

    queue = {FinetuneSubmission: queue_finetune, InferenceSubmission: queue_inference,
             InferenceResumption: queue_resumed_inference}[type(submission)]
    with open_engine(db_url) as (engine, _):
        cluster = Cluster(engine, address)
        job, plan = queue(cluster, submission, notify=lambda text: click.echo(text, err=True))
        report_queued(engine, job.id, plan, cluster.jobs_root, as_json, wait)


def report_queued(engine: Any, job_id: int, plan: Any, jobs_root: Any, as_json: bool, wait: bool) -> None:
    """Print the queued job's id (or JSON), and follow it when asked."""
    from llmplan.runtime.jobs.submission import queued_document

    from .follow_job import follow
    from .options import print_json

    queued = queued_document(job_id, plan, jobs_root)
    if as_json and not wait:
        print_json(queued)
        return
    click.echo(f"job {job_id} queued: {plan.summary()}; log {queued['log']}", err=True)
    if not as_json:
        click.echo(job_id)
    if wait:
        final = follow(engine, job_id)
        if as_json:
            print_json({"id": job_id, "status": final.status.value, "output_dir": final.output_dir,
                        "adapter_path": final.adapter_path, "final_loss": final.final_loss,
                        "error": final.error_message})
        if final.status.value != "succeeded":
            raise SystemExit(1)
