"""The dashboard (`llmplan ui`): its page at `/` (web_page.py) and its JSON API, which calls the same planner,
store and scheduler functions as the CLI.

    GET  /api/health                   {"ok": true}
    GET  /api/models                   the model catalog
    GET  /api/gpus                     the local GPUs (NVML), as `llmplan gpus --json`
    POST /api/plan                     `llmplan fit --json` for a form: {"model", "gpus", "gpu", "gpu_mem", "task", ...}
    GET  /api/jobs?status=&kind=&model=&limit=   job history, as `llmplan jobs --json`
    GET  /api/jobs/ID                  one job with events, metrics and planned vs measured, as `llmplan show --json`
    GET  /api/jobs/ID/log?offset=N     the log from byte N: {"text", "offset", "ended"}
    POST /api/jobs                     a job spec, as `llmplan submit SPEC.yaml` reads one ({"task": "finetune",
                                       "model", "data", "micro-batch": 4, "max-steps": 30, ...}; or "task": "infer"
                                       with "prompt": [...] or "input"): planned for the cluster, checked and queued
                                       as `llmplan submit` does it: {"id", "plan", "log"}
    POST /api/jobs/ID/cancel           as `llmplan cancel --no-wait`

Paths in a submission (data, input, output, adapter, and a model given as a path rather than a catalog name)
must resolve, symlinks followed, inside one of the --root folders; the ones read must exist and be readable.

Security: bound to loopback by default. On any other address every call needs the token (printed at start,
or --token) as `Authorization: Bearer TOKEN`. State-changing calls are POST with a JSON body (a cross-site
form cannot send one) and, when the browser sends an Origin, only from the dashboard's own origin.
Errors are JSON {"error": "..."} with a 4xx status, never a stack trace; "field" names the job spec key at
fault when the error is about one.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_BODY_BYTES = 1 << 20
LOG_CHUNK_BYTES = 1 << 16
JOB_PATH = re.compile(r"^/api/jobs/(\d+)(/log|/cancel)?$")
# An error about one option names it first ("--max-steps must be positive") or quoted ("Invalid value for '--lr'").
OPTION_AT_FAULT = re.compile(r"^--([a-z][a-z0-9-]*)|'--([a-z][a-z0-9-]*)'")
# Spec keys that steer the submitting process, not the job: the dashboard decides them (or offers none).
WITHHELD_KEYS = frozenset({"db", "json", "wait", "address", "resume"})


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


class FieldError(ApiError):
    """A submitted value that is refused: 400, naming its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(HTTPStatus.BAD_REQUEST, message, field)


@dataclass(frozen=True)
class DashboardConfig:
    db_url: str  # the job store, as every process opens it
    host: str = "127.0.0.1"
    port: int = 8321  # not Ray's dashboard (8265)
    token: str | None = None  # required off loopback
    roots: tuple[Path, ...] = ()  # where data and model paths may be (submit), resolved
    address: str | None = None  # the Ray cluster jobs are queued on (None: as `llmplan submit` decides)

    @property
    def needs_token(self) -> bool:
        return self.host not in LOOPBACK_HOSTS


def make_config(db_url: str, host: str, port: int, token: str | None, roots: tuple[Path, ...],
                address: str | None = None) -> DashboardConfig:
    """The configuration to serve with; off loopback a token is generated when none is given."""
    if host not in LOOPBACK_HOSTS and not token:
        token = secrets.token_urlsafe(24)
    return DashboardConfig(db_url=db_url, host=host, port=port, token=token,
                           roots=tuple(root.resolve() for root in roots), address=address)


def serve(config: DashboardConfig) -> ThreadingHTTPServer:
    """A started server (its own thread); `.server_address` says where; `.shutdown()` stops it."""
    from llmplan.runtime.store.db import open_store

    engine = open_store(config.db_url)
    # One submission at a time: the first joins the Ray cluster, which a process does once.
    handler = type("DashboardHandler", (Handler,), {"config": config, "engine": engine,
                                                   "submit_lock": threading.Lock()})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="llmplan-ui", daemon=True).start()
    return server


# ---- the handler ------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    config: DashboardConfig
    engine: Any
    submit_lock: threading.Lock
    server_version = "llmplan-ui"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if urlsplit(self.path).path == "/":
            self._send_page()  # static, holds no data: the calls it makes carry the token
            return
        self._respond(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._respond(self._post)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the CLI prints its own line
        return

    # -- dispatch --
    def _respond(self, route: Callable[[str, dict[str, list[str]]], Any]) -> None:
        parts = urlsplit(self.path)
        try:
            self._check_token()
            document = route(parts.path, parse_qs(parts.query))
            self._send(HTTPStatus.OK, document)
        except ApiError as error:
            self._send(error.status, _error_document(str(error), error.field))
        except Exception as error:  # noqa: BLE001 - one line for the page, never a stack trace
            status, message = _user_facing(error)
            self._send(status, _error_document(message, getattr(error, "field", None) or _option_named(message)))

    def _get(self, path: str, query: dict[str, list[str]]) -> Any:
        if path == "/api/health":
            return {"ok": True}
        if path == "/api/models":
            return list_models()
        if path == "/api/gpus":
            return local_gpus()
        if path == "/api/jobs":
            return list_jobs_json(self.engine, query)
        match = JOB_PATH.match(path)
        if match and match.group(2) is None:
            return job_json(self.engine, int(match.group(1)))
        if match and match.group(2) == "/log":
            return log_tail(self.engine, int(match.group(1)), int(_one(query, "offset") or 0))
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _post(self, path: str, query: dict[str, list[str]]) -> Any:
        self._check_same_origin()
        body = self._json_body()
        if path == "/api/plan":
            return plan_json(body)
        if path == "/api/jobs":
            with self.submit_lock:
                return submit_json(self.config, self.engine, body)
        match = JOB_PATH.match(path)
        if match and match.group(2) == "/cancel":
            return cancel_json(self.engine, int(match.group(1)))
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such call: POST {path}")

    # -- checks --
    def _check_token(self) -> None:
        if not self.config.needs_token:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given, self.config.token or ""):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "this dashboard needs its token: Authorization: Bearer TOKEN")

    def _check_same_origin(self) -> None:
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin is not None and urlsplit(origin).netloc != host:
            raise ApiError(HTTPStatus.FORBIDDEN, f"cross-site request from {origin} refused")

    def _json_body(self) -> dict[str, Any]:
        if self.headers.get_content_type() != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send a JSON body (Content-Type: application/json)")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as error:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error.msg}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _send_page(self) -> None:
        from .web_page import PAGE

        self._write(HTTPStatus.OK, PAGE.encode(), {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            "X-Frame-Options": "DENY"})

    def _send(self, status: HTTPStatus, document: Any) -> None:
        self._write(status, json.dumps(document, default=str).encode(), {
            "Content-Type": "application/json", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    def _write(self, status: HTTPStatus, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _error_document(message: str, field: str | None) -> dict[str, str]:
    return {"error": message, "field": field} if field else {"error": message}


def _option_named(message: str) -> str | None:
    """The field an error is about, when its message names the option at fault."""
    match = OPTION_AT_FAULT.search(message)
    return (match.group(1) or match.group(2)) if match else None


def _user_facing(error: Exception) -> tuple[HTTPStatus, str]:
    """Errors the planner and store raise for bad input, as one line; anything else as a server error."""
    import click

    from llmplan.runtime.store.errors import UnknownJobError

    if isinstance(error, UnknownJobError):
        return HTTPStatus.NOT_FOUND, str(error)
    if isinstance(error, click.ClickException):
        return HTTPStatus.BAD_REQUEST, error.format_message()
    if isinstance(error, (ValueError, LookupError, TypeError)):
        return HTTPStatus.BAD_REQUEST, str(error).splitlines()[0] if str(error) else type(error).__name__
    return HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# ---- what the calls do (the CLI's own functions) ----------------------------------------------------------
def list_models() -> list[dict[str, Any]]:
    from llmplan.planner.model_catalog import MODELS

    return [{"name": m.name, "model_type": m.model_type, "params": m.params} for m in MODELS]


def local_gpus() -> dict[str, Any]:
    from llmplan.planner.nvml_probe import probe_gpus

    return probe_gpus().to_dict()


PLAN_FIELDS = {"model": str, "gpus": int, "gpu": str, "gpu_mem": str, "task": str, "method": str, "seq_len": int,
               "batch_size": int, "prompt_len": int, "max_new_tokens": int, "margin": float, "top": int}


def plan_json(body: dict[str, Any]) -> dict[str, Any]:
    """`llmplan fit --json` for the form's fields (unknown fields are refused)."""
    from llmplan.planner.hardware import deepspeed_preflight, find_nvcc
    from llmplan.planner.nvml_probe import probe_gpus

    from .fit import build_report

    unknown = sorted(set(body) - set(PLAN_FIELDS))
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    if not body.get("model"):
        raise ApiError(HTTPStatus.BAD_REQUEST, "model is required")
    try:
        values = {name: PLAN_FIELDS[name](value) for name, value in body.items() if value not in (None, "")}
    except (TypeError, ValueError) as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"bad field value: {error}") from None
    sizes = {name: values.pop(name, default) for name, default in
             (("seq_len", 512), ("batch_size", 16), ("prompt_len", 512), ("max_new_tokens", 256))}
    report = build_report(values.pop("model"), probe=probe_gpus, preflight=deepspeed_preflight(None, find_nvcc()),
                          gpus=values.get("gpus"), gpu_name=values.get("gpu"), gpu_mem=values.get("gpu_mem"),
                          task=values.get("task", "finetune"), method=values.get("method", "auto"),
                          margin=values.get("margin", 0.10), top=values.get("top", 5), sizes=sizes)
    document = report.to_dict()
    for shown, candidate in zip(document["candidates"], report.result.candidates):
        shown["job"] = candidate_spec(report, candidate)
    return document


def candidate_spec(report: Any, candidate: Any) -> dict[str, Any]:
    """The job spec that runs a candidate (`llmplan fit`'s own), less the data placeholder: the submit form's start."""
    from .fit import DATA_PLACEHOLDER

    spec = {key: value for key, value in report.spec_for(candidate).items() if value != DATA_PLACEHOLDER}
    return {"task": candidate.request.task.value, **spec}


def list_jobs_json(engine: Any, query: dict[str, list[str]]) -> list[dict[str, Any]]:
    from llmplan.runtime.store.repository import DEFAULT_LIST_LIMIT, JobFilter, list_jobs

    from .jobs import job_to_json, parse_kind, parse_statuses

    statuses = tuple(value for values in query.get("status", []) for value in values.split(",") if value)
    job_filter = JobFilter(statuses=parse_statuses(statuses), kind=parse_kind(_one(query, "kind")),
                           model=_one(query, "model"), limit=min(int(_one(query, "limit") or DEFAULT_LIST_LIMIT), 1000))
    return [job_to_json(job) for job in list_jobs(engine, job_filter)]


def job_json(engine: Any, job_id: int) -> dict[str, Any]:
    from llmplan.runtime.store.repository import get_job_details

    from .jobs import details_to_json

    return details_to_json(get_job_details(engine, job_id))


def log_tail(engine: Any, job_id: int, offset: int) -> dict[str, Any]:
    from llmplan.runtime.store.repository import get_job

    job = get_job(engine, job_id)
    ended = job.status.is_terminal()
    if not job.log_path or not Path(job.log_path).is_file():
        return {"text": "", "offset": offset, "ended": ended}
    with open(job.log_path, "rb") as source:
        source.seek(max(offset, 0))
        chunk = source.read(LOG_CHUNK_BYTES)
    return {"text": chunk.decode(errors="replace"), "offset": max(offset, 0) + len(chunk), "ended": ended}


def cancel_json(engine: Any, job_id: int) -> dict[str, Any]:
    from llmplan.runtime.scheduler import cancel_job
    from llmplan.runtime.store.repository import get_job

    status = get_job(engine, job_id).status
    if status.is_terminal():
        raise ApiError(HTTPStatus.CONFLICT, f"job {job_id} already ended: {status.value}")
    job = cancel_job(engine, job_id)
    return {"id": job_id, "status": job.status.value}


# ---- submissions ------------------------------------------------------------------------------------------
def submit_json(config: DashboardConfig, engine: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Queue the job a spec describes, as `llmplan submit SPEC.yaml` does, once its paths are checked."""
    from .scheduling import Cluster, queued_document
    from .submit import parse_spec, queue_finetune, queue_inference

    task, options = parse_spec(checked_paths(body, config.roots), where="job spec", withheld=WITHHELD_KEYS)
    cluster = Cluster(engine, config.address)
    queue = {"priority": options.pop("priority"), "max_retries": options.pop("max_retries")}
    if task == "finetune":
        job, plan = queue_finetune(cluster, options.pop("model"), options.pop("data"), options, **queue)
    else:
        job, plan = queue_inference(cluster, options.pop("model"), options.pop("prompts"), options, **queue)
    return queued_document(job.id, plan, cluster.jobs_root)


def checked_paths(spec: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, Any]:
    """The spec with each path it names checked and resolved (FieldError for the first refused one)."""
    from .submit import SPEC_TASKS

    if spec.get("task") not in SPEC_TASKS:
        return spec  # parse_spec says what a spec is
    checked = dict(spec)
    for key, must_exist in path_keys(spec["task"]).items():
        value = spec.get(key)
        if value is None:
            continue
        if isinstance(value, (list, dict)):
            raise FieldError(key, f"{key}: give one path")
        text = str(value)
        checked[key] = (checked_model(text, roots) if key == "model"
                        else str(inside_roots(key, text, roots, must_exist=must_exist)))
    return checked


def path_keys(task: str) -> dict[str, bool]:
    """The keys of a task's spec that may name paths, and whether each is read (must exist): the model, and
    the submit command's path options."""
    import click

    from .submit import spec_command

    paths = {"model": True}
    for param in spec_command(task).params:
        if isinstance(param.type, click.Path):
            paths[param.opts[0].lstrip("-")] = param.type.exists
    return paths


def checked_model(model: str, roots: tuple[Path, ...]) -> str:
    """A catalog name as given (no path to check); a model directory or file resolved inside the roots."""
    from llmplan.planner.resolve import UnknownModelError, resolve_model

    if Path(model).expanduser().exists():  # resolve_model's own test: an existing path is a path
        return str(inside_roots("model", model, roots, must_exist=True))
    try:
        resolve_model(model)
    except UnknownModelError as error:
        raise FieldError("model", str(error)) from None
    return model


def inside_roots(field: str, text: str, roots: tuple[Path, ...], *, must_exist: bool) -> Path:
    """`text` as an absolute path with its symlinks resolved, refused unless inside one of `roots` (and, when it
    is to be read, unless it exists and can be read)."""
    if not text.strip():
        raise FieldError(field, f"{field}: give a path")
    path = Path(text).expanduser().resolve()
    if not any(path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise FieldError(field, f"{field}: {text} is outside the folders this dashboard may use ({allowed}; "
                                "see llmplan ui --root)")
    if must_exist and not path.exists():
        raise FieldError(field, f"{field}: {text}: no such file or directory")
    if must_exist and not readable(path):
        raise FieldError(field, f"{field}: {text} cannot be read (permission denied, or not a file or directory)")
    return path


def readable(path: Path) -> bool:
    """Whether this process can open `path` (a regular file) or list it (a directory)."""
    try:
        if path.is_dir():
            with os.scandir(path):
                return True
        if path.is_file():
            with path.open("rb"):
                return True
    except OSError:
        return False
    return False  # a device, socket or pipe: nothing to train on, and opening a pipe would block
