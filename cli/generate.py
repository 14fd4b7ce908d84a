"""`llmplan generate MODEL PROMPT...`: planned text or chat completion, run in Ray actors, recorded as a job."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from llmplan.planner.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN
from llmplan.planner.plan import PlanError
from llmplan.planner.request import Precision, Quant
from llmplan.planner.resolve import ModelConfigError, UnknownModelError
from llmplan.runtime.jobs.submission import InferenceSubmission, SubmissionError, prepare_inference, submission_from

from .jobs import db_option, open_engine
from .options import (BATCH, GPUS, SEED, TEMPERATURE, TOKENS, TOP_P, UserError, choice_of, json_option, model_argument,
                      print_json, user_errors)

INFERENCE_PRECISIONS = tuple(precision.value for precision in Precision if not precision.is_mixed)


def detect_hardware(gpus: int | None):
    """The local GPUs through NVML, or None to run on the CPU."""
    from llmplan.planner.hardware import plan_hardware
    from llmplan.planner.nvml_probe import probe_gpus

    probe = probe_gpus()
    if not probe.found:
        return None
    return plan_hardware(gpus, None, None, lambda: probe)


def announce_model(model: str) -> Path | None:
    """Make the model runnable here first (pull or convert once, with progress), say where it went and
    return its directory.

    A model that cannot be made runnable is left to the job, which records the failure and its class."""
    from llmplan.runtime.models.model_store import ModelStoreError, ensure_model

    try:
        local = ensure_model(model, progress=True)
    except ModelStoreError:
        return None
    if local.converted_now:
        click.echo(local.note, err=True)
    return local.path


def prompt_template(model_dir: Path | None, adapter: str | None, choice: str):
    """The prompt template the prompts go to the model in (`prompt_templates.resolve_template`), checked
    before the job starts; None when the model is not runnable here (the job reports that)."""
    from llmplan.runtime.text.prompt_templates import TemplateError, resolve_template

    if model_dir is None:
        return None
    try:
        template = resolve_template(choice, model_dir, adapter)
    except TemplateError as error:
        raise UserError(str(error)) from None
    return template


def empty_answer_hint(template, model: str) -> str:
    """What to try when the model answered nothing, given the template the prompt was sent in."""
    if template is not None and template.name == "none":
        return (f"it was sent as raw text; an instruct or fine-tuned model answers a question in its template: "
                f"try --template chat (or alpaca), or llmplan chat {model}")
    sent = f"it was sent in template {template.name}" if template is not None else "check the prompt template"
    return f"{sent}; try another --template (alpaca, chat, none), or llmplan chat {model}"


def warn_empty(items, completions, template, model: str) -> None:
    """One line on stderr for each completion that is empty: the model stopped at once."""
    for index, (item, completion) in enumerate(zip(items, completions)):
        if completion.text.strip():
            continue
        which = f"completion {index + 1} is" if len(completions) > 1 else "the completion is"
        stopped = ("the model stopped at once" if completion.finish_reason.value == "stop"
                   else f"{completion.completion_tokens} tokens of blank text")
        sent_in = template.for_item(item) if template is not None else None
        click.echo(f"note: {which} empty ({stopped}): {empty_answer_hint(sent_in, model)}", err=True)


TEMPLATE_CHOICES = ("auto", "alpaca", "chat", "none")  # runtime.prompt_templates.CHOICES (not imported: light)


def template_option(choices: tuple[str, ...]):
    return click.option(
        "--template", type=click.Choice(choices), default="auto", show_default=True,
        help="How a prompt is sent. auto: the template the adapter (or fine-tuned model) was trained with; else, "
             "on a model with a chat template, that template for a prompt that ends a sentence (. ! ?) and the "
             "text as written for one that does not; none: the text as written (a completion).")


def generation_options(command):
    """The options `generate` and `submit infer` share: inputs, sampling, and what to plan for."""
    options = [
        click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
                     help="JSONL: one {\"prompt\": ...} or {\"messages\": [...]} per line."),
        click.option("--output", type=click.Path(dir_okay=False), help="Write the completions here (JSONL)."),
        click.option("--max-new-tokens", type=TOKENS, default=DEFAULT_MAX_NEW_TOKENS, show_default=True),
        click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True, help="0: greedy."),
        click.option("--top-p", type=TOP_P, default=1.0, show_default=True),
        click.option("--seed", type=SEED, default=0, show_default=True),
        click.option("--batch-size", type=BATCH, default=8, show_default=True,
                     help="Prompts generated together (capped by what the plan says fits)."),
        click.option("--prompt-len", type=TOKENS, default=DEFAULT_PROMPT_LEN, show_default=True,
                     help="Longest prompt to plan memory for."),
        click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="A PEFT LoRA adapter directory."),
        template_option(TEMPLATE_CHOICES),
        click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), help="Default: the planner's choice."),
        click.option("--quant", type=choice_of(Quant), help="Default: the planner's choice (16-bit when it fits)."),
        click.option("--gpus", type=GPUS, help="GPUs to use (default: all NVML finds)."),
        db_option,
        json_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_on_a_server(engine, job_id: int, plan, inputs, template, options: dict, on_text,
                    jobs_dir: Path):
    """The job answered by a running `llmplan serve` of the same model (runtime/infer/serve_client.py); None when
    there is none (or the model is not runnable here)."""
    from llmplan.runtime.infer import serve_client

    server = serve_client.find_server(engine, plan.model, inputs.adapter, inputs.template,
                                      dtype=plan.dtype if options.get("precision") else None,
                                      quant=plan.quant if options.get("quant") else None)
    if server is None or template is None:
        return None
    click.echo(f"job {job_id}: answered by {server.describe()}", err=True)
    output = Path(inputs.output) if inputs.output else jobs_dir / str(job_id) / "completions.jsonl"
    return serve_client.run_job(engine, job_id, server, inputs.items, template, inputs.settings, output, on_text)


@click.command("generate")
@model_argument
@click.argument("prompts", nargs=-1)
@generation_options
@user_errors(PlanError, UnknownModelError, ModelConfigError, SubmissionError)
def generate(model: str, prompts: tuple[str, ...], db_url: str | None, as_json: bool, **options) -> None:
    """Complete text prompts or chat dialogs with MODEL, planned, run in Ray actors and recorded as a job."""
    from llmplan.runtime.infer import inference_job

    from llmplan.runtime.jobs.submission import store_jobs_root

    submission = submission_from(InferenceSubmission, {"model": model, "prompts": prompts, **options})
    plan, inputs = prepare_inference(submission, detect_hardware)
    template = prompt_template(announce_model(plan.model), inputs.adapter, inputs.template)
    streamed = not as_json and len(inputs.items) == 1
    with open_engine(db_url) as (engine, _):
        job = inference_job.submit(engine, plan, inputs, name=f"generate {plan.model_name}", submitter=getpass.getuser())
        click.echo(f"job {job.id}: {plan.summary()}", err=True)
        if template is not None:
            click.echo(template.describe(), err=True)
        on_text = (lambda piece: click.echo(piece, nl=False)) if streamed else None
        outcome = run_on_a_server(engine, job.id, plan, inputs, template, options, on_text, store_jobs_root(engine)) \
            or inference_job.run(engine, job.id, plan, inputs, jobs_dir=store_jobs_root(engine), on_text=on_text)
    if outcome.error:
        raise click.ClickException(f"job {job.id} failed: {outcome.error} (llmplan show {job.id})")
    if streamed:
        click.echo()
    warn_empty(inputs.items, outcome.completions, template, model)
    if as_json:
        print_json({"job": job.id, "plan": plan.to_dict(), "output": outcome.output,
                    "tokens_per_s": outcome.tokens_per_s, "template": template.name if template else None,
                    "completions": [{"text": c.text, "finish_reason": c.finish_reason.value,
                                     "completion_tokens": c.completion_tokens} for c in outcome.completions]})
        return
    for index, completion in enumerate(() if streamed else outcome.completions):
        if len(outcome.completions) > 1:
            click.echo(f"--- {index + 1}")
        click.echo(completion.text)
    rate = f"{outcome.tokens_per_s:,.1f} tokens/s" if outcome.tokens_per_s else ""
    click.echo(f"job {job.id} succeeded: {rate}; completions in {outcome.output}", err=True)
