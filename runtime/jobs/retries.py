"""New attempts for jobs that ended badly, each a new job linked to the one it repeats (`retry_of`).

- Out of memory: the fine-tuning is re-planned one rung up the ladder of headroom (`planner.replan`)
  with the margin its model and card have earned by running out of memory before, at most
  `max_retries` times (the job's request; `llmplan submit --max-retries`).
- Lost with its Ray cluster or node: a fine-tuning job with a checkpoint continues from it.

Nothing here imports torch: the checkpoint layout is read from the file system.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmplan.runtime.store.repository import (
    JobFilter,
    JobStatus,
    PlanRecord,
    get_job,
    list_jobs,
    retry_job,
)
from llmplan.runtime.store.status import ErrorClass

from llmplan.runtime.jobs.job_request import JobRequest
from llmplan.runtime.train.train_config import CHECKPOINTS, STATE_FILE, TrainConfig

CHECKPOINT_GLOB = f"{CHECKPOINTS}/step-*/{STATE_FILE}"


def retry_after_oom(engine: Any, job_id: int) -> Any | None:
    """The re-planned retry of a fine-tuning job that ran out of memory; None when none is due or none fits."""
    from llmplan.planner.plan import FinetunePlan
    from llmplan.planner.replan import learned_margin, replan_after_oom
    from llmplan.planner.resolve import resolve_model

    job = get_job(engine, job_id)
    if job.status is not JobStatus.FAILED or job.error_class is not ErrorClass.OOM or job.kind.value != "finetune":
        return None
    request = JobRequest.from_dict(job.request)
    if job.attempt > request.max_retries:
        return None
    plan = FinetunePlan.from_dict(job.plan)
    margin = learned_margin(out_of_memory_count(engine, job.model, request.card))
    found = replan_after_oom(plan, resolve_model(plan.model).spec, request.planned_hardware(), margin)
    if found is None:
        print(f"job {job_id}: no plan with more headroom fits; not retried", flush=True)
        return None
    replanned, rung = found
    config = TrainConfig.from_dict(request.config)
    output_dir = f"{config.output_dir.rsplit('.attempt-', 1)[0]}.attempt-{job.attempt + 1}"
    config = TrainConfig.from_plan(replanned, data=config.data, output_dir=output_dir, **config.run_settings())
    stored = {**job.request, "config": config.to_dict(), "margin": margin}
    record = PlanRecord(replanned.to_dict(), replanned.estimated_device_bytes, replanned.estimated_tokens_per_s)
    retry = retry_job(engine, job_id, request=stored, plan=record,
                      message=f"retry of job {job_id} after out of memory: {rung.reason}, margin {margin:.0%}")
    return retry


def resume_after_loss(engine: Any, job_id: int) -> Any | None:
    """A lost fine-tuning job continued from its latest checkpoint; None for other jobs or without one."""
    job = get_job(engine, job_id)
    if job.kind.value != "finetune" or "config" not in job.request:
        return None
    config = TrainConfig.from_dict(job.request["config"])
    if not any(Path(config.output_dir).glob(CHECKPOINT_GLOB)):
        return None
    request = {**job.request, "config": dataclasses.replace(config, resume=True).to_dict()}
    retry = retry_job(engine, job_id, request=request,
                      message=f"job {job_id} was lost with its Ray cluster: resuming from its latest checkpoint")
    return retry


def out_of_memory_count(engine: Any, model: str, card: str) -> int:
    """How often jobs of `model` ran out of memory on `card` (the job store is the planner's memory)."""
    failed = list_jobs(engine, JobFilter(statuses=(JobStatus.FAILED,), model=model, limit=10_000))
    return sum(1 for job in failed if job.error_class is ErrorClass.OOM and job.model == model
               and JobRequest.from_dict(job.request).card == card)
