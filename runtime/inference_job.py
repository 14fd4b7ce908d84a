"""One batch-inference job, recorded from start to end: a recipe that reads top to bottom.

    job = submit(engine, plan, inputs)        # queued, with the request and the plan
    outcome = run(engine, job.id, plan, inputs)  # running -> succeeded | failed (with its error class)

`run` places one Ray actor per replica of the plan, splits the prompts between them, writes the
completions to the job's output file and records measured tokens/s and peak memory against the plan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmplan.planner.plan import InferencePlan
from llmplan.runtime.store.repository import (
    Artifacts,
    JobKind,
    JobSpec,
    JobStatus,
    JobUpdate,
    MeasuredResults,
    MetricPoint,
    Placement,
    PlanRecord,
    RayIds,
    create_job,
    get_job,
    record_metrics,
    transition,
)

from .chat import PromptItem, as_message
from .failures import fail_job, mark_scheduled
from .generation import Completion, GenerationSettings


@dataclass(frozen=True)
class InferenceInputs:
    items: tuple[PromptItem, ...]  # text prompts and dialogs, answered in this order
    settings: GenerationSettings
    adapter: str | None = None
    output: str | None = None  # JSONL of completions; default: beside the job's log in the jobs folder
    template: str = "auto"  # the prompt template (prompt_templates.CHOICES), resolved where the model loads

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": [item if isinstance(item, str) else [asdict(as_message(m)) for m in item] for item in self.items],
            "settings": asdict(self.settings),
            "adapter": self.adapter,
            "output": self.output,
            "template": self.template,
        }


@dataclass(frozen=True)
class InferenceOutcome:
    job_id: int
    status: JobStatus
    completions: tuple[Completion, ...] = ()
    output: str | None = None
    tokens_per_s: float | None = None
    peak_reserved_bytes: tuple[int, ...] = ()
    error: str | None = None


def submit(engine: Any, plan: InferencePlan, inputs: InferenceInputs, *, name: str, submitter: str,
           priority: int = 0, scheduling: dict[str, Any] | None = None) -> Any:
    """Record the job as queued, with everything needed to run (or re-run) it (and, from `llmplan submit`,
    what the scheduler reads: max_retries, jobs_dir, the hardware planned for)."""
    request = {"task": "infer", "model": plan.model, **inputs.to_dict(), **(scheduling or {})}
    record = PlanRecord(plan.to_dict(), plan.estimated_device_bytes, plan.estimated_tokens_per_s)
    return create_job(engine, JobSpec(name=name, kind=JobKind.INFER, model=plan.model_name, submitter=submitter,
                                      request=request, plan=record, priority=priority))


def run(engine: Any, job_id: int, plan: InferencePlan, inputs: InferenceInputs, *, jobs_dir: Path,
        on_text: Callable[[str], None] | None = None) -> InferenceOutcome:
    """Run a queued job to its end; every failure ends the job as failed with its class, never raises.

    With `on_text` and a single prompt, the completion is streamed to it piece by piece as it is generated."""
    from .ray_inference import stop_replicas

    output = Path(inputs.output) if inputs.output else jobs_dir / str(job_id) / "completions.jsonl"
    replicas: list[Any] = []
    try:
        replicas = start(engine, job_id, plan, inputs.adapter, inputs.template)
        completions, reports, seconds = _generate(replicas, inputs, on_text)
        write_completions(output, inputs.items, completions)
        return record_success(engine, job_id, completions, reports, seconds, output)
    except Exception as error:  # noqa: BLE001 - the job records whatever ended it
        return record_failure(engine, job_id, error)
    finally:
        if replicas:
            stop_replicas(replicas)


def inputs_from_request(request: dict[str, Any]) -> InferenceInputs:
    """The inputs `submit` recorded, read back: a job carries everything needed to run it."""
    items = tuple(p if isinstance(p, str) else tuple(as_message(m) for m in p) for p in request["prompts"])
    return InferenceInputs(items=items, settings=GenerationSettings(**request["settings"]),
                           adapter=request.get("adapter"), output=request.get("output"),
                           template=request.get("template", "auto"))


def run_recorded(engine: Any, job_id: int, *, jobs_dir: Path) -> InferenceOutcome:
    """Run a queued job from its record alone (what a detached `llmplan submit infer` does)."""
    job = get_job(engine, job_id)
    return run(engine, job_id, InferencePlan.from_dict(job.plan), inputs_from_request(job.request), jobs_dir=jobs_dir)


# ---- setup ------------------------------------------------------------------------------------------
def start(engine: Any, job_id: int, plan: InferencePlan, adapter: str | None, template: str = "auto") -> list[Any]:
    """Place the plan's replicas, wait for the model to load, and mark the job running."""
    from .cluster import connect
    from .model_store import ensure_model

    mark_scheduled(engine, job_id, f"{plan.replicas} replica(s) on {plan.device}")
    local = ensure_model(plan.model)
    # The job driver's Ray; else the cluster, or llmplan's local head, where warm replicas wait. Before Ray is
    # imported (by ray_inference's calls): connect sets what Ray reads at import (its token authentication).
    connect()
    from .ray_inference import loaded, start_replicas

    replicas = start_replicas(plan, str(local.path), adapter, template)
    where = loaded(replicas[0].node.remote(), plan.model_name)  # waits for the model to load; raises if it could not
    placed_by_scheduler = get_job(engine, job_id).placement_node is not None
    update = JobUpdate(placement=None if placed_by_scheduler else Placement(node=where["node"], gpus=tuple(where["gpus"])),
                       ray=None if placed_by_scheduler else RayIds(job_id=where["job"], actor_id=where["actor"]))
    transition(engine, job_id, JobStatus.RUNNING, message=f"on {where['node']}: {local.note or f'model {local.path}'}",
               update=update)  # the node's IP: what `llmplan show` names a scheduler's placement (a Ray node id) by
    return replicas


# ---- run ----------------------------------------------------------------------------------------------
def _generate(replicas: Sequence[Any], inputs: InferenceInputs,
              on_text: Callable[[str], None] | None) -> tuple[list[Completion], list[Any], float]:
    import ray

    if on_text is not None and len(inputs.items) == 1:
        return _stream_one(replicas[0], inputs, on_text)
    from .ray_inference import share

    shares = share(inputs.items, len(replicas))
    started = time.perf_counter()
    pending = [replica.respond.remote([inputs.items[i] for i in indices], inputs.settings)
               for replica, indices in zip(replicas, shares) if indices]
    reports = ray.get(pending)
    seconds = time.perf_counter() - started
    completions = [completion for report in reports for completion in report.completions]
    return completions, reports, seconds


def _stream_one(replica: Any, inputs: InferenceInputs,
                on_text: Callable[[str], None]) -> tuple[list[Completion], list[Any], float]:
    import ray

    started = time.perf_counter()
    report = None
    for ref in replica.stream.remote(inputs.items[0], inputs.settings):
        value = ray.get(ref)
        if isinstance(value, str):
            on_text(value)
        else:
            report = value
    return list(report.completions), [report], time.perf_counter() - started


def write_completions(output: Path, items: Sequence[PromptItem], completions: Sequence[Completion]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as sink:
        for item, completion in zip(items, completions):
            prompt = item if isinstance(item, str) else [asdict(as_message(m)) for m in item]
            sink.write(json.dumps({"prompt": prompt, "completion": completion.text,
                                   "finish_reason": completion.finish_reason.value,
                                   "prompt_tokens": completion.prompt_tokens,
                                   "completion_tokens": completion.completion_tokens}) + "\n")


# ---- record -------------------------------------------------------------------------------------------
def record_success(engine: Any, job_id: int, completions: Sequence[Completion], reports: Sequence[Any],
                    seconds: float, output: Path) -> InferenceOutcome:
    generated = sum(c.completion_tokens for c in completions)
    tokens_per_s = generated / seconds if seconds > 0 else None
    peaks = tuple(r.peak_reserved_bytes for r in reports if r.peak_reserved_bytes is not None)
    record_metrics(engine, job_id, [MetricPoint(step=0, tokens_per_s=tokens_per_s,
                                                memory_bytes=max(peaks) if peaks else None)])
    update = JobUpdate(results=MeasuredResults(peak_memory_per_gpu_bytes=peaks or None, tokens_per_s=tokens_per_s),
                       artifacts=Artifacts(output_dir=str(output.parent)))
    transition(engine, job_id, JobStatus.SUCCEEDED, message=f"{len(completions)} completions, {generated} tokens -> {output}",
               update=update)
    return InferenceOutcome(job_id, JobStatus.SUCCEEDED, tuple(completions), str(output), tokens_per_s, peaks)


def record_failure(engine: Any, job_id: int, error: BaseException) -> InferenceOutcome:
    return InferenceOutcome(job_id, JobStatus.FAILED, error=fail_job(engine, job_id, error))
