"""What the dashboard's calls do: the same planner, store and scheduler functions as the CLI, with every path a
call names confined to the dashboard's --root folders.

Paths in a submission (data, input, output, adapter) and a model given as a path rather than a catalog name
(in a submission and in a plan) must resolve, symlinks followed, inside one of the --root folders; the ones
read must exist and be readable; an inference job's output must not be an existing file.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .web_errors import ApiError, FieldError

LOG_CHUNK_BYTES = 1 << 16
# Spec keys that steer the submitting process, not the job: the dashboard decides them (or offers none).
WITHHELD_KEYS = frozenset({"db", "json", "wait", "address", "resume"})


@dataclass(frozen=True)
class Scope:
    """What a call may use: the job store, the folders paths may be in, the Ray cluster jobs go to."""
    db_url: str
    roots: tuple[Path, ...]  # resolved
    address: str | None = None  # None: as `llmplan submit` decides


# ---- read-only calls ---------------------------------------------------------------------------------------
def list_models() -> list[dict[str, Any]]:
    from llmplan.planner.model_catalog import MODELS

    return [{"name": m.name, "model_type": m.model_type, "params": m.params} for m in MODELS]


def local_gpus() -> dict[str, Any]:
    from llmplan.planner.nvml_probe import probe_gpus

    return probe_gpus().to_dict()


def option_choices() -> dict[str, dict[str, list[str]]]:
    """The submit commands' options that take one of a few values, by task: the submit form's menus."""
    import click

    from .submit import SPEC_TASKS, spec_command

    return {task: {param.opts[0].lstrip("-"): [str(choice) for choice in param.type.choices]
                   for param in spec_command(task).params if isinstance(param.type, click.Choice)}
            for task in SPEC_TASKS}


def plan_json(form: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, Any]:
    """`llmplan fit --json` for the plan form's fields (already validated: web_api.PlanForm)."""
    from llmplan.planner.defaults import (DEFAULT_GLOBAL_BATCH, DEFAULT_MARGIN, DEFAULT_MAX_NEW_TOKENS,
                                          DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN)
    from llmplan.planner.hardware import deepspeed_preflight, find_nvcc
    from llmplan.planner.nvml_probe import probe_gpus

    from .fit import build_report

    values = {name: value for name, value in form.items() if value is not None}
    sizes = {name: values.pop(name, default) for name, default in
             (("seq_len", DEFAULT_SEQ_LEN), ("batch_size", DEFAULT_GLOBAL_BATCH), ("prompt_len", DEFAULT_PROMPT_LEN),
              ("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))}
    report = build_report(checked_model(values.pop("model"), roots), probe=probe_gpus,
                          preflight=deepspeed_preflight(None, find_nvcc()),
                          gpus=values.get("gpus"), gpu_name=values.get("gpu"), gpu_mem=values.get("gpu_mem"),
                          task=values.get("task", "finetune"), method=values.get("method", "auto"),
                          margin=values.get("margin", DEFAULT_MARGIN), top=values.get("top", 5), sizes=sizes)
    document = report.to_dict()
    for shown, candidate in zip(document["candidates"], report.result.candidates):
        shown["job"] = candidate_spec(report, candidate)
    return document


def candidate_spec(report: Any, candidate: Any) -> dict[str, Any]:
    """The job spec that runs a candidate (`llmplan fit`'s own), less the data placeholder: the submit form's start."""
    from .fit import DATA_PLACEHOLDER

    spec = {key: value for key, value in report.spec_for(candidate).items() if value != DATA_PLACEHOLDER}
    return {"task": candidate.request.task.value, **spec}


def list_jobs_json(engine: Any, statuses: list[str], kind: str | None, model: str | None,
                   limit: int | None) -> list[dict[str, Any]]:
    from llmplan.runtime.store.reading import DEFAULT_LIST_LIMIT, JobFilter, read_jobs

    from .jobs import job_to_json, parse_kind, parse_statuses

    wanted = tuple(value for values in statuses for value in values.split(",") if value)
    job_filter = JobFilter(statuses=parse_statuses(wanted), kind=parse_kind(kind), model=model,
                           limit=min(limit or DEFAULT_LIST_LIMIT, 1000))
    return [job_to_json(job) for job in read_jobs(engine, job_filter)]


def job_json(engine: Any, job_id: int) -> dict[str, Any]:
    from llmplan.runtime.store.reading import read_job_details

    from .jobs import details_to_json

    return details_to_json(read_job_details(engine, job_id))


def log_tail(engine: Any, job_id: int, offset: int) -> dict[str, Any]:
    from llmplan.runtime.store.repository import get_job

    job = get_job(engine, job_id)
    ended = job.status.is_terminal()
    if not job.log_path or not Path(job.log_path).is_file():
        return {"text": "", "offset": offset, "ended": ended}
    with open(job.log_path, "rb") as source:
        source.seek(offset)
        chunk = source.read(LOG_CHUNK_BYTES)
    return {"text": chunk.decode(errors="replace"), "offset": offset + len(chunk), "ended": ended}


# ---- calls that change state ---------------------------------------------------------------------------------
def cancel_json(scope: Scope, engine: Any, job_id: int) -> dict[str, Any]:
    """As `llmplan cancel --no-wait`: the cancel is recorded in the store (Ray up or not); a placed job's
    scheduler is then woken to stop it now (while the cluster is down, it stops it when it is back)."""
    from llmplan.runtime.jobs.scheduler import managed, request_cancel
    from llmplan.runtime.store.repository import get_job

    from .web_ray import RayUnavailableError, call_with_ray

    status = get_job(engine, job_id).status
    if status.is_terminal():
        raise ApiError(HTTPStatus.CONFLICT, f"job {job_id} already ended: {status.value}")
    job = request_cancel(engine, job_id)
    answer = {"id": job_id, "status": job.status.value}
    if not job.status.is_terminal() and managed(job):
        try:
            call_with_ray(scope.address, wake_scheduler, scope)
        except RayUnavailableError as error:
            answer["note"] = str(error)
    return answer


def wake_scheduler(scope: Scope) -> None:
    """In a Ray call's process: the store's scheduler, started if need be and poked."""
    from llmplan.runtime.jobs.scheduler import ensure_scheduler

    ensure_scheduler(scope.db_url, scope.address)


def submit_json(scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
    """Queue the job a spec describes, as `llmplan submit SPEC.yaml` does, once its paths are checked: the
    spec is read into a submission here (bad input answers at once, Ray up or not), planned and queued in a
    Ray call."""
    from .submit import spec_submission
    from .web_ray import call_with_ray

    task, submission = spec_submission(checked_paths(body, scope.roots), where="job spec", withheld=WITHHELD_KEYS)
    return call_with_ray(scope.address, queue_spec, scope, task, submission)


def queue_spec(scope: Scope, task: str, submission: Any) -> dict[str, Any]:
    """In a Ray call's process: plan the job for the cluster, check it, record it queued (`runtime.submission`);
    a refused field is named by its job spec key."""
    from llmplan.planner.plan import PlanError
    from llmplan.planner.request import RequestError
    from llmplan.runtime.store.opening import open_store
    from llmplan.runtime.jobs.submission import Cluster, SubmissionError, queue_finetune, queue_inference, queued_document
    from llmplan.runtime.train.train_config import TrainConfigError

    from .submit import spec_key

    engine = open_store(scope.db_url)
    try:
        cluster = Cluster(engine, scope.address)
        job, plan = (queue_finetune if task == "finetune" else queue_inference)(cluster, submission)
        return queued_document(job.id, plan, cluster.jobs_root)
    except (SubmissionError, TrainConfigError, RequestError, PlanError) as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(error), spec_key(task, error.field)) from None
    finally:
        engine.dispose()


# ---- paths ------------------------------------------------------------------------------------------------------
def checked_paths(spec: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, Any]:
    """The spec with each path it names checked and resolved (FieldError for the first refused one)."""
    from .submit import SPEC_TASKS

    if spec.get("task") not in SPEC_TASKS:
        return spec  # spec_submission says what a spec is
    checked = dict(spec)
    for key, must_exist in path_keys(spec["task"]).items():
        value = spec.get(key)
        if value is None:
            continue
        if isinstance(value, (list, dict)):
            raise FieldError(key, f"{key}: give one path")
        text = str(value)
        if key == "model":
            checked[key] = checked_model(text, roots)
            continue
        path = inside_roots(key, text, roots, must_exist=must_exist)
        if key == "output" and spec["task"] == "infer" and exists(path):
            raise FieldError(key, f"{key}: {text} already exists; name a new file (the dashboard never "
                                  "overwrites one)")
        checked[key] = str(path)
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
    """A catalog name or size as given; else a model directory or config file, resolved inside the roots.
    Whether a path outside the roots exists is never told (nor is it read)."""
    if catalog_name(model):
        return model
    path = Path(model).expanduser().resolve()
    if any(path.is_relative_to(root) for root in roots) and exists(path):
        return str(inside_roots("model", model, roots, must_exist=True))
    if looks_like_path(model):
        inside_roots("model", model, roots, must_exist=True)  # refuses it: outside, or missing
    raise FieldError("model", f"unknown model {model!r} (give a catalog name such as Llama-3.1-8B, a size such "
                              "as 7B, or a model directory or config.json inside the dashboard's --root folders)")


def catalog_name(text: str) -> bool:
    from llmplan.planner.model_catalog import SIZE_SHORTHANDS
    from llmplan.planner.resolve import find_model

    return find_model(text) is not None or text.strip().lower() in SIZE_SHORTHANDS


def looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith(("~", "."))


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
    if must_exist and not exists(path):
        raise FieldError(field, f"{field}: {text}: no such file or directory")
    if must_exist and not readable(path):
        raise FieldError(field, f"{field}: {text} cannot be read (permission denied, or not a file or directory)")
    return path


def exists(path: Path) -> bool:
    """Whether `path` exists; a name the system refuses (too long, say) names nothing."""
    try:
        return path.exists()
    except OSError:
        return False


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


# ---- merging a fine-tuned adapter ---------------------------------------------------------------------------------
MERGE_TIMEOUT_S = 1800.0  # loading the base model and saving it merged


def merge_json(scope: Scope, engine: Any, job_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """As `llmplan merge JOB'S-MODEL JOB'S-ADAPTER --output OUTPUT`, for a succeeded LoRA job (409 otherwise),
    into a new folder inside the roots; the merge runs in a process of its own: {"id", "output"}."""
    from llmplan.runtime.store.repository import JobKind, JobStatus, get_job

    from .merge import merge_keeping_template
    from .web_ray import call_in_child

    job = get_job(engine, job_id)
    if job.kind != JobKind.FINETUNE or job.status != JobStatus.SUCCEEDED or not job.adapter_path:
        raise ApiError(HTTPStatus.CONFLICT, f"job {job_id} is a {job.kind.value} job that {job.status.value}: only a "
                                            "succeeded LoRA fine-tuning job has an adapter to merge")
    output = inside_roots("output", str(body.get("output") or ""), scope.roots, must_exist=False)
    if exists(output):
        raise FieldError("output", f"output: {body['output']} already exists; name a new folder (the dashboard "
                                   "never overwrites one)")
    failed = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the merge of job {job_id}'s adapter did not finish")
    quietly = functools.partial(merge_keeping_template, progress=False)  # the page shows no step lines
    merged = call_in_child(quietly, job.model, Path(job.adapter_path), output, timeout=MERGE_TIMEOUT_S,
                           late=failed, ended=lambda code: failed)
    return {"id": job_id, "output": str(merged)}
