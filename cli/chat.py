"""`llmplan chat MODEL`: an interactive chat in the terminal, planned, run in a Ray actor, recorded as a job."""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass, field

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.request import Quant
from llmplan.planner.resolve import ModelConfigError, UnknownModelError
from llmplan.runtime.jobs.submission import inference_plan, store_jobs_root

from .generate import (
    INFERENCE_PRECISIONS,
    announce_model,
    detect_hardware,
    empty_answer_hint,
    prompt_template,
    template_option,
)
from .jobs import db_option, open_engine
from .options import choice_of, positive, user_errors

COMMANDS = "/system TEXT sets the system prompt (and starts over), /reset starts over, /exit (or Ctrl-D) ends"
HELP = f"type a message; {COMMANDS}"


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
@template_option(("auto", "alpaca", "chat"))
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), help="Default: the planner's choice.")
@click.option("--quant", type=choice_of(Quant), help="Default: the planner's choice.")
@db_option
@user_errors(PlanError, UnknownModelError, ModelConfigError)
def chat(model: str, system_prompt: str | None, max_new_tokens: int, temperature: float, top_p: float, seed: int,
         context_len: int, adapter: str | None, template: str, precision: str | None, quant: str | None,
         db_url: str | None) -> None:
    """Chat with MODEL in the terminal (formatted by its chat template, or Llama-2's [INST] format)."""
    from llmplan.runtime.infer import inference_job
    from llmplan.runtime.infer.generation import GenerationSettings
    from llmplan.runtime.infer.ray_inference import stop_replicas

    plan = inference_plan(model, batch_size=1, prompt_len=context_len, max_new_tokens=max_new_tokens,
                     precision=precision, quant=quant, hardware=detect_hardware(1))
    prompts_in = prompt_template(announce_model(plan.model), adapter, template)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  batch_size=1)
    inputs = inference_job.InferenceInputs(items=(), settings=settings, adapter=adapter)
    with open_engine(db_url) as (engine, _):
        job = inference_job.submit(engine, plan, inputs, name=f"chat {plan.model_name}", submitter=getpass.getuser())
        click.echo(f"job {job.id}: {plan.summary()}", err=True)
        if prompts_in is not None:
            click.echo(prompts_in.describe(), err=True)
        replicas = []
        try:
            ask = ask_a_server(engine, job.id, plan, adapter, template, prompts_in, precision, quant)
            if ask is None:
                replicas = inference_job.start(engine, job.id, plan, adapter, template)
                ask = ask_the_replica(replicas[0])
            click.echo(f"{plan.model_name} is ready: {HELP}", err=True)
            turns, reports, seconds = converse(ask, settings, system_prompt,
                                               hint=empty_answer_hint(prompts_in, model))
            output = store_jobs_root(engine) / str(job.id) / "chat.jsonl"
            inference_job.write_completions(output, [t[0] for t in turns], [t[1] for t in turns])
            inference_job.record_success(engine, job.id, [t[1] for t in turns], reports, seconds, output)
        except Exception as error:  # noqa: BLE001 - the job records what ended it
            outcome = inference_job.record_failure(engine, job.id, error)
            raise click.ClickException(f"job {job.id} failed: {outcome.error}") from None
        finally:
            if replicas:
                stop_replicas(replicas)


@dataclass
class Conversation:
    """What the next turn is sent with: the system prompt and the turns so far."""

    system: list = field(default_factory=list)  # [Message("system", ...)] or []
    history: list = field(default_factory=list)

    def dialog(self, line: str) -> list:
        from llmplan.runtime.text.chat import Message

        return [*self.system, *self.history, Message("user", line)]


def run_command(line: str, conversation: Conversation) -> str | None:
    """Carry out a /command typed in the chat; the line to show, or None when the chat ends. Nothing here is
    sent to the model."""
    from llmplan.runtime.text.chat import Message

    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/system":
        conversation.system = [Message("system", argument)] if argument else []
        conversation.history = []
        return f"system prompt set to {argument!r}; the conversation starts over" if argument else \
            "system prompt cleared; the conversation starts over"
    if name == "/reset":
        conversation.history = []
        return "the conversation starts over" + (" (the system prompt is kept)" if conversation.system else "")
    if name == "/help":
        return COMMANDS
    return f"unknown command {name} (not sent to the model): {COMMANDS}"


def ask_the_replica(replica):
    """A turn answered by the job's own replica: the dialog -> its `GenerationReport`."""
    import ray

    return lambda dialog, settings: ray.get(replica.respond.remote([dialog], settings))


def ask_a_server(engine, job_id: int, plan, adapter: str | None, template: str, prompts_in, precision, quant):
    """A turn answered by a running `llmplan serve` of the same model (runtime/infer/serve_client.py), the job marked
    running; None when there is none."""
    from llmplan.runtime.infer import serve_client
    from llmplan.runtime.store.repository import JobStatus, transition

    server = serve_client.find_server(engine, plan.model, adapter, template, dtype=plan.dtype if precision else None,
                                      quant=plan.quant if quant else None)
    if server is None or prompts_in is None:
        return None
    click.echo(f"job {job_id}: answered by {server.describe()}", err=True)
    transition(engine, job_id, JobStatus.SCHEDULED, message=f"answered by {server.describe()}")
    transition(engine, job_id, JobStatus.RUNNING, message=f"answered by {server.describe()}")
    return lambda dialog, settings: serve_client.served_report(server, prompts_in, dialog, settings)


def converse(ask, settings, system_prompt: str | None, hint: str = ""):
    """Read user turns until /exit or end of input; return (dialog, completion) pairs, reports, seconds.

    `ask(dialog, settings)` gives the turn's report: from the job's replica, or from a running server."""
    from llmplan.runtime.text.chat import DialogError, Message, validate_dialog

    conversation = Conversation(system=[Message("system", system_prompt)] if system_prompt else [])
    turns, reports, seconds = [], [], 0.0
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False, err=True)
        except click.Abort:  # end of input (Ctrl-D)
            break
        if not line.strip():
            continue
        if line.lstrip().startswith("/"):
            said = run_command(line, conversation)
            if said is None:
                break
            click.echo(said, err=True)
            continue
        dialog = conversation.dialog(line)
        try:
            validate_dialog(dialog)
        except DialogError as error:
            click.echo(f"Error: {error}", err=True)
            continue
        started = time.perf_counter()
        report = ask(dialog, settings)
        seconds += time.perf_counter() - started
        answer = report.completions[0]
        click.echo(answer.text.strip())
        if not answer.text.strip():
            click.echo(f"note: the answer is empty (the model stopped at once): {hint}", err=True)
        turns.append((tuple(dialog), answer))
        reports.append(report)
        conversation.history = [*conversation.history, Message("user", line), Message("assistant", answer.text.strip())]
    return turns, reports, seconds
