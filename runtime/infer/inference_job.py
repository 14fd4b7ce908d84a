"""One batch-inference job, recorded from start to end: a recipe that reads top to bottom.

    job = submit(engine, plan, inputs)        # queued, with the request and the plan
    outcome = run(engine, job.id, plan, inputs)  # running -> succeeded | failed (with its error class)

`run` places one Ray actor per replica of the plan, splits the prompts between them, writes each completion
to the job's output file (JSONL, with its prompt's index) as it finishes, shows progress (prompts done and
tokens/s) every few seconds, and records measured tokens/s, time to first token and peak memory against the
plan. A resumed job (`resume_request`) appends to the output of the job it continues and skips the prompts
already answered there.
"""

from __future__ import annotations

import json
import sys
import threading
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

from llmplan.runtime.text.chat import PromptItem, as_message
from llmplan.runtime.jobs.failures import fail_job, mark_scheduled
from llmplan.runtime.infer.generation import Completion, GenerationReport, GenerationSettings

PROGRESS_S = 10.0  # seconds between progress lines (and metric points) of a running job


@dataclass(frozen=True)
class InferenceInputs:
    items: tuple[PromptItem, ...]  # text prompts and dialogs, answered in this order
    settings: GenerationSettings
    adapter: str | None = None
    output: str | None = None  # JSONL of completions; default: beside the job's log in the jobs folder
    template: str = "auto"  # the prompt template (prompt_templates.CHOICES), resolved where the model loads
    resume: bool = False  # append to `output`, skipping the prompts already answered in it

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": [item if isinstance(item, str) else [asdict(as_message(m)) for m in item] for item in self.items],
            "settings": asdict(self.settings),
            "adapter": self.adapter,
            "output": self.output,
            "template": self.template,
            "resume": self.resume,
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
    first_token_seconds: float | None = None


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
    from llmplan.runtime.infer.ray_inference import stop_replicas

    output = Path(inputs.output) if inputs.output else default_output(jobs_dir, job_id)
    replicas: list[Any] = []
    try:
        todo = remaining(output, len(inputs.items)) if inputs.resume else list(range(len(inputs.items)))
        replicas = start(engine, job_id, plan, inputs.adapter, inputs.template)
        with CompletionSink(output, inputs.items, append=inputs.resume, engine=engine, job_id=job_id,
                            total=len(todo)) as sink:
            reports = _generate(replicas, inputs, todo, sink, on_text)
        return record_success(engine, job_id, sink.in_order(), reports, sink.seconds, output,
                              skipped=len(inputs.items) - len(todo))
    except Exception as error:  # noqa: BLE001 - the job records whatever ended it
        return record_failure(engine, job_id, error)
    finally:
        if replicas:
            stop_replicas(replicas)


def default_output(jobs_dir: Path | str, job_id: int) -> Path:
    return Path(jobs_dir) / str(job_id) / "completions.jsonl"


def remaining(output: Path, count: int) -> list[int]:
    """The indices of the prompts `output` has no completion for (a cut-off last line counts as none)."""
    done = answered(output)
    return [i for i in range(count) if i not in done]


def answered(output: Path) -> set[int]:
    done: set[int] = set()
    if output.is_file():
        for line in output.read_text().splitlines():
            try:
                done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):
                continue  # the line a killed job was writing
    return done


def resume_request(engine: Any, job_id: int, jobs_dir: Path) -> dict[str, Any]:
    """The request of a new job continuing failed or cancelled inference job `job_id`: its prompts and settings,
    appending to its output file (default: in the jobs folder it ran with, else `jobs_dir`) and skipping the
    prompts answered there."""
    job = get_job(engine, job_id)
    if job.kind is not JobKind.INFER:
        raise ValueError(f"job {job_id} is a {job.kind.value} job: --resume here continues inference jobs")
    request = dict(job.request)
    output = request.get("output") or str(default_output(request.get("jobs_dir") or jobs_dir, job_id))
    return {**request, "output": output, "resume": True}


def inputs_from_request(request: dict[str, Any]) -> InferenceInputs:
    """The inputs `submit` recorded, read back: a job carries everything needed to run it."""
    items = tuple(p if isinstance(p, str) else tuple(as_message(m) for m in p) for p in request["prompts"])
    return InferenceInputs(items=items, settings=GenerationSettings(**request["settings"]),
                           adapter=request.get("adapter"), output=request.get("output"),
                           template=request.get("template", "auto"), resume=bool(request.get("resume")))


def run_recorded(engine: Any, job_id: int, *, jobs_dir: Path) -> InferenceOutcome:
    """Run a queued job from its record alone (what a detached `llmplan submit infer` does)."""
    job = get_job(engine, job_id)
    return run(engine, job_id, InferencePlan.from_dict(job.plan), inputs_from_request(job.request), jobs_dir=jobs_dir)


# ---- setup ------------------------------------------------------------------------------------------
def start(engine: Any, job_id: int, plan: InferencePlan, adapter: str | None, template: str = "auto") -> list[Any]:
    """Place the plan's replicas, wait for the model to load, and mark the job running."""
    from llmplan.runtime.jobs.cluster import connect
    from llmplan.runtime.models.model_store import ensure_model

    mark_scheduled(engine, job_id, f"{plan.replicas} replica(s) on {plan.device}")
    local = ensure_model(plan.model)
    # The job driver's Ray; else the cluster, or llmplan's local head, where warm replicas wait. Before Ray is
    # imported (by ray_inference's calls): connect sets what Ray reads at import (its token authentication).
    connect()
    from llmplan.runtime.infer.ray_inference import loaded, start_replicas

    replicas = start_replicas(plan, str(local.path), adapter, template)
    where = loaded(replicas[0].node.remote(), plan.model_name)  # waits for the model to load; raises if it could not
    placed_by_scheduler = get_job(engine, job_id).placement_node is not None
    update = JobUpdate(placement=None if placed_by_scheduler else Placement(node=where["node"], gpus=tuple(where["gpus"])),
                       ray=None if placed_by_scheduler else RayIds(job_id=where["job"], actor_id=where["actor"]))
    transition(engine, job_id, JobStatus.RUNNING, message=f"on {where['node']}: {local.note or f'model {local.path}'}",
               update=update)  # the node's IP: what `llmplan show` names a scheduler's placement (a Ray node id) by
    return replicas


# ---- run ----------------------------------------------------------------------------------------------
def _generate(replicas: Sequence[Any], inputs: InferenceInputs, todo: Sequence[int], sink: CompletionSink,
              on_text: Callable[[str], None] | None) -> list[GenerationReport]:
    """Answer the prompts `todo` names, handing each completion to `sink` as it finishes; the replicas' reports."""
    if on_text is not None and len(todo) == 1:
        return [_stream_one(replicas[0], todo[0], inputs, sink, on_text)]
    from llmplan.runtime.infer.ray_inference import share

    shares = [[todo[i] for i in indices] for indices in share(todo, len(replicas))]
    calls = [replica.respond_as_finished.remote(indices, [inputs.items[i] for i in indices], inputs.settings)
             for replica, indices in zip(replicas, shares) if indices]
    reports: list[GenerationReport] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_drain, args=(call, sink, reports, errors), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return reports


def _drain(call: Any, sink: CompletionSink, reports: list[GenerationReport], errors: list[BaseException]) -> None:
    """Take one replica's results as they come: completions to the sink, then its report."""
    import ray

    try:
        for ref in call:
            value = ray.get(ref)
            if isinstance(value, GenerationReport):
                reports.append(value)
            else:
                sink.add(*value)
    except BaseException as error:  # noqa: BLE001 - re-raised by the caller's thread
        errors.append(error)


def _stream_one(replica: Any, index: int, inputs: InferenceInputs, sink: CompletionSink,
                on_text: Callable[[str], None]) -> GenerationReport:
    import ray

    report = None
    for ref in replica.stream.remote(inputs.items[index], inputs.settings):
        value = ray.get(ref)
        if isinstance(value, str):
            on_text(value)
        else:
            report = value
    sink.add(index, report.completions[0])
    return report


class CompletionSink:
    """The job's output file, written a line per completion as each finishes (with its prompt's index), and its
    progress: a line on stderr and a metric point every PROGRESS_S seconds."""

    def __init__(self, output: Path, items: Sequence[PromptItem], *, append: bool, engine: Any = None,
                 job_id: int | None = None, total: int = 0) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        cut_off = append and _ends_mid_line(output)
        self.file = output.open("a" if append else "w")
        if cut_off:
            self.file.write("\n")  # end the line a killed job was writing: it stays unparsed, ours parse
        self.items, self.engine, self.job_id, self.total = items, engine, job_id, total
        self.completions: dict[int, Completion] = {}
        self.lock = threading.Lock()
        self.started = self.last_progress = time.perf_counter()
        self.seconds = 0.0

    def __enter__(self) -> CompletionSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.file.close()

    def add(self, index: int, completion: Completion) -> None:
        with self.lock:
            self.file.write(json.dumps(completion_line(index, self.items[index], completion)) + "\n")
            self.file.flush()
            self.completions[index] = completion
            if time.perf_counter() - self.last_progress >= PROGRESS_S:
                self.progress()

    def tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions.values())

    def progress(self) -> None:
        self.last_progress = now = time.perf_counter()
        rate = self.tokens() / (now - self.started)
        print(f"job {self.job_id}: {len(self.completions):,}/{self.total:,} prompts, {rate:,.0f} tokens/s",
              file=sys.stderr, flush=True)
        if self.engine is not None and self.job_id is not None:
            record_metrics(self.engine, self.job_id, [MetricPoint(step=len(self.completions), tokens_per_s=rate)])

    def in_order(self) -> list[Completion]:
        return [self.completions[i] for i in sorted(self.completions)]


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as source:
        source.seek(-1, 2)
        return source.read(1) != b"\n"


def completion_line(index: int, item: PromptItem, completion: Completion) -> dict[str, Any]:
    prompt = item if isinstance(item, str) else [asdict(as_message(m)) for m in item]
    return {"index": index, "prompt": prompt, "completion": completion.text,
            "finish_reason": completion.finish_reason.value, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens}


def write_completions(output: Path, items: Sequence[PromptItem], completions: Sequence[Completion]) -> None:
    with CompletionSink(output, items, append=False) as sink:
        for index, completion in enumerate(completions):
            sink.add(index, completion)


# ---- record -------------------------------------------------------------------------------------------
def record_success(engine: Any, job_id: int, completions: Sequence[Completion], reports: Sequence[Any],
                   seconds: float, output: Path, skipped: int = 0) -> InferenceOutcome:
    generated = sum(c.completion_tokens for c in completions)
    tokens_per_s = generated / seconds if seconds > 0 and generated else None
    peaks = tuple(r.peak_reserved_bytes for r in reports if r.peak_reserved_bytes is not None)
    firsts = [r.first_token_seconds for r in reports if getattr(r, "first_token_seconds", None) is not None]
    first_token = min(firsts) if firsts else None
    record_metrics(engine, job_id, [MetricPoint(step=len(completions), tokens_per_s=tokens_per_s,
                                                memory_bytes=max(peaks) if peaks else None)])
    update = JobUpdate(results=MeasuredResults(peak_memory_per_gpu_bytes=peaks or None, tokens_per_s=tokens_per_s),
                       artifacts=Artifacts(output_dir=str(output.parent)))
    transition(engine, job_id, JobStatus.SUCCEEDED, message=success_message(len(completions), generated, tokens_per_s,
                                                                            first_token, skipped, output),
               update=update)
    return InferenceOutcome(job_id, JobStatus.SUCCEEDED, tuple(completions), str(output), tokens_per_s, peaks,
                            first_token_seconds=first_token)


def success_message(count: int, generated: int, tokens_per_s: float | None, first_token: float | None,
                    skipped: int, output: Path) -> str:
    """What `llmplan show` lists for the finished job: counts, measured speed, time to first token."""
    parts = [f"{count} completions, {generated} tokens"]
    if tokens_per_s:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    if first_token is not None:
        parts.append(f"first token after {first_token:.2f} s")
    if skipped:
        parts.append(f"{skipped} prompts answered before (resumed)")
    return ", ".join(parts) + f" -> {output}"


def record_failure(engine: Any, job_id: int, error: BaseException) -> InferenceOutcome:
    return InferenceOutcome(job_id, JobStatus.FAILED, error=fail_job(engine, job_id, error))
