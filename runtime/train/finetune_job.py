"""One fine-tuning job, recorded from start to end: a recipe that reads top to bottom.

    job = submit(engine, plan, config)                    # queued, with the plan and the full TrainConfig
    outcome = run(engine, job.id, config)                 # scheduled -> running -> succeeded | failed
    # `llmplan submit finetune` queues the job; the scheduler's JobDriver runs run_recorded(engine, job.id)

Training runs in Ray Train workers (`runtime.train.ray_train.run_ray_train`), except one worker on the CPU:
that needs no process group, so the recipe runs in this process (`train.run_rank`), without Ray Train's
start-up. Each logged step reaches the job store as a metric while the job runs; the end records tokens/s, peak memory per GPU, the final loss
and the adapter or model directory, against the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmplan.planner.plan import FinetunePlan
from llmplan.runtime.store.repository import (
    Artifacts,
    JobKind,
    JobSpec,
    JobStatus,
    JobUpdate,
    MeasuredResults,
    MetricPoint,
    PlanRecord,
    create_job,
    get_job,
    record_metrics,
    transition,
)

from llmplan.runtime.jobs.failures import fail_job, mark_scheduled
from llmplan.runtime.train.train_config import TrainConfig


@dataclass(frozen=True)
class FinetuneOutcome:
    job_id: int
    status: JobStatus
    final_loss: float | None = None
    tokens_per_s: float | None = None
    artifact: str | None = None
    error: str | None = None


def submit(engine: Any, plan: FinetunePlan, config: TrainConfig, *, name: str, submitter: str,
           retry_of: int | None = None, priority: int = 0, scheduling: dict[str, Any] | None = None) -> Any:
    """Record the job as queued: the plan, and the config it fixes (everything needed to run or resume it).

    `scheduling` adds what the scheduler reads (max_retries, jobs_dir, the hardware planned for)."""
    record = PlanRecord(plan.to_dict(), plan.estimated_device_bytes, plan.estimated_tokens_per_s)
    request = {"task": "finetune", "config": config.to_dict(), **(scheduling or {})}
    if retry_of is not None:
        from llmplan.runtime.store.repository import retry_job

        return retry_job(engine, retry_of, submitter=submitter, request=request)
    return create_job(engine, JobSpec(name=name, kind=JobKind.FINETUNE, model=plan.model_name, submitter=submitter,
                                      request=request, plan=record, priority=priority))


def run(engine: Any, job_id: int, config: TrainConfig) -> FinetuneOutcome:
    """Run a queued job to its end; every failure ends the job as failed with its class, never raises."""
    try:
        config = _setup(engine, job_id, config)
        result = _train(engine, job_id, config)
        return _record_success(engine, job_id, config, result)
    except Exception as error:  # noqa: BLE001 - the job records whatever ended it
        return _record_failure(engine, job_id, error)


def run_recorded(engine: Any, job_id: int) -> FinetuneOutcome:
    job = get_job(engine, job_id)
    return run(engine, job_id, TrainConfig.from_dict(job.request["config"]))


# ---- setup ----------------------------------------------------------------------------------------------
def _setup(engine: Any, job_id: int, config: TrainConfig) -> TrainConfig:
    from llmplan.runtime.models.model_store import ensure_model

    mark_scheduled(engine, job_id, f"{config.workers} worker(s), {config.backend}")
    local = ensure_model(config.model)
    transition(engine, job_id, JobStatus.RUNNING, message=local.note or f"model {local.path}",
               update=JobUpdate(artifacts=Artifacts(output_dir=config.output_dir)))
    return dataclasses.replace(config, model=str(local.path))


# ---- train ----------------------------------------------------------------------------------------------
def _train(engine: Any, job_id: int, config: TrainConfig) -> Any:
    def on_metrics(step: Any) -> None:
        record_metrics(engine, job_id, [MetricPoint(step=step.step, loss=step.loss, learning_rate=step.lr,
                                                    tokens_per_s=step.tokens_per_s, memory_bytes=step.memory_bytes)])
        print(step_line(step), flush=True)  # the job's log (the scheduler's driver writes stdout there)

    if runs_in_this_process(config):
        from llmplan.runtime.train.train import run_rank

        return run_rank(config, on_metrics=on_metrics)
    from llmplan.runtime.train.ray_train import run_ray_train

    return run_ray_train(config, on_metrics)


def runs_in_this_process(config: TrainConfig) -> bool:
    """One worker on the CPU: the same recipe in this process, without starting Ray Train (and its workers)."""
    return config.workers == 1 and config.backend == "single" and config.device == "cpu"


def step_line(step: Any) -> str:
    """One logged optimizer step as the job's log shows it."""
    evaluated = f", eval loss {step.eval_loss:.4f}" if step.eval_loss is not None else ""
    return f"step {step.step}: loss {step.loss:.4f}{evaluated}, lr {step.lr:.2e}, {step.tokens_per_s:,.0f} tokens/s"


# ---- record ---------------------------------------------------------------------------------------------
def _record_success(engine: Any, job_id: int, config: TrainConfig, result: Any) -> FinetuneOutcome:
    artifact = str(result.adapter_dir or result.model_dir)
    peaks = tuple(int(p) for p in (result.peak_memory_per_rank or ()) if p is not None)
    update = JobUpdate(
        results=MeasuredResults(peak_memory_per_gpu_bytes=peaks or None, tokens_per_s=result.tokens_per_s,
                                final_loss=result.final_loss),
        artifacts=Artifacts(output_dir=config.output_dir, adapter_path=str(result.adapter_dir) if result.adapter_dir else None),
    )
    transition(engine, job_id, JobStatus.SUCCEEDED, update=update,
               message=f"{result.steps} steps, final loss {result.final_loss:.4f} -> {artifact}")
    return FinetuneOutcome(job_id, JobStatus.SUCCEEDED, result.final_loss, result.tokens_per_s, artifact)


def _record_failure(engine: Any, job_id: int, error: BaseException) -> FinetuneOutcome:
    return FinetuneOutcome(job_id, JobStatus.FAILED, error=fail_job(engine, job_id, error))
