"""`llmplan generate` and `chat` through a running `llmplan serve` of the same model, when there is one: no Ray,
no model load. Found through the job store (a running `serve` job whose request names the same model, adapter
and prompt template, and the same precision and quantization when they were asked for), and used when its
address answers within CONNECT_TIMEOUT_S. Off loopback the server needs its token: $LLMPLAN_SERVE_TOKEN.

Light on purpose (the standard library's HTTP client): no torch, no Ray.

A prompt goes to the server as `generate` would send it to a model: the prompt template is applied here, text
to /v1/completions, a dialog to /v1/chat/completions (whose template is the same one).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

TOKEN_ENV = "LLMPLAN_SERVE_TOKEN"
CONNECT_TIMEOUT_S = 2.0
ANSWER_TIMEOUT_S = 3600.0


class ServerError(RuntimeError):
    """The server refused or failed a request; the message is its own."""


class Finish(str, Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True)
class ServedCompletion:
    """What the server answered for one prompt (the attributes `generate` reads from a runtime `Completion`)."""
    text: str
    finish_reason: Finish
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RunningServer:
    job_id: int
    url: str  # .../v1
    model: str  # the name requests give
    token: str | None = None

    def describe(self) -> str:
        return f"server job {self.job_id} at {self.url}"


# ---- finding one ---------------------------------------------------------------------------------------------
def find_server(engine: Any, model: str, adapter: str | None, template: str, *, dtype: str | None = None,
                quant: str | None = None) -> RunningServer | None:
    """A running server of this model (and adapter, template; dtype and quant when given) that answers now."""
    from llmplan.runtime.store.repository import JobFilter, JobKind, JobStatus, list_jobs

    from llmplan.runtime.infer.serve import SERVE_KEY, server_url

    for job in list_jobs(engine, JobFilter(statuses=(JobStatus.RUNNING,), kind=JobKind.SERVE, limit=100)):
        options, plan = job.request.get(SERVE_KEY) or {}, job.plan or {}
        if (job.request.get("model") != model or _real(options.get("adapter")) != _real(adapter)
                or options.get("template") != template or dtype not in (None, plan.get("dtype"))
                or quant not in (None, plan.get("quant"))):
            continue
        token = os.environ.get(TOKEN_ENV) if options.get("token_sha256") else None
        if options.get("token_sha256") and (not token or _digest(token) != options["token_sha256"]):
            continue
        server = RunningServer(job.id, server_url(job), model, token)
        if answers(server):
            return server
    return None


def answers(server: RunningServer) -> bool:
    try:
        _call(server, "GET", "/models", None, CONNECT_TIMEOUT_S).close()
    except (OSError, ServerError):
        return False
    return True


def _real(path: str | None) -> str | None:
    return os.path.realpath(path) if path else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---- asking it -----------------------------------------------------------------------------------------------
def request_body(server: RunningServer, prompt: Any, settings: Any, stream: bool = False) -> tuple[str, dict]:
    """The endpoint and body for one prompt already in its template: text or a dialog (a sequence of messages)."""
    sampling = {"model": server.model, "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "seed": settings.seed, "stream": stream}
    if stream:
        sampling["stream_options"] = {"include_usage": True}
    if isinstance(prompt, str):
        return "/completions", {**sampling, "prompt": prompt}
    messages = [{"role": getattr(m.role, "value", m.role), "content": m.content} for m in prompt]
    return "/chat/completions", {**sampling, "messages": messages}


def complete(server: RunningServer, prompt: Any, settings: Any) -> ServedCompletion:
    path, body = request_body(server, prompt, settings)
    with _call(server, "POST", path, body, ANSWER_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    choice, usage = answer["choices"][0], answer["usage"]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return ServedCompletion(text, Finish(choice["finish_reason"]), usage["prompt_tokens"], usage["completion_tokens"])


def stream(server: RunningServer, prompt: Any, settings: Any) -> Iterator[str | ServedCompletion]:
    """Text pieces as the server sends them (server-sent events), then the whole `ServedCompletion`."""
    path, body = request_body(server, prompt, settings, stream=True)
    text, finish, usage = "", Finish.STOP, {}
    with _call(server, "POST", path, body, ANSWER_TIMEOUT_S) as response:
        for line in response:
            data = line.decode().strip().removeprefix("data:").strip()
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(chunk["error"]["message"])
            if not chunk["choices"]:  # the last chunk: the usage
                usage = chunk.get("usage") or {}
                continue
            choice = chunk["choices"][0]
            piece = choice.get("text", choice.get("delta", {}).get("content")) or ""
            if piece:
                text += piece
                yield piece
            if choice.get("finish_reason"):
                finish = Finish(choice["finish_reason"])
    yield ServedCompletion(text, finish, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def _call(server: RunningServer, method: str, path: str, body: dict | None, timeout: float) -> Any:
    headers = {"Content-Type": "application/json"}
    if server.token:
        headers["Authorization"] = f"Bearer {server.token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {error.code}"
        raise ServerError(f"{server.describe()} refused the request: {message}") from None


@dataclass(frozen=True)
class ServedReport:
    """One call's answers, shaped as the runtime's `GenerationReport` where `llmplan chat` reads it."""
    completions: tuple[ServedCompletion, ...]
    peak_reserved_bytes: int | None = None  # the server's memory is its own job's


def served_report(server: RunningServer, template: Any, item: Any, settings: Any) -> ServedReport:
    """A prompt (or dialog) answered by the server in `template`, as `llmplan chat` asks a replica."""
    from llmplan.runtime.text.prompt_templates import apply_template

    return ServedReport((complete(server, apply_template(template, item), settings),))


# ---- a generate job through it -------------------------------------------------------------------------------
def run_job(engine: Any, job_id: int, server: RunningServer, items: Sequence[Any], template: Any, settings: Any,
            output: Path, on_text: Callable[[str], None] | None = None) -> Any:
    """Answer a recorded `generate` job's prompts through the server (concurrently, so that they batch), record
    it as `inference_job.run` does; every failure ends the job as failed, never raises."""
    from llmplan.runtime.store.repository import JobStatus, transition

    from llmplan.runtime.jobs.failures import mark_scheduled
    from llmplan.runtime.infer.inference_job import record_failure, record_success, write_completions
    from llmplan.runtime.text.prompt_templates import apply_template

    try:
        mark_scheduled(engine, job_id, f"answered by {server.describe()}")
        transition(engine, job_id, JobStatus.RUNNING, message=f"answered by {server.describe()}")
        prompts = [apply_template(template, item) if template is not None else item for item in items]
        started = time.perf_counter()
        if on_text is not None and len(prompts) == 1:
            answers = [_streamed(server, prompts[0], settings, on_text)]
        else:
            with ThreadPoolExecutor(max(1, min(len(prompts), settings.batch_size))) as pool:
                answers = list(pool.map(lambda prompt: complete(server, prompt, settings), prompts))
        seconds = time.perf_counter() - started
        write_completions(output, items, answers)
        return record_success(engine, job_id, answers, [], seconds, output)
    except Exception as error:  # noqa: BLE001 - the job records whatever ended it
        return record_failure(engine, job_id, error)


def _streamed(server: RunningServer, prompt: Any, settings: Any, on_text: Callable[[str], None]) -> ServedCompletion:
    for item in stream(server, prompt, settings):
        if isinstance(item, str):
            on_text(item)
        else:
            return item
    raise ServerError(f"{server.describe()} ended the stream without finishing it")
