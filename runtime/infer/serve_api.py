"""The OpenAI-compatible HTTP API of `llmplan serve`, on FastAPI and uvicorn (the dashboard's stack), so that
the `openai` client and curl work unchanged:

    GET  /v1/models             {"object": "list", "data": [{"id": MODEL, "object": "model", ...}]}
    POST /v1/completions        {"model", "prompt": TEXT | [TEXT, ...], "max_tokens"?, "temperature"?, "top_p"?,
                                 "seed"?, "stream"?}: OpenAI's text_completion (chunks with "stream": true)
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], "max_tokens"? (or
                                 "max_completion_tokens"), ...}: OpenAI's chat.completion (chunks when streamed)
    GET  /health                {} (200 once the model is loaded)
    GET  /stats                 llmplan's counters: requests, batches, tokens, tokens_per_s

Streams are server-sent events (`data: {chunk}` lines, then `data: [DONE]`), as OpenAI sends them. A text
prompt is completed as written; a dialog is sent in the server's prompt template (`prompt_templates`).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for anything
the client can fix: an unknown model (404), a body that is not JSON (400, 415 when not sent as JSON), missing
or malformed messages, max_tokens outside 1..the planned maximum, a prompt longer than the model's context,
options the server does not support (n > 1, stop, echo, logprobs, tools).

Security, as the dashboard's (cli/web_api.py): on loopback no token; on any other address every call needs
`Authorization: Bearer TOKEN` (the server keeps only the token's SHA-256), and only the Host names the server
was started for are answered (DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from itertools import chain
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from llmplan.runtime.web.http_guards import LOOPBACK_HOSTS, ApiError, host_headers, json_body

from llmplan.runtime.text.chat import DialogError, Dialog, PromptItem, validate_dialog
from llmplan.runtime.infer.generation import Completion, GenerationSettings, InferenceError
from llmplan.runtime.text.prompt_templates import PromptTemplate, apply_template
from llmplan.runtime.infer.serve_batching import Batcher, StreamEnd

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
Body = Annotated[dict[str, Any], Depends(json_body)]  # the dashboard's checked JSON body (413, 415, 400)
ERROR_TYPES = {HTTPStatus.UNAUTHORIZED: "authentication_error", HTTPStatus.NOT_FOUND: "invalid_request_error"}


@dataclass(frozen=True)
class ServeConfig:
    model_id: str  # the name /v1/models lists and requests give as "model"
    host: str = "127.0.0.1"
    port: int = 8000
    token_sha256: str | None = None  # required off loopback: hex SHA-256 of the token calls carry
    max_new_tokens: int = 256  # the most a request may ask for: what the plan sized the memory for
    aliases: tuple[str, ...] = ()  # other names accepted as "model" (the catalog name)

    @property
    def needs_token(self) -> bool:
        return self.host not in LOOPBACK_HOSTS

    def host_headers(self) -> frozenset[str] | None:
        """The Host headers answered (the dashboard's rule: loopback names and the bound host, with the port)."""
        return host_headers(self.host, self.port)

    def serves(self, model: str) -> bool:
        return model in (self.model_id, *self.aliases)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---- errors ---------------------------------------------------------------------------------------------------
class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    kind = "server_error" if status >= 500 else ERROR_TYPES.get(HTTPStatus(status), "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=JSON_HEADERS)


async def openai_error(_: Request, error: OpenAIError) -> Response:
    return error_response(error.status, str(error), error.param, error.code)


async def api_error(_: Request, error: ApiError) -> Response:  # the dashboard's body checks (json_body)
    return error_response(error.status, str(error), error.field)


async def http_error(request: Request, error: HTTPException) -> Response:
    message = str(error.detail)
    if error.status_code == HTTPStatus.NOT_FOUND:
        message = f"no such endpoint: {request.url.path} (this server has /v1/models, /v1/completions, " \
                  "/v1/chat/completions)"
    elif error.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        message = f"{request.method} is not allowed on {request.url.path}"
    response = error_response(error.status_code, message)
    response.headers.update(error.headers or {})
    return response


async def validation_error(_: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0]
    return error_response(HTTPStatus.BAD_REQUEST, first["msg"], str(first["loc"][-1]) if first.get("loc") else None)


async def unexpected_error(_: Request, error: Exception) -> Response:
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")


# ---- requests -------------------------------------------------------------------------------------------------
class Sampling(BaseModel):
    """What both endpoints share. Unknown fields are ignored (clients send their own); fields that would change
    the answer in a way this server cannot honour are refused."""
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=4096)
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int = Field(0, ge=0, lt=2**63)
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: Any = None
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(Sampling):
    prompt: str | list[str]
    echo: bool = False


class ChatBody(Sampling):
    messages: list[Any]
    max_completion_tokens: int | None = None
    tools: Any = None


def parsed(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing":
            raise OpenAIError(HTTPStatus.BAD_REQUEST, f"{param} is required", param) from None
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"{param}: {first['msg']}", param) from None


def refuse_unsupported(body: Sampling, **others: Any) -> None:
    unsupported = {"n": body.n != 1, "stop": bool(body.stop), "logprobs": bool(body.logprobs),
                   **{name: bool(value) for name, value in others.items()}}
    for param, asked in unsupported.items():
        if asked:
            raise OpenAIError(HTTPStatus.BAD_REQUEST, f"{param} is not supported by this server: leave it out", param)


def settings_of(body: Sampling, max_tokens: int | None, default_tokens: int, limit: int) -> GenerationSettings:
    tokens = default_tokens if max_tokens is None else max_tokens
    if not 1 <= tokens <= limit:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"max_tokens must be between 1 and {limit} (what this server was "
                          f"planned for; restart it with a larger --max-new-tokens for more), got {tokens}",
                          "max_tokens")
    return GenerationSettings(max_new_tokens=tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed)


def dialog_of(messages: list[Any]) -> Dialog:
    """OpenAI's messages as a dialog: content as text or text parts; "developer" is the system prompt."""
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OpenAIError(HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object with role and content",
                              "messages")
        role = "system" if message.get("role") == "developer" else message.get("role")
        plain.append({"role": role, "content": text_of(message.get("content"), index)})
    try:
        return validate_dialog(plain)
    except DialogError as error:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"messages: {error}", "messages") from None


def text_of(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise OpenAIError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content must be text (or a list of text parts)",
                      "messages")


# ---- answers --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """What every answer (and chunk) of one request carries."""
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_document(reply: Reply, completions: list[Completion]) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason.value}
               for i, c in enumerate(completions)]
    return {**reply.head("text_completion"), "choices": choices, "usage": usage(completions)}


def chat_document(reply: Reply, completion: Completion) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": completion.text}, "logprobs": None,
              "finish_reason": completion.finish_reason.value}
    return {**reply.head("chat.completion"), "choices": [choice], "usage": usage([completion])}


def completion_chunk(reply: Reply, text: str, finish: str | None) -> dict[str, Any]:
    return {**reply.head("text_completion"), "choices": [{"index": 0, "text": text, "logprobs": None,
                                                          "finish_reason": finish}]}


def chat_chunk(reply: Reply, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {**reply.head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                "finish_reason": finish}]}


def usage_chunk(reply: Reply, kind: str) -> Any:
    """The last chunk of a stream asked with stream_options.include_usage: no choices, the usage."""
    return lambda completion: {**reply.head(kind), "choices": [], "usage": usage([completion])}


def event(document: Any) -> str:
    return f"data: {json.dumps(document)}\n\n"


def events(pieces: Iterator[str | StreamEnd], chunk: Any, usage_of: Any = None) -> Iterator[str]:
    """Server-sent events: a chunk per piece, one with the finish reason (then the usage, when asked for with
    stream_options.include_usage), then [DONE]; an error mid-stream is sent as an error event (the status line
    has gone already)."""
    try:
        for piece in pieces:
            if not isinstance(piece, StreamEnd):
                yield event(chunk(piece, None))
                continue
            yield event(chunk(None, piece.finish_reason.value))
            if usage_of is not None:
                yield event(usage_of(piece.completion))
    except Exception as error:  # noqa: BLE001 - the client reads it as OpenAI's error shape
        yield event({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error", "param": None,
                               "code": None}})
    yield "data: [DONE]\n\n"


def recipe_errors(run: Any) -> Any:
    """The recipe's refusals (a prompt longer than the context, an empty prompt) as 400."""
    try:
        return run()
    except (InferenceError, DialogError) as error:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, str(error), "prompt") from None


# ---- the application -------------------------------------------------------------------------------------------
def create_app(config: ServeConfig, batcher: Batcher, template: PromptTemplate) -> FastAPI:
    allowed = config.host_headers()
    started = int(time.time())

    async def guard(request: Request) -> None:
        if allowed is not None and request.headers.get("host", "").lower() not in allowed:
            raise OpenAIError(HTTPStatus.MISDIRECTED_REQUEST,
                              f"this server answers only for {', '.join(sorted(allowed))} (Host header refused)")
        if config.needs_token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            digest = token_digest(given).encode() if given else b""
            if not hmac.compare_digest(digest, (config.token_sha256 or "").encode()):
                raise OpenAIError(HTTPStatus.UNAUTHORIZED, "this server needs its token: Authorization: Bearer TOKEN "
                                  "(the openai client: api_key=TOKEN)", code="invalid_api_key")

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, dependencies=[Depends(guard)],
                  exception_handlers={OpenAIError: openai_error, ApiError: api_error, HTTPException: http_error,
                                      RequestValidationError: validation_error, Exception: unexpected_error})

    def check_model(model: str) -> None:
        if not config.serves(model):
            raise OpenAIError(HTTPStatus.NOT_FOUND, f"the model {model!r} does not exist here: this server serves "
                              f"{config.model_id!r}", "model", "model_not_found")

    @app.get("/health")
    def health() -> Response:
        return Response("{}", media_type="application/json")

    @app.get("/stats")
    def stats() -> Response:
        return Response(json.dumps(batcher.snapshot().to_dict()), media_type="application/json", headers=JSON_HEADERS)

    @app.get("/v1/models")
    def models() -> Response:
        listed = {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": started,
                                               "owned_by": "llmplan"}]}
        return Response(json.dumps(listed), media_type="application/json", headers=JSON_HEADERS)

    @app.post("/v1/completions")
    def completions(body: Body) -> Response:
        request = parsed(CompletionBody, body)
        check_model(request.model)
        refuse_unsupported(request, echo=request.echo)
        settings = settings_of(request, request.max_tokens, COMPLETION_DEFAULT_TOKENS, config.max_new_tokens)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise OpenAIError(HTTPStatus.BAD_REQUEST, "prompt is empty: give a text (or a list of texts)", "prompt")
        reply = Reply.new("cmpl", request.model)
        if request.stream:
            if len(prompts) > 1:
                raise OpenAIError(HTTPStatus.BAD_REQUEST, "stream one prompt at a time", "prompt")
            return streamed(prompts[0], settings, lambda text, finish: completion_chunk(reply, text or "", finish),
                            usage_chunk(reply, "text_completion") if request.include_usage else None)
        futures = [batcher.submit(prompt, settings) for prompt in prompts]
        answers = recipe_errors(lambda: [future.result() for future in futures])
        return json_response(completion_document(reply, answers))

    @app.post("/v1/chat/completions")
    def chat_completions(body: Body) -> Response:
        request = parsed(ChatBody, body)
        check_model(request.model)
        refuse_unsupported(request, tools=request.tools)
        if not request.messages:
            raise OpenAIError(HTTPStatus.BAD_REQUEST, "messages is empty: give at least one user message", "messages")
        asked = request.max_completion_tokens if request.max_tokens is None else request.max_tokens
        settings = settings_of(request, asked, config.max_new_tokens, config.max_new_tokens)
        prompt = recipe_errors(lambda: apply_template(template, dialog_of(request.messages)))
        reply = Reply.new("chatcmpl", request.model)
        if request.stream:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                return chat_chunk(reply, {} if text is None else {"content": text}, finish)

            opening = event(chat_chunk(reply, {"role": "assistant", "content": ""}, None))
            return streamed(prompt, settings, chunk,
                            usage_chunk(reply, "chat.completion.chunk") if request.include_usage else None, opening)
        return json_response(chat_document(reply, recipe_errors(lambda: batcher.answer(prompt, settings))))

    def streamed(prompt: PromptItem, settings: GenerationSettings, chunk: Any, usage_of: Any,
                 opening: str = "") -> Response:
        pieces = batcher.stream(prompt, settings)
        first = recipe_errors(lambda: next(pieces))  # a refused prompt is a 400, not a broken stream
        body = chain([opening] if opening else [], events(chain([first], pieces), chunk, usage_of))
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app


def json_response(document: Any) -> Response:
    return Response(json.dumps(document), media_type="application/json", headers=JSON_HEADERS)
