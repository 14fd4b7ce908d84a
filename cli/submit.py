"""`llmplan submit finetune|infer|SPEC.yaml`: parse the options (or a job spec) into a submission and hand it
to `runtime.submission`, which checks, plans and queues it; print the job id (and follow it with --wait)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.defaults import ALL_LINEAR, DEFAULT_LORA_R, DEFAULT_SEQ_LEN
from llmplan.planner.request import Kernels, Method, Offload, Precision, RequestError
from llmplan.planner.resolve import ModelConfigError, UnknownModelError
from llmplan.runtime.jobs.submission import FinetuneSubmission, InferenceResumption, InferenceSubmission, submission_from
from llmplan.runtime.train.train_config import DATA_FORMATS, TEMPLATES, TrainConfigError

from .generate import generation_options
from .jobs import db_option
from .options import (BATCH, EPOCHS, FRACTION, GPUS, JOB_ID, LEARNING_RATE, LORA_RANK, OUTPUT_DIR, SEED, STEPS,
                      STEPS_OR_ZERO, TOKENS, WORKERS, UserError, choice_of, json_option, lora_needs_lora, user_errors)
from .scheduling import queue_and_report, scheduling_options

SPEC_SUFFIXES = (".yaml", ".yml")


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
def submit_infer(address: str | None, wait: bool, db_url: str | None, as_json: bool, resume_job: int | None,
                 **options: Any) -> None:
    """Batch inference as a job, queued on the Ray cluster: prints the job id and returns (or follows it with --wait)."""
    if resume_job is not None:
        submission = InferenceResumption(resume_job)
    elif options["model"] is None:
        raise UserError("Missing option '--model' (or --resume JOB to continue an inference job)")
    else:
        submission = submission_from(InferenceSubmission, options)
    queue_and_report(submission, address, db_url, as_json, wait)


@submit.command("finetune")
@click.option("--model", required=True, help="Catalog name, Hugging Face directory or Meta checkpoint directory.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Alpaca JSON/JSONL, ShareGPT or OpenAI messages JSONL.")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default="auto", show_default=True)
@click.option("--template", type=click.Choice(TEMPLATES), default="auto", show_default=True)
@click.option("--packing/--no-packing", default=False, show_default=True, help="Pack short examples into full sequences (each still attends only to itself).")
@click.option("--val-fraction", type=FRACTION, default=0.05, show_default=True)
@click.option("--method", type=click.Choice(("auto", *(method.value for method in Method))), default="auto",
              show_default=True, callback=lora_needs_lora)
@click.option("--seq-len", type=TOKENS, default=DEFAULT_SEQ_LEN, show_default=True)
@click.option("--batch-size", type=BATCH, default=None,
              help="Global batch (sequences per optimizer step) [default: 16, or micro-batch x grad-accum x GPUs].")
@click.option("--micro-batch", type=BATCH, default=None, help="Default: the planner's choice.")
@click.option("--grad-accum", type=BATCH, default=None, help="Default: global batch / micro-batch / GPUs.")
@click.option("--precision", type=choice_of(Precision))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--zero", type=click.IntRange(0, 3), default=None, help="DeepSpeed ZeRO stage (0: DDP).")
@click.option("--offload", type=choice_of(Offload), default=None)
@click.option("--gpus", type=GPUS, default=None, help="GPUs to use (default: all NVML finds).")
@click.option("--fsdp", type=click.Choice(("full-shard", "shard-grad-op")), default=None, hidden=True)
@click.option("--fsdp-offload", is_flag=True, hidden=True)
@click.option("--workers", type=WORKERS, default=1, show_default=True,
              help="Data-parallel processes when training on the CPU (on GPUs: one per GPU).")
@click.option("--lora-r", type=LORA_RANK, default=DEFAULT_LORA_R, show_default=True, callback=lora_needs_lora)
@click.option("--lora-targets", default=ALL_LINEAR, show_default=True, callback=lora_needs_lora,
              help="Comma list or all-linear.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--kernels", type=choice_of(Kernels), default=Kernels.LIGER.value, show_default=True,
              help="Liger's fused training kernels (on GPUs, for the architectures Liger supports) or none.")
@click.option("--activation-offload/--no-activation-offload", default=None,
              help="Keep the checkpointed layer inputs in CPU memory [default: only where nothing fits without].")
@click.option("--compile", type=click.Choice(("auto", "layers", "none")), default="auto", show_default=True,
              help="Compile each decoder layer with torch.compile (LoRA on GPUs, bf16, no checkpointing) [auto: the "
                   "runtime decides].")
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
def submit_finetune(address: str | None, wait: bool, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Fine-tuning as a job: planned for the cluster's GPUs, checked, queued, run in Ray Train workers."""
    queue_and_report(submission_from(FinetuneSubmission, options), address, db_url, as_json, wait)


# ---- job specs -------------------------------------------------------------------------------------------
SPEC_TASKS = ("finetune", "infer")
SUBMISSIONS = {"finetune": FinetuneSubmission, "infer": InferenceSubmission}


class SpecError(UserError):
    """A job spec that cannot be submitted; `field` is its key at fault (None: the spec as a whole)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def spec_command(task: str) -> click.Command:
    return {"finetune": submit_finetune, "infer": submit_infer}[task]


@submit.command("spec", hidden=True)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True)
@click.pass_context
def submit_spec(ctx: click.Context, path: str, wait: bool) -> None:
    """Submit the job a YAML spec describes."""
    task, values = spec_values(read_spec(path), where=path)
    command = spec_command(task)
    ctx.invoke(command, **{**values, "wait": wait or values["wait"]})


def read_spec(path: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None


def param_keys(param: click.Parameter) -> set[str]:
    """The job spec keys of one option: its long names without their dashes."""
    return {name.lstrip("-") for name in [*param.opts, *param.secondary_opts]}


def spec_key(task: str, name: str | None) -> str | None:
    """The job spec key of a submission's field (`input_path` -> `input`); None for none."""
    if name is None:
        return None
    for param in spec_command(task).params:
        if param.name == name:
            return param.opts[0].lstrip("-")
    return name


def spec_values(spec: Any, *, where: str, withheld: frozenset[str] = frozenset()) -> tuple[str, dict[str, Any]]:
    """A job spec's task and the values its submit command receives (less the `withheld` options), each
    checked by that command's own option types, choices and callbacks; SpecError names the key at fault."""
    if not isinstance(spec, dict) or spec.get("task") not in SPEC_TASKS:
        raise SpecError(f"{where}: a job spec is a mapping with task: finetune or task: infer")
    task, command = spec["task"], spec_command(spec["task"])
    by_key = {key: param for param in command.params for key in param_keys(param) if not param_keys(param) & withheld}
    unknown = sorted(str(key) for key in spec if key != "task" and str(key) not in by_key)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(by_key))}")
    given = {}
    for key, value in spec.items():
        read = spec_value(by_key[key], key, value) if key != "task" and value is not None else None
        if read is not None:
            given[by_key[key].name] = read
    try:
        params = command.make_context(command.name, [], default_map=given).params
    except click.ClickException as error:
        param = getattr(error, "param", None)
        raise SpecError(error.format_message(), param.opts[0].lstrip("-") if param else None) from None
    return task, {name: params[name] for name in {param.name for param in by_key.values()}}


def spec_value(param: click.Parameter, key: str, value: Any) -> Any:
    """A spec value as the option reads it: each item as text (as typed), a flag's booleans as they are
    (`no-KEY: true` is KEY false), a single value of a repeated option as a list of one."""
    items = [item if isinstance(item, bool) else str(item) for item in (value if isinstance(value, list) else [value])]
    if key in {name.lstrip("-") for name in param.secondary_opts}:
        items = [not item if isinstance(item, bool) else item for item in items]
    if getattr(param, "multiple", False):
        return items
    return items[-1] if items else None


def spec_submission(spec: Any, *, where: str, withheld: frozenset[str] = frozenset()) -> tuple[str, Any]:
    """A job spec's task and its submission (`spec_values`, typed)."""
    task, values = spec_values(spec, where=where, withheld=withheld)
    return task, submission_from(SUBMISSIONS[task], values)
