"""`llmplan serve MODEL`: an OpenAI-compatible HTTP server of MODEL, run as a planned job on the cluster until
`llmplan cancel` stops it (runtime/infer/serve.py, runtime/infer/serve_api.py)."""

from __future__ import annotations

import getpass
import hashlib
import secrets
import time

import click

from llmplan.planner.plan import PlanError
from llmplan.planner.request import Quant
from llmplan.planner.resolve import ModelConfigError, UnknownModelError
from llmplan.runtime.web.http_guards import LOOPBACK_HOSTS

from .generate import INFERENCE_PRECISIONS, TEMPLATE_CHOICES, announce_model, prompt_template, template_option
from .cluster import reachable_address
from .jobs import db_option, open_engine
from .options import BATCH, GPUS, PRIORITY, TOKENS, UserError, choice_of, json_option, print_json, user_errors
from .scheduling import PRIORITY_HELP, submission_errors

DEFAULT_PORT = 8000  # vLLM's and LLaMA-Factory's
POLL_SECONDS = 0.3


@click.command("serve")
@click.argument("model", metavar="MODEL")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="A PEFT LoRA adapter directory.")
@template_option(TEMPLATE_CHOICES)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind on the node the job runs on; off loopback a token is required.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--token", default=None, help="The token calls must carry off loopback [default: generated, printed].")
@click.option("--max-new-tokens", type=TOKENS, default=512, show_default=True,
              help="The most tokens one request may generate (the plan's memory is sized for it).")
@click.option("--prompt-len", type=TOKENS, default=2048, show_default=True, help="Longest prompt to plan memory for.")
@click.option("--batch-size", type=BATCH, default=8, show_default=True,
              help="Requests generated together (capped by what the plan says fits).")
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), help="Default: the planner's choice.")
@click.option("--quant", type=choice_of(Quant), help="Default: the planner's choice (16-bit when it fits).")
@click.option("--gpus", type=GPUS, default=None, help="GPUs of the server's one replica [default: 1].")
@click.option("--priority", type=PRIORITY, default=0, show_default=True, help=PRIORITY_HELP)
@click.option("--address", metavar="HOST:PORT", callback=reachable_address,
              help="Ray cluster [default: $LLMPLAN_RAY_ADDRESS, else llmplan's local Ray head].")
@click.option("--no-wait", is_flag=True, help="Return once the job is queued, without waiting for the server.")
@db_option
@json_option
@user_errors(PlanError, UnknownModelError, ModelConfigError)
@submission_errors
def serve(model: str, adapter: str | None, template: str, host: str, port: int, token: str | None,
          max_new_tokens: int, prompt_len: int, batch_size: int, precision: str | None, quant: str | None,
          gpus: int | None, priority: int, address: str | None, no_wait: bool, db_url: str | None,
          as_json: bool) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models), as a
    job on the cluster that runs until `llmplan cancel JOB`."""
    from llmplan.runtime.infer import serve as server
    from llmplan.runtime.jobs.submission import (Cluster, InferenceSubmission, Queueing, inference_plan, prepare_model,
                                            say_if_device_changed)

    def notify(text: str) -> None:
        click.echo(text, err=True)

    if host not in LOOPBACK_HOSTS and not token:
        token = secrets.token_urlsafe(24)
    with open_engine(db_url) as (engine, _):
        cluster = Cluster(engine, address)
        prepare_model(model, notify)
        plan = inference_plan(model, batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                         precision=precision, quant=quant, hardware=cluster.hardware(gpus or 1))
        if plan.replicas > 1:
            raise UserError(f"--gpus {gpus or 1}: a server runs one replica; pass --gpus {plan.gpus_per_replica}")
        say_if_device_changed(gpus, plan, notify)
        prompt_template(announce_model(plan.model), adapter, template)  # a template that cannot be used: exit 2
        cluster.refuse_if_never_fits("serve", plan)
        options = server.ServeOptions(host=host, port=port, adapter=adapter, template=template,
                                      token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None)
        job = server.submit(engine, plan, options, name=f"serve {plan.model_name}", submitter=getpass.getuser(),
                            priority=priority, scheduling=cluster.job_request(plan, InferenceSubmission(
                                model, gpus=gpus or 1, queueing=Queueing(priority, max_retries=0))).to_dict())
        cluster.wake()
        click.echo(f"job {job.id} queued: {plan.summary()}", err=True)
        if token:
            click.echo(f"token: {token}  (clients send it as Authorization: Bearer TOKEN; openai: api_key=TOKEN)",
                       err=True)
        final = job if no_wait else wait_until_serving(engine, job.id)
    url = server.server_url(final)
    if as_json:
        print_json({"id": job.id, "status": final.status.value, "url": url, "model": plan.model,
                    "error": final.error_message})
    else:
        click.echo(job.id)
    if final.status.is_terminal():
        raise click.ClickException(f"job {job.id} {final.status.value}: {final.error_message or ''} "
                                   f"(llmplan logs {job.id})".replace(":  (", " ("))
    if final.status.value == "running":
        click.echo(f"job {job.id}: serving {plan.model} at {url}; stop it with `llmplan cancel {job.id}`", err=True)


def wait_until_serving(engine, job_id: int):
    """Follow the job until its server answers (running) or it ended; its status changes on stderr."""
    from llmplan.runtime.store.repository import get_job

    job, said = get_job(engine, job_id), None
    while job.status.value != "running" and not job.status.is_terminal():
        if job.status.value != said:
            said = job.status.value
            detail = {"queued": f" (Ctrl-C stops waiting, not the job: `llmplan cancel {job_id}` does)",
                      "scheduled": ", loading the model"}.get(said, "")
            click.echo(f"job {job_id}: {said}{detail}", err=True)
        time.sleep(POLL_SECONDS)
        job = get_job(engine, job_id)
    return job
