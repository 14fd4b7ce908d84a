"""The dashboard (`llmplan ui`): its page at `/` (web_page.py) and its JSON API, served by FastAPI on uvicorn;
what each call does is in web_actions.py (the same planner, store and scheduler functions as the CLI).

    GET  /api/health                   {"ok": true}
    GET  /api/models                   the model catalog
    GET  /api/choices                  the submit form's menus: {task: {option: [values]}}
    GET  /api/gpus                     the local GPUs (NVML), as `llmplan gpus --json`
    POST /api/plan                     `llmplan fit --json` for a form: {"model", "gpus", "gpu", "gpu_mem", "task", ...}
    GET  /api/jobs?status=&kind=&model=&limit=   job history, as `llmplan jobs --json`
    GET  /api/jobs/ID                  one job with events, metrics and planned vs measured, as `llmplan show --json`
    GET  /api/jobs/ID/log?offset=N     the log from byte N: {"text", "offset", "ended"}
    POST /api/jobs                     a job spec, as `llmplan submit SPEC.yaml` reads one ({"task": "finetune",
                                       "model", "data", "micro-batch": 4, "max-steps": 30, ...}; or "task": "infer"
                                       with "prompt": [...] or "input"): planned for the cluster, checked and queued
                                       as `llmplan submit` does it: {"id", "plan", "log"}
    POST /api/jobs/ID/cancel           as `llmplan cancel --no-wait`: {"id", "status"}
    POST /api/jobs/ID/merge            {"output": FOLDER}: a succeeded LoRA job's adapter merged into its base
                                       model at a new folder, as `llmplan merge` (409 for any other job)
    POST /api/chat                     {"model" | "job", "adapter"?, "messages": [{"role", "content"}],
                                       "max_new_tokens"?}: the assistant's reply, run and recorded as `llmplan chat`
                                       runs a turn: {"job", "reply", "finish_reason", "tokens_per_s"} (web_chat.py)
    POST /api/data/preview             a data file before submitting: {"path", "model"?}: {"format", "records",
                                       "rows", "tokens": {"min", "median", "max", "counted_by"}} (web_data.py)

History, logs and plans come from the job store and the planner: they are served while the Ray cluster is
down. Submitting (and waking the scheduler on cancel) talks to Ray from a short-lived process (web_ray.py):
while the cluster is unreachable a submission answers 503 and says so.

Security: bound to loopback by default, where no token is needed and only requests for the names the server
was started for are answered (127.0.0.1, localhost, [::1] and --host, with its port; any other Host header is
421, which stops DNS rebinding). On any other address every call needs the token (printed at start, or
--token) as `Authorization: Bearer TOKEN`. State-changing calls are POST with a JSON body (a cross-site form
cannot send one) and, when the browser sends an Origin, only from the dashboard's own origin.
Errors are JSON {"error": "..."} with a 4xx status, never a stack trace; "field" names the job spec key at
fault when the error is about one.

Limits: a body of at most MAX_BODY_BYTES, read within BODY_TIMEOUT_S; a connection that sends no whole request
head within idle_timeout_s is closed (uvicorn's keep-alive timer, also run before the first request); at most
MAX_CONNECTIONS connections (more are answered 503); calls run on a bounded thread pool.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from .web_actions import (Scope, cancel_json, job_json, list_jobs_json, list_models, local_gpus, log_tail,
                          merge_json, option_choices, plan_json, submit_json)
from .web_chat import chat_json
from .web_data import preview_json
from llmplan.runtime.web.http_guards import (IDLE_TIMEOUT_S, LOOPBACK_HOSTS, MAX_CONNECTIONS, MAX_HEAD_BYTES,
                                         HeadDeadlineProtocol, host_headers, json_body, listening_socket)

from .web_errors import ApiError, error_answer, error_document

MAX_ID = (1 << 63) - 1  # the store's ids and a log's offsets are 64-bit
JobId = Annotated[int, PathParameter(ge=1, le=MAX_ID)]
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                "X-Frame-Options": "DENY"}
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
log = logging.getLogger("llmplan.ui")


@dataclass(frozen=True)
class DashboardConfig:
    db_url: str  # the job store, as every process opens it
    host: str = "127.0.0.1"
    port: int = 8321  # not Ray's dashboard (8265); 0: any free port
    token: str | None = None  # required off loopback
    roots: tuple[Path, ...] = ()  # where data and model paths may be (submit, plan), resolved
    address: str | None = None  # the Ray cluster jobs are queued on (None: as `llmplan submit` decides)
    idle_timeout_s: float = IDLE_TIMEOUT_S  # for a request head to arrive, and between requests

    @property
    def needs_token(self) -> bool:
        return self.host not in LOOPBACK_HOSTS

    @property
    def scope(self) -> Scope:
        return Scope(db_url=self.db_url, roots=self.roots, address=self.address)

    def host_headers(self) -> frozenset[str] | None:
        return host_headers(self.host, self.port)


def make_config(db_url: str, host: str, port: int, token: str | None, roots: tuple[Path, ...],
                address: str | None = None) -> DashboardConfig:
    """The configuration to serve with; off loopback a token is generated when none is given."""
    if host not in LOOPBACK_HOSTS and not token:
        token = secrets.token_urlsafe(24)
    return DashboardConfig(db_url=db_url, host=host, port=port, token=token,
                           roots=tuple(root.resolve() for root in roots), address=address)


# ---- request models ---------------------------------------------------------------------------------------
class PlanForm(BaseModel):
    """The plan form's fields (`llmplan fit`'s options); a blank value is the option's default."""
    model_config = ConfigDict(extra="forbid", str_max_length=4096)

    model: str
    gpus: int | None = Field(None, ge=1, le=4096)
    gpu: str | None = None
    gpu_mem: str | None = None
    task: str | None = None
    method: str | None = None
    seq_len: int | None = Field(None, ge=1, le=1 << 22)
    batch_size: int | None = Field(None, ge=1, le=1 << 20)
    prompt_len: int | None = Field(None, ge=1, le=1 << 22)
    max_new_tokens: int | None = Field(None, ge=1, le=1 << 22)
    margin: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    top: int | None = Field(None, ge=1, le=100)

    @field_validator("*", mode="before")
    @classmethod
    def blank_is_default(cls, value: Any) -> Any:
        return None if value == "" else value


def plan_form(body: dict[str, Any]) -> dict[str, Any]:
    """The form's values, or ApiError naming what is wrong with them."""
    try:
        return PlanForm.model_validate(body).model_dump()
    except ValidationError as error:
        problems = error.errors()
    unknown = sorted(str(problem["loc"][0]) for problem in problems if problem["type"] == "extra_forbidden")
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    first = problems[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if field == "model" and body.get("model") in (None, ""):
        raise ApiError(HTTPStatus.BAD_REQUEST, "model is required", "model")
    raise ApiError(HTTPStatus.BAD_REQUEST, f"bad field value: {field}: {first['msg']}", field)


# ---- responses and errors ---------------------------------------------------------------------------------
def json_document(document: Any, status: int = HTTPStatus.OK) -> Response:
    return Response(json.dumps(document, default=str), status_code=status, media_type="application/json",
                    headers=JSON_HEADERS)


def error_response(status: int, message: str, field: str | None = None) -> Response:
    return json_document(error_document(message, field), status)


class JsonErrorRoute(APIRoute):
    """Every failure of a call (its checks included) as {"error"} JSON with its status, never a stack trace."""

    def get_route_handler(self):  # noqa: ANN201 - FastAPI's own type
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # the app's handlers below
            except Exception as error:  # noqa: BLE001 - one line for the page
                status, message, field = error_answer(error)
                if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
                    log.exception("%s %s failed", request.method, request.url.path)
                return error_response(status, message, field)

        return answer


async def http_error(request: Request, error: HTTPException) -> Response:
    message = str(error.detail)
    if error.status_code == HTTPStatus.NOT_FOUND:
        message = f"no such page: {request.url.path}"
    elif error.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        allowed = (error.headers or {}).get("Allow", "")
        message = f"{request.method} {request.url.path} is not a call: use {allowed or 'another method'}" + (
            " with a JSON body" if allowed == "POST" else "")
    response = error_response(error.status_code, message)
    response.headers.update(error.headers or {})
    return response


async def validation_error(request: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return error_response(HTTPStatus.BAD_REQUEST, f"{field}: {first['msg']}" if field else first["msg"], field)


# ---- checks -----------------------------------------------------------------------------------------------
def host_check(config: DashboardConfig):  # noqa: ANN201
    allowed = config.host_headers()

    async def check_host(request: Request) -> None:
        if allowed is not None and request.headers.get("host", "").lower() not in allowed:
            raise ApiError(HTTPStatus.MISDIRECTED_REQUEST,
                           f"this dashboard answers only for {', '.join(sorted(allowed))} (Host header refused)")

    return check_host


def token_check(config: DashboardConfig):  # noqa: ANN201
    expected = (config.token or "").encode()

    async def check_token(request: Request) -> None:
        if not config.needs_token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        # Headers arrive as latin-1 text: compared as the bytes that were sent, whatever they are.
        if not given or not hmac.compare_digest(given.encode("latin-1", "replace"), expected):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "this dashboard needs its token: Authorization: Bearer TOKEN")

    return check_token


async def same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise ApiError(HTTPStatus.FORBIDDEN, f"cross-site request from {origin} refused")


Body = Annotated[dict[str, Any], Depends(json_body)]


# ---- the application ----------------------------------------------------------------------------------------
def create_app(config: DashboardConfig) -> FastAPI:
    """The dashboard's page and API for `config` (its port the one bound: the Host check names it)."""
    from llmplan.runtime.store.opening import open_store

    from .web_page import PAGE

    engine = open_store(config.db_url)
    ray_calls = threading.Lock()  # one Ray call at a time: each is a process of its own

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        yield
        engine.dispose()

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(host_check(config))],
                  exception_handlers={HTTPException: http_error, RequestValidationError: validation_error})
    app.router.route_class = JsonErrorRoute
    api = [Depends(token_check(config))]
    posted = [*api, Depends(same_origin)]

    @app.get("/")
    def page() -> Response:  # static, holds no data: the calls it makes carry the token
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/api/health", dependencies=api)
    def health() -> Response:
        return json_document({"ok": True})

    @app.get("/api/models", dependencies=api)
    def models() -> Response:
        return json_document(list_models())

    @app.get("/api/choices", dependencies=api)
    def choices() -> Response:
        return json_document(option_choices())

    @app.get("/api/gpus", dependencies=api)
    def gpus() -> Response:
        return json_document(local_gpus())

    @app.get("/api/jobs", dependencies=api)
    def jobs(status: Annotated[list[str], Query()] = [], kind: str | None = None,  # noqa: B006 - FastAPI's idiom
             model: str | None = None, limit: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> Response:
        return json_document(list_jobs_json(engine, status, kind, model, limit))

    @app.get("/api/jobs/{job_id}", dependencies=api)
    def job(job_id: JobId) -> Response:
        return json_document(job_json(engine, job_id))

    @app.get("/api/jobs/{job_id}/log", dependencies=api)
    def job_log(job_id: JobId, offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> Response:
        return json_document(log_tail(engine, job_id, offset))

    @app.post("/api/plan", dependencies=posted)
    def plan(body: Body) -> Response:
        return json_document(plan_json(plan_form(body), config.roots))

    @app.post("/api/jobs", dependencies=posted)
    def submit(body: Body) -> Response:
        with ray_calls:
            return json_document(submit_json(config.scope, body))

    @app.post("/api/jobs/{job_id}/merge", dependencies=posted)
    def merge(job_id: JobId, body: Body) -> Response:
        return json_document(merge_json(config.scope, engine, job_id, body))

    @app.post("/api/chat", dependencies=posted)
    def chat(body: Body) -> Response:
        with ray_calls:
            return json_document(chat_json(config.scope, engine, body))

    @app.post("/api/data/preview", dependencies=posted)
    def data_preview(body: Body) -> Response:
        return json_document(preview_json(body, config.roots))

    @app.post("/api/jobs/{job_id}/cancel", dependencies=posted)
    def cancel(job_id: JobId, body: Body) -> Response:
        with ray_calls:
            return json_document(cancel_json(config.scope, engine, job_id))

    return app


# ---- serving --------------------------------------------------------------------------------------------------
def bind(config: DashboardConfig) -> socket.socket:
    return listening_socket(config.host, config.port)


def server_for(config: DashboardConfig, listener: socket.socket) -> Any:
    """A uvicorn server for the dashboard on `listener` (`.run(sockets=[listener])` serves)."""
    import uvicorn

    bound = replace(config, port=listener.getsockname()[1])
    settings = uvicorn.Config(create_app(bound), http=HeadDeadlineProtocol, lifespan="on", log_config=None,
                              log_level="warning", access_log=False, server_header=False,
                              timeout_keep_alive=bound.idle_timeout_s, limit_concurrency=MAX_CONNECTIONS,
                              h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_graceful_shutdown=5)
    return uvicorn.Server(settings)


@dataclass
class RunningDashboard:
    """A dashboard served from a thread of this process (tests; `llmplan ui` serves from its main thread)."""
    server: Any
    thread: threading.Thread
    server_address: tuple[str, int]

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(config: DashboardConfig, start_timeout_s: float = 30) -> RunningDashboard:
    """A started dashboard; `.server_address` says where; `.shutdown()` stops it."""
    listener = bind(config)
    server = server_for(config, listener)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="llmplan-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the dashboard's server did not start")
    return RunningDashboard(server, thread, listener.getsockname()[:2])
