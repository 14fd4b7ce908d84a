"""`llmplan chat MODEL`: an interactive chat in the terminal, planned, run in a Ray actor, recorded as a job."""

from __future__ import annotations

import getpass
import time

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.request import Quant
from llmplan.planner.resolve import ModelConfigError, UnknownModelError

from .generate import INFERENCE_PRECISIONS, announce_model, detect_hardware, make_plan
from .jobs import db_option, open_engine
from .options import choice_of, positive, user_errors
from .scheduling import store_jobs_root

HELP = "type a message; /system TEXT sets the system prompt, /reset starts over, /exit (or Ctrl-D) ends"


@click.command("chat")
@click.argument("model", metavar="MODEL")
@click.option("--system", "system_prompt", default=None, help="System prompt for the conversation.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, callback=positive)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--context-len", type=int, default=2048, show_default=True, callback=positive,
              help="Longest conversation to plan memory for.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="A PEFT LoRA adapter directory.")
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), help="Default: the planner's choice.")
@click.option("--quant", type=choice_of(Quant), help="Default: the planner's choice.")
@db_option
@user_errors(PlanError, UnknownModelError, ModelConfigError)
def chat(model: str, system_prompt: str | None, max_new_tokens: int, temperature: float, top_p: float, seed: int,
         context_len: int, adapter: str | None, precision: str | None, quant: str | None, db_url: str | None) -> None:
    """Chat with MODEL in the terminal (formatted by its chat template, or Llama-2's [INST] format)."""
    from llmplan.runtime import inference_job
    from llmplan.runtime.inference import GenerationSettings
    from llmplan.runtime.ray_inference import stop_replicas

    plan = make_plan(model, batch_size=1, prompt_len=context_len, max_new_tokens=max_new_tokens,
                     precision=precision, quant=quant, hardware=detect_hardware(1))
    announce_model(plan.model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  batch_size=1)
    inputs = inference_job.InferenceInputs(items=(), settings=settings, adapter=adapter)
    with open_engine(db_url) as (engine, _):
        job = inference_job.submit(engine, plan, inputs, name=f"chat {plan.model_name}", submitter=getpass.getuser())
        click.echo(f"job {job.id}: {plan.summary()}", err=True)
        replicas = []
        try:
            replicas = inference_job.start(engine, job.id, plan, adapter)
            click.echo(f"{plan.model_name} is ready: {HELP}", err=True)
            turns, reports, seconds = converse(replicas[0], settings, system_prompt)
            output = store_jobs_root(engine) / str(job.id) / "chat.jsonl"
            inference_job.write_completions(output, [t[0] for t in turns], [t[1] for t in turns])
            inference_job.record_success(engine, job.id, [t[1] for t in turns], reports, seconds, output)
        except Exception as error:  # noqa: BLE001 - the job records what ended it
            outcome = inference_job.record_failure(engine, job.id, error)
            raise click.ClickException(f"job {job.id} failed: {outcome.error}") from None
        finally:
            if replicas:
                stop_replicas(replicas)


def converse(replica, settings, system_prompt: str | None):
    """Read user turns until /exit or end of input; return (dialog, completion) pairs, reports, seconds."""
    import ray

    from llmplan.runtime.chat import DialogError, Message, validate_dialog

    system = [Message("system", system_prompt)] if system_prompt else []
    history: list[Message] = []
    turns, reports, seconds = [], [], 0.0
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False, err=True)
        except click.Abort:  # end of input (Ctrl-D)
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.startswith("/system"):
            system = [Message("system", line[len("/system"):].strip())]
            history = []
            continue
        if line.strip() == "/reset" or not line.strip():
            history = [] if line.strip() == "/reset" else history
            continue
        dialog = [*system, *history, Message("user", line)]
        try:
            validate_dialog(dialog)
        except DialogError as error:
            click.echo(f"Error: {error}", err=True)
            continue
        started = time.perf_counter()
        report = ray.get(replica.respond.remote([dialog], settings))
        seconds += time.perf_counter() - started
        answer = report.completions[0]
        click.echo(answer.text.strip())
        turns.append((tuple(dialog), answer))
        reports.append(report)
        history = [*history, Message("user", line), Message("assistant", answer.text.strip())]
    return turns, reports, seconds
