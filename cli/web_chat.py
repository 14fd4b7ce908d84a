"""The dashboard's chat panel (POST /api/chat): one turn of a conversation with a model, or with a finished
fine-tuning job's adapter, through the inference path `llmplan generate` and `llmplan chat` use (a warm
replica per model in Ray, runtime/infer/ray_inference.py), recorded as a job named like `llmplan chat`'s. The turn
runs in a Ray call's process (web_ray.py): while the cluster is down it answers 503."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .web_actions import Scope, checked_model, inside_roots
from .web_errors import ApiError, FieldError

DEFAULT_NEW_TOKENS = 128
MOST_NEW_TOKENS = 2048
CONTEXT_TOKENS = 2048  # the longest conversation planned for, as `llmplan chat`'s default


@dataclass(frozen=True)
class ChatTurn:
    """What one turn is sent with, checked: the model, the adapter (a path), the dialog so far."""
    model: str
    adapter: str | None
    messages: tuple[Any, ...]  # runtime.chat.Message
    max_new_tokens: int


def chat_json(scope: Scope, engine: Any, body: dict[str, Any]) -> dict[str, Any]:
    """{"job", "reply", "finish_reason", "tokens_per_s"} for {"model", "adapter"? | "job", "messages",
    "max_new_tokens"?}: the model's (or job `job`'s model with its adapter) answer to the last user message."""
    from .web_ray import call_with_ray

    return call_with_ray(scope.address, answer_turn, scope, checked_turn(body, scope.roots, engine))


def checked_turn(body: dict[str, Any], roots: tuple[Path, ...], engine: Any) -> ChatTurn:
    """The turn a body asks for, its paths inside the roots; a job's adapter comes from its record."""
    from llmplan.runtime.text.chat import DialogError, validate_dialog

    model, adapter = body.get("model"), body.get("adapter")
    if body.get("job") is not None:
        model, adapter = job_adapter(engine, body["job"])
    elif adapter:
        adapter = str(inside_roots("adapter", str(adapter), roots, must_exist=True))
    if not model:
        raise FieldError("model", "model is required (or job: a succeeded fine-tuning job's id)")
    if body.get("job") is None:
        model = checked_model(str(model), roots)
    try:
        messages = validate_dialog(body.get("messages") or [])
    except DialogError as error:
        raise FieldError("messages", f"messages: {error}") from None
    if messages[-1].role.value != "user":
        raise FieldError("messages", "messages: the last message must be the user's")
    tokens = body.get("max_new_tokens", DEFAULT_NEW_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MOST_NEW_TOKENS:
        raise FieldError("max_new_tokens", f"max_new_tokens: give a whole number from 1 to {MOST_NEW_TOKENS}")
    return ChatTurn(model=str(model), adapter=adapter, messages=tuple(messages), max_new_tokens=tokens)


def job_adapter(engine: Any, job_id: Any) -> tuple[str, str]:
    """(the job's model, its adapter) for a succeeded fine-tuning job with one; 409 for any other job."""
    from llmplan.runtime.store.repository import JobKind, JobStatus, get_job

    if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
        raise FieldError("job", "job: give a job id")
    job = get_job(engine, job_id)
    if job.kind != JobKind.FINETUNE or job.status != JobStatus.SUCCEEDED or not job.adapter_path:
        raise ApiError(HTTPStatus.CONFLICT, f"job {job_id} is a {job.kind.value} job that {job.status.value}: only a "
                                            "succeeded LoRA fine-tuning job has an adapter to chat with")
    return job.model, job.adapter_path


def answer_turn(scope: Scope, turn: ChatTurn) -> dict[str, Any]:
    """In a Ray call's process: plan, record and run the turn as `llmplan chat` does one."""
    from llmplan.runtime.infer import inference_job
    from llmplan.runtime.jobs.cluster import ADDRESS_ENV
    from llmplan.runtime.infer.generation import GenerationSettings
    from llmplan.runtime.store.opening import open_store
    from llmplan.runtime.jobs.submission import inference_plan, store_jobs_root

    from .generate import detect_hardware

    if scope.address:
        os.environ[ADDRESS_ENV] = scope.address  # where the replica's actor is placed
    plan = inference_plan(turn.model, batch_size=1, prompt_len=CONTEXT_TOKENS, max_new_tokens=turn.max_new_tokens,
                     precision=None, quant=None, hardware=detect_hardware(1))
    settings = GenerationSettings(max_new_tokens=turn.max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=1)
    inputs = inference_job.InferenceInputs(items=(turn.messages,), settings=settings, adapter=turn.adapter)
    engine = open_store(scope.db_url)
    try:
        job = inference_job.submit(engine, plan, inputs, name=f"chat {plan.model_name}", submitter=getpass.getuser())
        outcome = inference_job.run(engine, job.id, plan, inputs, jobs_dir=store_jobs_root(engine))
    finally:
        engine.dispose()
    if outcome.error:
        raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"job {job.id} failed: {outcome.error}")
    answer = outcome.completions[0]
    return {"job": job.id, "reply": answer.text.strip(), "finish_reason": answer.finish_reason.value,
            "tokens_per_s": outcome.tokens_per_s}
