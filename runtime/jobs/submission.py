"""Submitting a job: the typed submissions, the request a job's record keeps, and the walk of one submission
(check it, make its model runnable, plan it for the cluster, refuse what never fits, record it queued, wake
the scheduler). `llmplan submit` parses its options into a submission and the dashboard validates JSON into
the same one; both hand it to `queue_finetune` / `queue_inference`.

Errors: `SubmissionError` is bad input (its `field` names the submission's field at fault), `NeverFits` a
plan the cluster cannot run even idle, `runtime.cluster.ClusterError` a cluster that cannot be joined.
Nothing here imports click; heavy modules are imported where they are used, so that refusals stay quick.
"""

from __future__ import annotations

import dataclasses
import getpass
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from llmplan.planner.defaults import (ALL_LINEAR, DEFAULT_GLOBAL_BATCH, DEFAULT_LORA_R, DEFAULT_MAX_NEW_TOKENS,
                                      DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN, lora_alpha, parse_lora_targets)

from llmplan.runtime.jobs.job_request import DEFAULT_MAX_RETRIES, JobRequest

FSDP_MISSING = ("the plan needs FSDP, which llmplan's runtime does not run yet: install DeepSpeed with a CUDA toolkit "
                "(nvcc) and plan with `llmplan fit --deepspeed`, or use --method qlora")
WEIGHTS_PLACEHOLDER_PREFIX = "PATH/TO/"  # the local directory of a catalog model's weights
FINETUNE, INFER = "finetune", "infer"


class SubmissionError(ValueError):
    """Bad input in a submission; `field` names the submission's field at fault (None: no one field)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NeverFits(Exception):
    """The cluster could not run the plan even when idle: nothing is queued; the message says what to pass."""


def weights_placeholder(model_name: str) -> str:
    """What to pass as --model for a catalog model llmplan cannot download: `PATH/TO/Llama-2-7B`."""
    return f"{WEIGHTS_PLACEHOLDER_PREFIX}{model_name}"


def to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- what is submitted ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queueing:
    """How a job waits in the queue: its priority and its re-planned retries after running out of memory."""

    priority: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES


@dataclass(frozen=True)
class FinetuneSubmission:
    """A fine-tuning job as asked for (`llmplan submit finetune`'s options, the dashboard's job spec);
    None leaves a choice to the planner."""

    model: str
    data: str
    data_format: str = "auto"
    template: str = "auto"
    packing: bool = False
    val_fraction: float = 0.05
    method: str = "auto"
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int | None = None  # global: sequences per optimizer step
    micro_batch: int | None = None
    grad_accum: int | None = None
    precision: str | None = None
    gradient_checkpointing: bool | None = None
    zero: int | None = None
    offload: str | None = None
    gpus: int | None = None
    fsdp: str | None = None
    fsdp_offload: bool = False
    workers: int = 1
    lora_r: int = DEFAULT_LORA_R
    lora_targets: str = ALL_LINEAR
    lora_dropout: float = 0.0
    kernels: str = "liger"
    activation_offload: bool | None = None  # None: the planner adds it where nothing fits without it
    compile: str = "auto"  # layers | none | auto: regional compilation (TrainConfig.compile; auto: the recipe decides)
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 2e-4
    warmup_steps: int = 10
    save_every: int = 50
    seed: int = 0
    output: str | None = None
    resume_job: int | None = None
    queueing: Queueing = Queueing()

    @property
    def global_batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        if self.micro_batch and self.grad_accum:
            return self.micro_batch * self.grad_accum * (self.gpus or self.workers)
        return DEFAULT_GLOBAL_BATCH


@dataclass(frozen=True)
class InferenceSubmission:
    """A batch-inference job as asked for (`llmplan submit infer`, `llmplan generate`, the dashboard)."""

    model: str
    prompts: tuple[str, ...] = ()
    input_path: str | None = None
    output: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    prompt_len: int = DEFAULT_PROMPT_LEN
    adapter: str | None = None
    template: str = "auto"
    precision: str | None = None
    quant: str | None = None
    gpus: int | None = None
    queueing: Queueing = Queueing()


@dataclass(frozen=True)
class InferenceResumption:
    """`llmplan submit infer --resume JOB`: a new job, linked to a failed or cancelled inference job, that answers
    only the prompts its output file lacks (same plan, prompts and output)."""

    job_id: int


def submission_from(kind: type, values: Mapping[str, Any]) -> Any:
    """A `kind` submission from a command's (or a job spec's) values by field name; priority and
    max_retries go to its queueing, values of no field are left out."""
    names = {field.name for field in dataclasses.fields(kind)}
    queue_names = {field.name for field in dataclasses.fields(Queueing)}
    queueing = Queueing(**{name: values[name] for name in queue_names if values.get(name) is not None})
    return kind(**{name: value for name, value in values.items() if name in names}, queueing=queueing)


# ---- the cluster a job goes to ------------------------------------------------------------------------------------
def store_jobs_root(engine: Any) -> Path:
    """The job store's folder of job folders (logs, outputs), the same on every node: job 1 of another
    store never shares it."""
    from llmplan.runtime.jobs.paths import store_jobs_dir
    from llmplan.runtime.jobs.scheduler import worker_database_url

    return store_jobs_dir(worker_database_url(engine))


def smaller_cpu_plan(kind: str, workers_that_fit: int) -> str:
    """What to pass instead of a CPU plan the cluster cannot hold (the options of that kind's submit command)."""
    if kind == FINETUNE and workers_that_fit > 0:
        return f"pass --workers {workers_that_fit}"
    smaller = "--method lora or a shorter --seq-len" if kind == FINETUNE else "a smaller --batch-size or --prompt-len"
    return f"pass a smaller model, {smaller}, or add a node with more memory"


class Cluster:
    """The cluster a job is submitted to. Joined on first use (after the submission's own checks, so a bad
    data file is reported without starting Ray): its scheduler (running), and its GPUs as they are now."""

    def __init__(self, engine: Any, address: str | None) -> None:
        self.engine, self.address = engine, address

    @cached_property
    def scheduler(self) -> Any:
        from llmplan.runtime.jobs.scheduler import ensure_scheduler, worker_database_url

        return ensure_scheduler(worker_database_url(self.engine), self.address)

    @cached_property
    def slots(self) -> list[Any]:
        scheduler = self.scheduler
        import ray  # after ensure_scheduler has connected (see cluster.connect)

        return ray.get(scheduler.inventory.remote(True))

    def hardware(self, gpus: int | None) -> Any:
        """What to plan for: the cluster's GPUs (its largest node), or None for the CPU."""
        from llmplan.runtime.jobs.cluster import cluster_hardware

        return cluster_hardware(self.slots, gpus)

    @cached_property
    def cpu_nodes(self) -> list[Any]:
        """Every live node's CPUs and host memory."""
        self.scheduler  # noqa: B018 - joins the cluster first
        from llmplan.runtime.jobs.admission import cpu_node
        from llmplan.runtime.jobs.cluster import alive_nodes

        return [cpu_node(node) for node in alive_nodes()]

    @cached_property
    def jobs_root(self) -> Path:
        return store_jobs_root(self.engine)

    def refuse_if_never_fits(self, kind: str, plan: Any) -> None:
        """NeverFits (nothing queued) for a plan this cluster could not run even when idle, saying what to pass."""
        from llmplan.runtime.jobs.admission import cpu_capacity, cpu_demand_of, demand_of, never_fits, never_fits_on_cpus

        recorded = plan.to_dict()
        reason = never_fits(demand_of(kind, recorded), self.slots, self.cpu_nodes)
        if reason is not None:
            raise NeverFits(f"refused: {reason}; plan for this cluster with `llmplan fit` (--gpus, --method qlora) "
                            "or add GPUs")
        cpu_demand = cpu_demand_of(kind, recorded)
        reason = never_fits_on_cpus(cpu_demand, self.cpu_nodes)
        if reason is not None:
            fitting = cpu_capacity(cpu_demand, self.cpu_nodes)
            raise NeverFits(f"refused: {reason}; {smaller_cpu_plan(kind, fitting)}")

    def wake(self) -> None:
        """Tell the scheduler a job was queued, so that it need not wait for its next cycle."""
        self.scheduler.poke.remote()

    def job_request(self, plan: Any, submission: Any) -> JobRequest:
        """The request of a job the scheduler runs (a fine-tuning's config is added where it is recorded)."""
        from llmplan.runtime.models.model_store import cache_root
        from llmplan.runtime.jobs.scheduler import SCHEDULER_RUNNER

        hardware = self.hardware(submission.gpus) if plan.device == "cuda" else None
        return JobRequest(runner=SCHEDULER_RUNNER, max_retries=submission.queueing.max_retries,
                          hardware=hardware.to_dict() if hardware else None, jobs_dir=str(self.jobs_root),
                          model_cache=str(cache_root()))


def queued_document(job_id: int, plan: Any, jobs_root: Path) -> dict[str, Any]:
    """What a submission answers (`llmplan submit --json`, the dashboard): the job's id, its plan and its log."""
    from llmplan.runtime.jobs.paths import LOG_NAME, job_folder

    return {"id": job_id, "plan": plan.to_dict(), "log": str(job_folder(jobs_root, job_id) / LOG_NAME)}


# ---- the model ------------------------------------------------------------------------------------------------
def prepare_model(model: str, notify: Callable[[str], None] = to_stderr) -> None:
    """Make the model runnable here before anything is queued (pull or convert once, with progress), or
    refuse it with what to pass instead: a catalog model llmplan cannot download, a missing path."""
    from llmplan.runtime.models.model_store import ModelStoreError, ensure_model

    try:
        local = ensure_model(model, progress=True)
    except ModelStoreError as error:
        spec = catalog_only(model)
        if spec is not None:
            raise SubmissionError(f"--model {model}: {spec.name} has no local weights and llmplan cannot download "
                                  f"them: pass --model {weights_placeholder(spec.name)} (its Hugging Face or Meta "
                                  "checkpoint directory)", "model") from None
        raise SubmissionError(f"--model {model}: {error}", "model") from None
    if local.converted_now:
        notify(local.note)


def catalog_only(model: str) -> Any:
    """The catalog entry that `model` names (or abbreviates: 7B) when llmplan can plan it but not pull it;
    None for paths, unknown names and the models llmplan pulls itself."""
    from llmplan.planner.resolve import ModelConfigError, UnknownModelError, resolve_model
    from llmplan.runtime.models.model_store import find_runnable

    if Path(model).expanduser().exists() or any(separator in model for separator in ("/", "\\")):
        return None
    try:
        spec = resolve_model(model).spec
    except (UnknownModelError, ModelConfigError):
        return None
    return spec if find_runnable(spec.name) is None else None


def say_if_device_changed(gpus: int | None, plan: Any, notify: Callable[[str], None]) -> None:
    """One line when GPUs were asked for but the cluster has none, so the plan is for the CPU."""
    if gpus and plan.device == "cpu":
        notify(f"note: --gpus {gpus} asked for GPUs but the cluster has none: planned for the CPU instead")


# ---- fine-tuning ---------------------------------------------------------------------------------------------------
def queue_finetune(cluster: Cluster, submission: FinetuneSubmission,
                   notify: Callable[[str], None] = to_stderr) -> tuple[Any, Any]:
    """Plan a fine-tuning job for the cluster (or take a resumed job's plan), check it, record it queued and
    wake the scheduler. Returns the job record and its plan."""
    engine = cluster.engine
    if submission.resume_job is not None:
        plan, config = resumed(engine, submission.resume_job)
        prepare_model(plan.model, notify)
    else:
        check_training_request(submission)
        prepare_model(submission.model, notify)
        plan, config = plan_training(submission, cluster.hardware, learned_margin_in(engine),
                                             cluster.jobs_root)
    say_if_device_changed(submission.gpus, plan, notify)
    cluster.refuse_if_never_fits(FINETUNE, plan)
    from llmplan.runtime.train import finetune_job  # after the checks: refusals stay quick

    request = cluster.job_request(plan, submission)
    job = finetune_job.submit(engine, plan, config, name=f"finetune {plan.model_name}", submitter=getpass.getuser(),
                              retry_of=submission.resume_job, priority=submission.queueing.priority,
                              scheduling=request.to_dict())
    cluster.wake()
    return job, plan


def check_training_request(submission: FinetuneSubmission) -> None:
    """What needs no cluster: the backend asked for, and the data file (its first problem)."""
    from llmplan.runtime.text.data_formats import DataError, load_examples

    if submission.fsdp or submission.fsdp_offload:
        raise SubmissionError(FSDP_MISSING, "fsdp")
    try:
        load_examples(submission.data, submission.data_format)
    except DataError as error:
        more = f" (and {error.count - 1} more problem{'s' if error.count > 2 else ''})" if error.count > 1 else ""
        raise SubmissionError(f"{error.first}{more}", "data") from error


def finetune_ask(submission: FinetuneSubmission) -> Any:
    """The planner's question for a submission (its --lora-targets checked against the model)."""
    from llmplan.planner.plan import FinetuneAsk
    from llmplan.planner.request import Kernels, LoraSpec, Method, Offload, Precision
    from llmplan.planner.resolve import resolve_model

    spec = resolve_model(submission.model).spec
    auto = submission.method == "auto"
    ask = FinetuneAsk(
        model=submission.model, spec=spec, methods=(Method.LORA, Method.QLORA, Method.FULL) if auto else
        (Method(submission.method),), seq_len=submission.seq_len, batch_size=submission.global_batch,
        lora=LoraSpec(r=submission.lora_r, alpha=lora_alpha(submission.lora_r),
                      targets=parse_lora_targets(submission.lora_targets)),
        precision=Precision(submission.precision) if submission.precision else None,
        micro_batch=submission.micro_batch, gradient_checkpointing=submission.gradient_checkpointing,
        zero=submission.zero, offload=Offload(submission.offload) if submission.offload else None,
        workers=submission.workers, kernels=Kernels(submission.kernels), lora_dropout=submission.lora_dropout,
        activation_offload=submission.activation_offload,
    )
    ask.lora.target_shapes(spec)  # unknown --lora-targets are refused before the cluster is joined
    return ask


def plan_training(submission: FinetuneSubmission, hardware_for: Callable[[int | None], Any],
                  margin_for: Callable[[str, str], float] | None, jobs_root: Path) -> tuple[Any, Any]:
    """The plan (checked against the GPUs) and the TrainConfig it fixes (`check_training_request` first).

    `margin_for(model name, card)` is the headroom the job store has learned for them (more after OOMs);
    `jobs_root` is the store's folder, where a job's default output goes."""
    from llmplan.planner.plan import plan_finetune

    ask = finetune_ask(submission)
    hardware = hardware_for(submission.gpus)
    if margin_for is not None:
        ask = dataclasses.replace(ask, margin=margin_for(ask.spec.name, hardware.gpu.name if hardware else "cpu"))
    plan = plan_finetune(ask, hardware)
    return plan, train_config(plan, submission, jobs_root)


def train_config(plan: Any, submission: FinetuneSubmission, jobs_root: Path) -> Any:
    """The TrainConfig a plan fixes, with the submission's data, schedule and output."""
    from llmplan.runtime.jobs.paths import default_output
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    if plan.backend == "fsdp":
        raise SubmissionError(FSDP_MISSING)
    output = submission.output or str(default_output(jobs_root, FINETUNE, plan.model_name))
    data = DataConfig(path=str(Path(submission.data).resolve()), format=submission.data_format,
                      template=submission.template, packing=submission.packing, val_fraction=submission.val_fraction)
    return TrainConfig.from_plan(plan, data=data, output_dir=str(Path(output).resolve()), lr=submission.lr,
                                 warmup_steps=submission.warmup_steps, max_steps=submission.max_steps,
                                 epochs=submission.epochs or 1.0, seed=submission.seed,
                                 save_every=submission.save_every,
                                 compile=None if submission.compile == "auto" else submission.compile)


def learned_margin_in(engine: Any) -> Callable[[str, str], float]:
    """The margin the store teaches for a model on a card: more headroom for each recorded OOM there."""
    from llmplan.planner.replan import learned_margin
    from llmplan.runtime.jobs.retries import out_of_memory_count

    return lambda model_name, card: learned_margin(out_of_memory_count(engine, model_name, card))


def resumed(engine: Any, job_id: int) -> tuple[Any, Any]:
    """The plan and config of a failed or cancelled job, set to continue from its latest checkpoint."""
    from llmplan.planner.plan import FinetunePlan
    from llmplan.runtime.store.db import display_url
    from llmplan.runtime.store.errors import UnknownJobError
    from llmplan.runtime.store.repository import get_job
    from llmplan.runtime.train.train_config import TrainConfig

    try:
        job = get_job(engine, job_id)
    except UnknownJobError:
        raise SubmissionError(f"--resume {job_id}: no job {job_id} in {display_url(engine.url)}: `llmplan jobs` "
                              "lists the recorded jobs", "resume_job") from None
    if job.kind.value != FINETUNE:
        raise SubmissionError(f"job {job_id} is an inference job: only fine-tuning resumes from checkpoints",
                              "resume_job")
    config = dataclasses.replace(TrainConfig.from_dict(JobRequest.from_dict(job.request).config), resume=True)
    return FinetunePlan.from_dict(job.plan), config


# ---- inference -------------------------------------------------------------------------------------------------------
def queue_inference(cluster: Cluster, submission: InferenceSubmission,
                    notify: Callable[[str], None] = to_stderr) -> tuple[Any, Any]:
    """Plan a batch-inference job for the cluster, check it, record it queued and wake the scheduler.
    Returns the job record and its plan."""
    prepare_model(submission.model, notify)
    plan, inputs = prepare_inference(submission, cluster.hardware)
    say_if_device_changed(submission.gpus, plan, notify)
    cluster.refuse_if_never_fits(INFER, plan)
    from llmplan.runtime.infer import inference_job  # after the checks: refusals stay quick

    request = cluster.job_request(plan, submission)
    job = inference_job.submit(cluster.engine, plan, inputs, name=f"infer {plan.model_name}",
                               submitter=getpass.getuser(), priority=submission.queueing.priority,
                               scheduling=request.to_dict())
    cluster.wake()
    return job, plan


def queue_resumed_inference(cluster: Cluster, resumption: InferenceResumption,
                            notify: Callable[[str], None] = to_stderr) -> tuple[Any, Any]:
    """Record the job continuing `resumption.job_id` (queued, linked as its retry) and wake the scheduler."""
    from llmplan.planner.plan import InferencePlan
    from llmplan.runtime.infer import inference_job
    from llmplan.runtime.store.errors import StoreError
    from llmplan.runtime.store.repository import retry_job

    job_id = resumption.job_id
    try:
        request = inference_job.resume_request(cluster.engine, job_id, cluster.jobs_root)
        job = retry_job(cluster.engine, job_id, submitter=getpass.getuser(), request=request,
                        message=f"resumes job {job_id}: skips the prompts answered in {request['output']}")
    except (ValueError, StoreError) as error:
        raise SubmissionError(f"--resume {job_id}: {error}", "resume") from error
    cluster.wake()
    return job, InferencePlan.from_dict(job.plan)


def inference_plan(model: str, *, batch_size: int, prompt_len: int, max_new_tokens: int, precision: str | None,
                   quant: str | None, hardware: Any) -> Any:
    """The planner's inference plan for `model` on `hardware` (None: the CPU)."""
    from llmplan.planner.plan import InferenceAsk, plan_inference
    from llmplan.planner.request import Precision, Quant
    from llmplan.planner.resolve import resolve_model

    spec = resolve_model(model).spec
    ask = InferenceAsk(model=model, spec=spec, batch_size=batch_size, prompt_len=prompt_len,
                       max_new_tokens=max_new_tokens, precision=Precision(precision) if precision else None,
                       quant=Quant(quant) if quant else None)
    return plan_inference(ask, hardware)


def load_items(prompts: tuple[str, ...], input_path: str | None) -> tuple:
    from llmplan.runtime.text.chat import DialogError, load_prompts

    if prompts and input_path:
        raise SubmissionError("give prompts as arguments or --input FILE.jsonl, not both", "input_path")
    try:
        items = tuple(load_prompts(input_path)) if input_path else prompts
    except DialogError as error:  # names the file and line
        raise SubmissionError(str(error), "input_path") from None
    if not items:
        raise SubmissionError("nothing to generate: give a prompt, or --input FILE.jsonl with one prompt or dialog "
                              "a line", "prompts")
    return items


def prepare_inference(submission: InferenceSubmission, hardware_for: Callable[[int | None], Any]) -> tuple[Any, Any]:
    """The plan and the inputs of an inference job, checked before anything starts; `hardware_for(gpus)`
    says what to plan for (`llmplan submit`: the cluster's GPUs; `llmplan generate`: this machine's)."""
    from llmplan.runtime.infer.generation import GenerationSettings, InferenceError
    from llmplan.runtime.infer.inference_job import InferenceInputs

    items = load_items(submission.prompts, submission.input_path)
    plan = inference_plan(submission.model, batch_size=submission.batch_size, prompt_len=submission.prompt_len,
                          max_new_tokens=submission.max_new_tokens, precision=submission.precision,
                          quant=submission.quant, hardware=hardware_for(submission.gpus))
    try:
        settings = GenerationSettings(max_new_tokens=submission.max_new_tokens, temperature=submission.temperature,
                                      top_p=submission.top_p, seed=submission.seed, batch_size=plan.batch_size)
    except InferenceError as error:
        raise SubmissionError(str(error)) from error
    return plan, InferenceInputs(items=items, settings=settings, adapter=submission.adapter, output=submission.output,
                                 template=submission.template)
