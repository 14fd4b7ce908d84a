"""`llmplan serve`: a model behind an OpenAI-compatible HTTP API (serve_api.py), run as a planned job.

    job = submit(engine, plan, ServeOptions(host="127.0.0.1", port=8000), name=..., submitter=..., scheduling=...)
    # the scheduler admits it; its driver runs `run_recorded`: one `ServerReplica` actor on the driver's node
    # holds the plan's GPUs, loads the model and serves until the job is cancelled (the actor dies with its driver)

The job is kind `serve`. Its request holds what it serves on (`serve`: host, port, the token's SHA-256 off
loopback); `server_url(job)` is its address (the placed node's IP for a server bound to every address). While
it runs, the driver records the server's counters every STATS_S seconds: a metric point whose step is the
requests answered so far, and the measured tokens/s (generated tokens over the time spent generating).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the plan is read only where a server starts: `llmplan jobs`/`show` need serving_text alone
    from llmplan.planner.plan import InferencePlan

SERVE_KEY = "serve"  # in a serve job's request
STATS_S = 2.0
STATS_TIMEOUT_S = 30.0
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token_sha256: str | None = None  # off loopback: the SHA-256 of the token every call carries
    adapter: str | None = None
    template: str = "auto"  # how chat messages are laid out (prompt_templates.CHOICES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> ServeOptions:
        return cls(**request[SERVE_KEY])


def submit(engine: Any, plan: InferencePlan, options: ServeOptions, *, name: str, submitter: str, priority: int = 0,
           scheduling: dict[str, Any] | None = None) -> Any:
    """Record the server as a queued job of the scheduler's (`scheduling`: what `llmplan submit` adds)."""
    from llmplan.runtime.store.repository import JobKind, JobSpec, PlanRecord, create_job

    request = {"task": "serve", "model": plan.model, SERVE_KEY: options.to_dict(), **(scheduling or {})}
    record = PlanRecord(plan.to_dict(), plan.estimated_device_bytes, plan.estimated_tokens_per_s)
    return create_job(engine, JobSpec(name=name, kind=JobKind.SERVE, model=plan.model_name, submitter=submitter,
                                      request=request, plan=record, priority=priority))


def server_url(job: Any) -> str | None:
    """The base URL clients use (`.../v1`); None for a job that is not a server."""
    options = job.request.get(SERVE_KEY) if job.request else None
    if not options:
        return None
    host = options["host"]
    if host in ANY_ADDRESS:
        host = job.placement_node_ip or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{options['port']}/v1"


def serving_text(job: Any, metric: Any) -> str:
    """`http://...:8000/v1, 12 requests, 35.1 tokens/s`: a server's address and what it has answered."""
    parts = [server_url(job) or ""]
    if metric is not None:
        parts.append(f"{metric.step:,} request{'s' if metric.step != 1 else ''}")
    if job.measured_tokens_per_s:
        parts.append(f"{job.measured_tokens_per_s:,.1f} tokens/s")
    return ", ".join(parts)


# ---- the actor ----------------------------------------------------------------------------------------------
class ServerReplica:
    """The model, loaded once, behind the HTTP API on `options.host:options.port`, from a thread of this actor."""

    def __init__(self, model_dir: str, plan: dict[str, Any], options: dict[str, Any], model_id: str) -> None:
        from llmplan.runtime.web.http_guards import HeadDeadlineProtocol

        from llmplan.runtime.infer.inference import setup
        from llmplan.runtime.text.prompt_templates import resolve_template
        from llmplan.runtime.infer.ray_inference import runtime_device
        from llmplan.runtime.infer.serve_api import ServeConfig, create_app
        from llmplan.runtime.infer.serve_batching import Batcher
        from llmplan.planner.plan import InferencePlan

        planned, served = InferencePlan.from_dict(plan), ServeOptions(**options)
        template = resolve_template(served.template, model_dir, served.adapter)
        config = ServeConfig(model_id=model_id, host=served.host, port=served.port, token_sha256=served.token_sha256,
                             max_new_tokens=planned.max_new_tokens, aliases=(planned.model_name,))
        listener = listen(config.host, config.port)  # before loading: a busy port fails at once
        self.generator = setup(model_dir, dtype=planned.dtype, quant=planned.quant, device=runtime_device(planned),
                               adapter=served.adapter)
        self.batcher = Batcher(self.generator, planned.batch_size)
        self.server = _uvicorn_server(create_app(config, self.batcher, template), HeadDeadlineProtocol)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True,
                                       name="llmplan-serve-http")
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.02)

    def where(self) -> dict[str, Any]:
        import ray

        return {"node": ray.util.get_node_ip_address(), "gpus": [int(g) for g in ray.get_gpu_ids()]}

    def stats(self) -> dict[str, Any]:
        if not self.thread.is_alive():
            raise RuntimeError("the HTTP server stopped")
        return self.batcher.snapshot().to_dict()


class PortInUseError(ValueError):
    """The server's --port cannot be bound on its node: the user picks another."""


def listen(host: str, port: int) -> Any:
    """A listening socket on host:port (the dashboard's `bind`), or `PortInUseError` saying what to pass."""
    from llmplan.runtime.web.http_guards import listening_socket

    try:
        return listening_socket(host, port)
    except OSError as error:
        raise PortInUseError(f"cannot serve on {host}:{port}: {error.strerror or error}: pass another --port "
                             "(or stop what uses it)") from None


def _uvicorn_server(app: Any, protocol: Any) -> Any:
    import uvicorn

    from llmplan.runtime.web.http_guards import MAX_CONNECTIONS, MAX_HEAD_BYTES

    settings = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, log_level="warning",
                              access_log=False, server_header=False, timeout_keep_alive=15,
                              limit_concurrency=MAX_CONNECTIONS, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    return uvicorn.Server(settings)


# ---- the job's recipe (in the scheduler's driver) ------------------------------------------------------------
@dataclass(frozen=True)
class ServeOutcome:
    status: Any  # JobStatus
    error: str | None


def run_recorded(engine: Any, job_id: int) -> ServeOutcome:
    """Start the server of a placed job and record its counters until the job is cancelled (the scheduler kills
    this driver, and the server with it); a server that fails (or cannot start) fails the job with its cause."""
    from llmplan.runtime.store.repository import get_job

    from llmplan.runtime.jobs.failures import fail_job

    job = get_job(engine, job_id)
    try:
        replica = start(engine, job)
        watch(engine, job_id, replica)
    except Exception as error:  # noqa: BLE001 - the job records whatever ended it
        fail_job(engine, job_id, error)
    ended = get_job(engine, job_id)
    return ServeOutcome(ended.status, ended.error_message)


def start(engine: Any, job: Any) -> Any:
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llmplan.runtime.store.repository import JobStatus, transition

    from llmplan.runtime.jobs.failures import mark_scheduled
    from llmplan.runtime.models.model_store import ensure_model
    from llmplan.planner.plan import InferencePlan

    plan = InferencePlan.from_dict(job.plan)
    mark_scheduled(engine, job.id, f"a server on {plan.device}")
    local = ensure_model(plan.model)
    options = ServeOptions.from_request(job.request)
    listen(options.host, options.port).close()  # on the actor's node: say a busy port before loading anything
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # the placed node
    replica = ray.remote(ServerReplica).options(
        num_gpus=plan.gpus_per_replica, num_cpus=1, max_restarts=0, scheduling_strategy=here,
    ).remote(str(local.path), job.plan, job.request[SERVE_KEY], job.request["model"])
    try:
        where = ray.get(replica.where.remote())  # waits for the model to load and the port to listen
    except RayActorError as error:
        if not error.actor_init_failed:
            raise
        raise RuntimeError(last_line(str(error))) from None  # what __init__ raised, not Ray's wrapper around it
    transition(engine, job.id, JobStatus.RUNNING, expected_from=JobStatus.SCHEDULED,
               message=f"on {where['node']}: serving {local.path} at {server_url(job)}")
    print(f"job {job.id}: serving {job.request['model']} at {server_url(job)}", flush=True)
    return replica


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def watch(engine: Any, job_id: int, replica: Any) -> None:
    """Record the server's counters whenever they change, for as long as it runs."""
    import ray

    from llmplan.runtime.store.repository import JobUpdate, MeasuredResults, MetricPoint, record_metric, update_job

    answered = 0
    while True:
        time.sleep(STATS_S)
        stats = ray.get(replica.stats.remote(), timeout=STATS_TIMEOUT_S)
        if stats["requests"] == answered:
            continue
        answered = stats["requests"]
        record_metric(engine, job_id, MetricPoint(step=answered, tokens_per_s=stats["tokens_per_s"]))
        if stats["tokens_per_s"]:
            update_job(engine, job_id, JobUpdate(results=MeasuredResults(tokens_per_s=stats["tokens_per_s"])))
