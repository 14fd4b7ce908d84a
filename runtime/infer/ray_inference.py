"""Inference in Ray actors: one actor per model replica, holding the GPUs its plan asks for.

A one-replica plan run from a user's own process (`llmplan generate`, `llmplan chat`) stays warm: its actor is
named after the model and its loading options, detached, and left loaded after the command ends; the next
command on the same model finds it (no Ray start, no model load) and it exits after $LLMPLAN_WARM_SECONDS
(default 600) without a call, freeing its memory. Jobs the scheduler runs keep their actors to themselves:
their GPUs are accounted for the job's run only.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from llmplan.planner.plan import InferencePlan

from llmplan.runtime.text.chat import PromptItem
from llmplan.runtime.infer.generation import Completion, GenerationReport, GenerationSettings
from llmplan.runtime.text.prompt_templates import apply_template, resolve_template

WARM_SECONDS_ENV = "LLMPLAN_WARM_SECONDS"
WARM_SECONDS = 600.0
WARM_PREFIX = "llmplan-warm-"
IDLE_POLL_S = 5.0
RELEASE_TIMEOUT_S = 5.0
# A replica's first call that has not answered by then waits for its model to load: say so (a warm one answers at
# once; a step that takes over 2 s gets a progress line).
LOAD_NOTICE_AFTER_S = 2.0


class InferenceReplica:
    """One copy of the model (sharded over its GPUs when the plan says so), loaded once, serving prompts
    in the prompt template `template` resolves to (`prompt_templates.resolve_template`).

    With `idle_s` > 0 it is a warm replica: `release` leaves it loaded, and it ends itself once no call has
    come for `idle_s` seconds (`claim` says False from then on, so that the caller starts a new one)."""

    def __init__(self, model_dir: str, dtype: str, quant: str, device: str, adapter: str | None,
                 template: str = "auto", idle_s: float = 0.0) -> None:
        from llmplan.runtime.infer.inference import setup  # in the actor only: the command that starts it never imports torch

        self.template = resolve_template(template, model_dir, adapter)
        self.generator = setup(model_dir, dtype=dtype, quant=quant, device=device, adapter=adapter)
        self.idle_s = idle_s
        self.lock = threading.Lock()
        self.busy, self.closing, self.last_call = False, False, time.monotonic()
        if idle_s > 0:
            threading.Thread(target=self._end_when_idle, daemon=True, name="llmplan-warm-idle").start()

    def claim(self) -> bool:
        """True when this replica serves the caller; False when it is ending after its idle time."""
        with self._in_use():
            return not self.closing

    def prompt(self, item: PromptItem) -> PromptItem:
        """What the model is asked for `item`: the text (or dialog) in the replica's template."""
        return apply_template(self.template, item)

    def respond(self, items: Sequence[PromptItem], settings: GenerationSettings) -> GenerationReport:
        from llmplan.runtime.infer.inference import respond

        with self._in_use():
            return respond(self.generator, [self.prompt(item) for item in items], settings)

    def respond_as_finished(self, indices: Sequence[int], items: Sequence[PromptItem],
                            settings: GenerationSettings) -> Iterator[tuple[int, Completion] | GenerationReport]:
        """`(indices[i], completion)` as each prompt finishes (a Ray streaming generator), then the call's report."""
        from llmplan.runtime.infer.inference import respond_as_finished

        with self._in_use():
            for value in respond_as_finished(self.generator, [self.prompt(item) for item in items], settings):
                yield value if isinstance(value, GenerationReport) else (indices[value[0]], value[1])

    def stream(self, item: PromptItem, settings: GenerationSettings) -> Iterator[str | GenerationReport]:
        """Text pieces as they are generated (a Ray streaming generator), then the call's report."""
        from llmplan.runtime.infer.inference import stream_report

        with self._in_use():
            yield from stream_report(self.generator, self.prompt(item), settings)

    def node(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
                "gpus": [int(g) for g in ray.get_gpu_ids()], "actor": context.get_actor_id(),
                "job": context.get_job_id()}

    def release(self) -> bool:
        """The caller is done: True when the replica stays loaded (warm), False when it should be stopped."""
        with self._in_use():
            return self.idle_s > 0

    def close(self) -> None:
        from llmplan.runtime.infer.inference import cleanup

        cleanup(self.generator)

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        with self.lock:
            self.busy = True
        try:
            yield
        finally:
            with self.lock:
                self.busy, self.last_call = False, time.monotonic()

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(IDLE_POLL_S, self.idle_s))
            with self.lock:
                if not self.busy and time.monotonic() - self.last_call >= self.idle_s:
                    self.closing = True
                    break
        self.close()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def runtime_device(plan: InferencePlan) -> str:
    """What `setup` loads onto: one GPU, every GPU of the actor (HF device_map="auto"), or the CPU."""
    if plan.device == "cpu":
        return "cpu"
    return "auto" if plan.gpus_per_replica > 1 else "cuda"


def start_replicas(plan: InferencePlan, model_dir: str, adapter: str | None, template: str = "auto") -> list[Any]:
    """The plan's replicas: a warm one found or started (see the module's docstring), else new ones."""
    import ray

    if plan.replicas == 1 and not _inside_a_job_driver():
        idle_s = warm_seconds()
        if idle_s > 0:
            return [warm_replica(plan, model_dir, adapter, template, idle_s)]
    remote = ray.remote(InferenceReplica)
    return [
        remote.options(num_gpus=plan.gpus_per_replica, num_cpus=1).remote(
            model_dir, plan.dtype, plan.quant, runtime_device(plan), adapter, template)
        for _ in range(plan.replicas)
    ]


def warm_seconds() -> float:
    return float(os.environ.get(WARM_SECONDS_ENV) or WARM_SECONDS)


def warm_name(plan: InferencePlan, model_dir: str, adapter: str | None, template: str) -> str:
    """One warm replica per model directory, adapter, prompt template and loading options."""
    key = "|".join(map(str, (os.path.realpath(model_dir), adapter and os.path.realpath(adapter), template, plan.dtype,
                             plan.quant, runtime_device(plan), plan.gpus_per_replica)))
    return WARM_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


def warm_replica(plan: InferencePlan, model_dir: str, adapter: str | None, template: str, idle_s: float,
                 attempts: int = 3) -> Any:
    """The warm replica for this model, started when there is none (or the one found is ending).

    On the CPU it holds no CPU slot while it waits (Ray gives it one thread either way); on GPUs it keeps them."""
    import ray
    from ray.exceptions import RayActorError

    from llmplan.runtime.jobs.cluster import NAMESPACE

    remote = ray.remote(InferenceReplica).options(
        name=warm_name(plan, model_dir, adapter, template), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_gpus=plan.gpus_per_replica, num_cpus=1 if plan.gpus_per_replica else 0, max_restarts=0)
    for _ in range(attempts):
        replica = remote.remote(model_dir, plan.dtype, plan.quant, runtime_device(plan), adapter, template, idle_s)
        try:
            if loaded(replica.claim.remote(), plan.model_name, staying_s=idle_s):
                return replica
        except RayActorError as error:
            if error.actor_init_failed:
                raise  # the model could not load: the job records why
            # else it ended between the lookup and the call: its name is free again soon
        time.sleep(1.0)
    raise RuntimeError(f"the warm replica {warm_name(plan, model_dir, adapter, template)} kept ending; run again")


def loaded(first_call: Any, model_name: str, staying_s: float = 0.0) -> Any:
    """The result of a replica's first call, which waits for its model to load; when that takes a while (a replica
    started now, not a warm one found), a line on stderr as it starts and one with its time when it is done."""
    import ray

    started = time.monotonic()
    ready, _ = ray.wait([first_call], timeout=LOAD_NOTICE_AFTER_S)
    if ready:
        return ray.get(first_call)
    print(f"loading {model_name} in a Ray actor ...", file=sys.stderr, flush=True)
    result = ray.get(first_call)
    stays = f"; it stays loaded for the next command until {staying_s / 60:g} min without one" if staying_s else ""
    print(f"loaded {model_name} ({time.monotonic() - started:.1f} s){stays}", file=sys.stderr, flush=True)
    return result


def _inside_a_job_driver() -> bool:
    import ray

    return ray.get_runtime_context().get_actor_id() is not None


def share(items: Sequence[Any], replicas: int) -> list[list[int]]:
    """Indices of the prompts each replica answers: contiguous, as even as possible, order kept."""
    size, extra = divmod(len(items), replicas)
    shares, start = [], 0
    for index in range(replicas):
        end = start + size + (1 if index < extra else 0)
        shares.append(list(range(start, end)))
        start = end
    return shares


def stop_replicas(replicas: Sequence[Any]) -> None:
    """Stop the replicas of a run, except a warm one, which stays loaded for the next command."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    for replica in replicas:
        try:
            stays = ray.get(replica.release.remote(), timeout=RELEASE_TIMEOUT_S)
        except RayActorError:
            continue  # it died already (a failed load)
        except GetTimeoutError:
            stays = False  # still busy with a call the user gave up on (Ctrl-C): stop it
        if not stays:
            ray.kill(replica, no_restart=True)
