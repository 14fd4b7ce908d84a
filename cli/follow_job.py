"""`llmplan submit --wait`: follow a queued job until it ends, and its re-planned retries after running out of memory."""

from __future__ import annotations

import time

import click

from llmplan.runtime.jobs.job_request import JobRequest

POLL_SECONDS = 0.5
RETRY_PATIENCE_S = 10.0


def follow(engine, job_id: int):
    """Follow the job until it ends (and its re-planned retries after running out of memory): its statuses,
    and for training a progress bar of optimizer steps. Returns the last attempt's final record."""
    from llmplan.runtime.store.status import ErrorClass

    while True:
        job = follow_one(engine, job_id)
        retry = next_attempt(engine, job) if job.error_class is ErrorClass.OOM else None
        if retry is None:
            return job
        click.echo(f"job {job_id} ran out of memory: re-planned as job {retry}", err=True)
        job_id = retry


def next_attempt(engine, job, patience_s: float = RETRY_PATIENCE_S) -> int | None:
    """The id of the job retrying `job`, waiting a little for the scheduler to create it."""
    from llmplan.runtime.store.repository import retry_of_job

    deadline = time.monotonic() + patience_s
    while (retry := retry_of_job(engine, job.id)) is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return retry


def follow_one(engine, job_id: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmplan.runtime.store.repository import get_job, latest_metric

    job = get_job(engine, job_id)
    total = (JobRequest.from_dict(job.request).config or {}).get("max_steps") if job.kind.value == "finetune" else \
        len(job.request.get("prompts") or ()) or None  # inference: metric points count the prompts done
    columns = [TextColumn("job {task.fields[job]}: {task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("job", total=total, job=job_id, status=job.status.value, detail="")
        while True:
            job = get_job(engine, job_id)
            metric = latest_metric(engine, job_id)
            detail = progress_detail(metric)
            progress.update(task, completed=metric.step if metric is not None else 0, status=job.status.value,
                            detail=detail)
            if job.status.is_terminal():
                break
            time.sleep(POLL_SECONDS)
    if job.error_message:
        click.echo(f"job {job_id}: {job.error_class}: {job.error_message}", err=True)
    return job


def progress_detail(metric) -> str:
    """The latest metric point: its loss (fine-tuning) or its tokens/s (inference)."""
    if metric is None:
        return ""
    if metric.loss is not None:
        return f"loss {metric.loss:.4f}"
    return f"{metric.tokens_per_s:,.0f} tokens/s" if metric.tokens_per_s else ""
