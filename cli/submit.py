"""`llmplan submit infer ...`: record a job, start it detached, print its id (and follow it with --wait)."""

from __future__ import annotations

import dataclasses
import getpass
import time
from pathlib import Path

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.request import RequestError
from llmplan.planner.resolve import ModelConfigError, UnknownModelError
from llmplan.runtime.train_config import TrainConfigError

from .generate import generation_options, prepare
from .jobs import db_option, open_engine
from .options import (BATCH, EPOCHS, FRACTION, GPUS, JOB_ID, LEARNING_RATE, LORA_RANK, OUTPUT_DIR, SEED, STEPS,
                      STEPS_OR_ZERO, TOKENS, WORKERS, UserError, json_option, lora_needs_lora, user_errors)
from .scheduling import Cluster, prepare_model, report_queued, say_if_device_changed, scheduling_options

POLL_SECONDS = 0.5
RETRY_PATIENCE_S = 10.0


SPEC_SUFFIXES = (".yaml", ".yml")


class DataFileError(UserError):
    """A data file that cannot be trained on: the message names its first problem."""

    field = "data"  # the option (and the dashboard's form field) at fault


class SubmitGroup(click.Group):
    """`llmplan submit finetune|infer ...`, or `llmplan submit SPEC.yaml` (a job spec: the same options as keys)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0].endswith(SPEC_SUFFIXES):
            return "spec", self.commands["spec"], args
        return super().resolve_command(ctx, args)


@click.group("submit", cls=SubmitGroup)
def submit() -> None:
    """Submit a job: it is recorded, runs on its own, and outlives this terminal.

    `llmplan submit SPEC.yaml` reads a job spec: `task: finetune` or `task: infer`, then the options of
    `llmplan submit finetune` / `llmplan submit infer` as keys without their dashes (`micro-batch: 4`,
    `gradient-checkpointing: true`, `prompt: [...]`). Unknown keys are errors. `llmplan fit` prints one.
    """


@submit.command("infer")
@click.option("--model", help="Catalog name, Hugging Face directory or Meta checkpoint directory.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several); or --input FILE.jsonl.")
@click.option("--resume", "resume_job", type=JOB_ID, default=None, metavar="JOB",
              help="Continue a failed or cancelled inference job: a new, linked job answers only the prompts "
                   "its output file lacks, appending to it.")
@scheduling_options
@generation_options
@user_errors(PlanError, UnknownModelError, ModelConfigError)
def submit_infer(model: str | None, prompts: tuple[str, ...], resume_job: int | None, priority: int,
                 max_retries: int, address: str | None, wait: bool, db_url: str | None, as_json: bool,
                 **options) -> None:
    """Batch inference as a job, queued on the Ray cluster: prints the job id and returns (or follows it with --wait)."""
    if model is None and resume_job is None:
        raise UserError("Missing option '--model' (or --resume JOB to continue an inference job)")
    with open_engine(db_url) as (engine, _):
        cluster = Cluster(engine, address)
        if resume_job is not None:
            job, plan = queue_resumed_inference(cluster, resume_job)
        else:
            job, plan = queue_inference(cluster, model, prompts, options, priority=priority, max_retries=max_retries)
        report_queued(engine, job.id, plan, cluster.jobs_root, as_json, wait)


def queue_resumed_inference(cluster: Cluster, job_id: int):
    """A new job continuing failed or cancelled inference job `job_id` (its plan, prompts and output file)."""
    from llmplan.planner.plan import InferencePlan
    from llmplan.runtime import inference_job
    from llmplan.runtime.store.errors import StoreError
    from llmplan.runtime.store.repository import retry_job

    try:
        request = inference_job.resume_request(cluster.engine, job_id, cluster.jobs_root)
        job = retry_job(cluster.engine, job_id, submitter=getpass.getuser(), request=request,
                        message=f"resumes job {job_id}: skips the prompts answered in {request['output']}")
    except (ValueError, StoreError) as error:
        raise UserError(f"--resume {job_id}: {error}") from error
    cluster.wake()
    return job, InferencePlan.from_dict(job.plan)


def queue_inference(cluster: Cluster, model: str, prompts: tuple[str, ...], options: dict, *, priority: int,
                    max_retries: int):
    """Plan a batch-inference job for the cluster, check it, record it queued and wake the scheduler: what
    `llmplan submit infer` and the dashboard both do. Returns the job record and its plan."""
    prepare_model(model)
    plan, inputs = prepare(model, prompts, hardware=cluster.hardware, **options)
    say_if_device_changed(options["gpus"], plan)
    cluster.refuse_if_never_fits("infer", plan)
    from llmplan.runtime import inference_job  # after the checks: refusals stay quick

    job = inference_job.submit(cluster.engine, plan, inputs, name=f"infer {plan.model_name}",
                               submitter=getpass.getuser(), priority=priority,
                               scheduling=cluster.request_fields(plan, max_retries, options["gpus"]))
    cluster.wake()
    return job, plan


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
    total = (job.request.get("config") or {}).get("max_steps") if job.kind.value == "finetune" else \
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


# ---- fine-tuning -----------------------------------------------------------------------------------------
METHOD_CHOICES = ("auto", "full", "lora", "qlora")
FSDP_MISSING = ("the plan needs FSDP, which llmplan's runtime does not run yet: install DeepSpeed with a CUDA toolkit "
                "(nvcc) and plan with `llmplan fit --deepspeed`, or use --method qlora")


@submit.command("finetune")
@click.option("--model", required=True, help="Catalog name, Hugging Face directory or Meta checkpoint directory.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Alpaca JSON/JSONL, ShareGPT or OpenAI messages JSONL.")
@click.option("--format", "data_format", type=click.Choice(("auto", "alpaca", "sharegpt", "messages")), default="auto",
              show_default=True)
@click.option("--template", type=click.Choice(("auto", "alpaca", "chat")), default="auto", show_default=True)
@click.option("--packing/--no-packing", default=False, show_default=True, help="Pack short examples into full sequences (each still attends only to itself).")
@click.option("--val-fraction", type=FRACTION, default=0.05, show_default=True)
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="auto", show_default=True, callback=lora_needs_lora)
@click.option("--seq-len", type=TOKENS, default=512, show_default=True)
@click.option("--batch-size", type=BATCH, default=None,
              help="Global batch (sequences per optimizer step) [default: 16, or micro-batch x grad-accum x GPUs].")
@click.option("--micro-batch", type=BATCH, default=None, help="Default: the planner's choice.")
@click.option("--grad-accum", type=BATCH, default=None, help="Default: global batch / micro-batch / GPUs.")
@click.option("--precision", type=click.Choice(("bf16-true", "bf16-mixed", "fp16-true", "fp16-mixed", "fp32")))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--zero", type=click.IntRange(0, 3), default=None, help="DeepSpeed ZeRO stage (0: DDP).")
@click.option("--offload", type=click.Choice(("none", "optimizer", "params")), default=None)
@click.option("--gpus", type=GPUS, default=None, help="GPUs to use (default: all NVML finds).")
@click.option("--fsdp", type=click.Choice(("full-shard", "shard-grad-op")), default=None, hidden=True)
@click.option("--fsdp-offload", is_flag=True, hidden=True)
@click.option("--workers", type=WORKERS, default=1, show_default=True,
              help="Data-parallel processes when training on the CPU (on GPUs: one per GPU).")
@click.option("--lora-r", type=LORA_RANK, default=8, show_default=True, callback=lora_needs_lora)
@click.option("--lora-targets", default="all-linear", show_default=True, callback=lora_needs_lora,
              help="Comma list or all-linear.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--kernels", type=click.Choice(("liger", "none")), default="liger", show_default=True,
              help="Liger's fused training kernels (on GPUs, for the architectures Liger supports) or none.")
@click.option("--activation-offload/--no-activation-offload", default=None,
              help="Keep the checkpointed layer inputs in CPU memory [default: only where nothing fits without].")
@click.option("--epochs", type=EPOCHS, default=None, help="Passes over the data [default: 1].")
@click.option("--max-steps", type=STEPS, default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--lr", type=LEARNING_RATE, default=2e-4, show_default=True)
@click.option("--warmup-steps", type=STEPS_OR_ZERO, default=10, show_default=True)
@click.option("--save-every", type=STEPS, default=50, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--output", type=OUTPUT_DIR, help="Output directory [default: the job's folder].")
@click.option("--resume", "resume_job", type=JOB_ID, default=None, metavar="JOB",
              help="Continue a failed or cancelled job from its latest checkpoint (a new, linked job).")
@scheduling_options
@db_option
@json_option
@user_errors(PlanError, UnknownModelError, ModelConfigError, RequestError, TrainConfigError)
def submit_finetune(model: str, data: str, resume_job: int | None, priority: int, max_retries: int,
                    address: str | None, wait: bool, db_url: str | None, as_json: bool, **options) -> None:
    """Fine-tuning as a job: planned for the cluster's GPUs, checked, queued, run in Ray Train workers."""
    with open_engine(db_url) as (engine, _):
        cluster = Cluster(engine, address)
        job, plan = queue_finetune(cluster, model, data, options, priority=priority, max_retries=max_retries,
                                   resume_job=resume_job)
        report_queued(engine, job.id, plan, cluster.jobs_root, as_json, wait)


def queue_finetune(cluster: Cluster, model: str, data: str, options: dict, *, priority: int, max_retries: int,
                   resume_job: int | None = None):
    """Plan a fine-tuning job for the cluster (or take a resumed job's plan), check it, record it queued and
    wake the scheduler: what `llmplan submit finetune` and the dashboard both do. Returns the job and its plan."""
    engine = cluster.engine
    if resume_job is not None:
        plan, config = resumed(engine, resume_job)
        prepare_model(plan.model)
    else:
        check_training_request(data, options)
        prepare_model(model)
        plan, config = plan_training(model, data, options, cluster.hardware, learned_margin_in(engine),
                                     cluster.jobs_root)
    say_if_device_changed(options["gpus"], plan)
    cluster.refuse_if_never_fits("finetune", plan)
    from llmplan.runtime import finetune_job  # after the checks: refusals stay quick

    job = finetune_job.submit(engine, plan, config, name=f"finetune {plan.model_name}", submitter=getpass.getuser(),
                              retry_of=resume_job, priority=priority,
                              scheduling=cluster.request_fields(plan, max_retries, options["gpus"]))
    cluster.wake()
    return job, plan


def check_training_request(data: str, options: dict) -> None:
    """What needs no cluster: the backend asked for, and the data file (its first problem)."""
    from llmplan.runtime.data_formats import DataError, load_examples

    if options["fsdp"] or options["fsdp_offload"]:
        raise UserError(FSDP_MISSING)
    try:
        load_examples(data, options["data_format"])
    except DataError as error:
        more = f" (and {error.count - 1} more problem{'s' if error.count > 2 else ''})" if error.count > 1 else ""
        raise DataFileError(f"{error.first}{more}") from error


def plan_training(model: str, data: str, options: dict, hardware_for, margin_for, jobs_root: Path):
    """The plan (checked against the GPUs) and the TrainConfig it fixes (`check_training_request` first).

    `margin_for(model name, card)` is the headroom the job store has learned for them (more after OOMs);
    `jobs_root` is the store's folder, where a job's default output goes."""
    from llmplan.planner.plan import FinetuneAsk, plan_finetune
    from llmplan.planner.request import Kernels, LoraSpec, Method, Offload, Precision
    from llmplan.planner.resolve import resolve_model

    spec = resolve_model(model).spec
    methods = tuple(Method) if options["method"] == "auto" else (Method(options["method"]),)
    targets = tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip())
    ask = FinetuneAsk(
        model=model, spec=spec, methods=(Method.LORA, Method.QLORA, Method.FULL) if options["method"] == "auto" else methods,
        seq_len=options["seq_len"], batch_size=global_batch(options), lora=LoraSpec(r=options["lora_r"],
        alpha=2 * options["lora_r"], targets=targets or ("all-linear",)),
        precision=Precision(options["precision"]) if options["precision"] else None, micro_batch=options["micro_batch"],
        gradient_checkpointing=options["gradient_checkpointing"], zero=options["zero"],
        offload=Offload(options["offload"]) if options["offload"] else None, workers=options["workers"],
        kernels=Kernels(options["kernels"]), lora_dropout=options["lora_dropout"],
        activation_offload=options.get("activation_offload"),
    )
    ask.lora.target_shapes(spec)  # unknown --lora-targets are refused before the cluster is joined
    hardware = hardware_for(options["gpus"])
    if margin_for is not None:
        ask = dataclasses.replace(ask, margin=margin_for(spec.name, hardware.gpu.name if hardware else "cpu"))
    plan = plan_finetune(ask, hardware)
    return plan, train_config(plan, data, options, jobs_root)


def learned_margin_in(engine):
    """The margin the store teaches for a model on a card: more headroom for each recorded OOM there."""
    from llmplan.planner.replan import learned_margin
    from llmplan.runtime.retries import out_of_memory_count

    return lambda model_name, card: learned_margin(out_of_memory_count(engine, model_name, card))


def global_batch(options: dict) -> int:
    if options["batch_size"] is not None:
        return options["batch_size"]
    if options["micro_batch"] and options["grad_accum"]:
        return options["micro_batch"] * options["grad_accum"] * (options["gpus"] or options["workers"])
    return 16


def train_config(plan, data: str, options: dict, jobs_root: Path):
    from llmplan.runtime.paths import default_output
    from llmplan.runtime.train_config import DataConfig, TrainConfig

    if plan.backend == "fsdp":
        raise UserError(FSDP_MISSING)
    output = options["output"] or str(default_output(jobs_root, "finetune", plan.model_name))
    return TrainConfig(
        model=plan.model, data=DataConfig(path=str(Path(data).resolve()), format=options["data_format"],
                                          template=options["template"], packing=options["packing"],
                                          val_fraction=options["val_fraction"]),
        output_dir=str(Path(output).resolve()), method=plan.method, precision=plan.precision,
        micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, seq_len=plan.seq_len,
        gradient_checkpointing=plan.gradient_checkpointing, optimizer=plan.optimizer, lr=options["lr"],
        warmup_steps=options["warmup_steps"], max_steps=options["max_steps"], epochs=options["epochs"] or 1.0,
        lora_r=plan.lora_r, lora_alpha=2 * plan.lora_r, lora_targets=plan.lora_targets, seed=options["seed"],
        kernels=plan.kernels, lora_dropout=plan.lora_dropout, activation_offload=plan.activation_offload,
        save_every=options["save_every"], device=plan.device, workers=plan.workers,
        backend="single" if plan.backend == "single" else plan.backend, zero=plan.zero, offload=plan.offload,
    )


def resumed(engine, job_id: int):
    """The plan and config of a failed or cancelled job, set to continue from its latest checkpoint."""
    import dataclasses

    from llmplan.planner.plan import FinetunePlan
    from llmplan.runtime.store.repository import get_job
    from llmplan.runtime.train_config import TrainConfig

    job = get_job(engine, job_id)
    if job.kind.value != "finetune":
        raise UserError(f"job {job_id} is an inference job: only fine-tuning resumes from checkpoints")
    config = dataclasses.replace(TrainConfig.from_dict(job.request["config"]), resume=True)
    return FinetunePlan.from_dict(job.plan), config


# ---- job specs -------------------------------------------------------------------------------------------
SPEC_TASKS = ("finetune", "infer")


def spec_command(task: str) -> click.Command:
    return {"finetune": submit_finetune, "infer": submit_infer}[task]


@submit.command("spec", hidden=True)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True)
@click.pass_context
def submit_spec(ctx: click.Context, path: str, wait: bool) -> None:
    """Submit the job a YAML spec describes."""
    words = spec_words(read_spec(path), where=path)
    command = spec_command(words[0])
    ctx.invoke(command, **command.make_context(command.name, [*words[1:], *(["--wait"] if wait else [])],
                                               parent=ctx).params)


def read_spec(path: str):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error


def param_keys(param: click.Parameter) -> set[str]:
    """The job spec keys of one option: its long names without their dashes."""
    return {name.lstrip("-") for name in [*param.opts, *param.secondary_opts]}


def spec_keys(command: click.Command) -> set[str]:
    """The keys a job spec may hold for `command`."""
    return {key for param in command.params for key in param_keys(param)} - {"help"}


def spec_words(spec, *, where: str, withheld: frozenset[str] = frozenset()) -> list[str]:
    """The spec as command-line words: ["finetune", "--model=M", ...]; unknown (or `withheld`) keys are errors.

    Each value is joined to its option by "=", so that no value is ever read as an option of its own."""
    if not isinstance(spec, dict) or spec.get("task") not in SPEC_TASKS:
        raise UserError(f"{where}: a job spec is a mapping with task: finetune or task: infer")
    known = spec_keys(spec_command(spec["task"])) - withheld
    unknown = sorted(str(key) for key in spec if key != "task" and str(key) not in known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    words = [spec["task"]]
    for key, value in spec.items():
        if key == "task" or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                words.append(f"--{key}")
            elif item is False:
                words.append(f"--no-{key}")
            else:
                words.append(f"--{key}={item}")
    return words


def parse_spec(spec, *, where: str, withheld: frozenset[str] = frozenset()) -> tuple[str, dict]:
    """A job spec's task and the options its submit command receives (less the `withheld` ones), checked by
    that command's own option types, choices and callbacks: the dashboard's submissions."""
    words = spec_words(spec, where=where, withheld=withheld)
    command = spec_command(words[0])
    params = command.make_context(command.name, words[1:]).params
    return words[0], {param.name: params[param.name] for param in command.params
                      if param.name in params and not param_keys(param) & withheld}
