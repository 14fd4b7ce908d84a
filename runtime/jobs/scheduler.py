"""The scheduler: a detached Ray actor that turns queued job records into running work, and watches it.

One scheduler per job database (its name is derived from the database URL), started on demand by the
first command that needs it and living as long as the Ray cluster. Each cycle, every `POLL_S` seconds
or when poked:

1. collect: jobs whose driver ended. A driver that died (its node, an OOM kill) fails its job as
   `infrastructure` with the cause; a job that failed out of memory is re-planned and retried
   (`planner.replan`, at most `max_retries` times, each attempt a new job linked by `retry_of`).
2. reconcile: jobs the database says are placed but no driver of this scheduler watches (the scheduler
   or the whole Ray cluster restarted). A driver still alive is adopted; a vanished one fails its job as
   `infrastructure`, and a fine-tuning job with a checkpoint is queued again to resume from it.
3. cancel: jobs marked `cancelling` have their driver killed (its replicas and training workers die
   with it, Ray's ownership), then become `cancelled`.
   Whatever a stopped driver left (Ray Train's placement group and its detached cleaner outlive it) is
   freed by `job_resources.release`, swept again each cycle until nothing of it is left.
4. admit: `admission.admit` picks the queued jobs that fit the GPUs now (NVML free memory and the plans
   already placed); each gets a `JobDriver` actor on its node, which runs the job's recipe.

Every decision is a transition in the job store, so the history survives the scheduler.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplan.runtime.jobs.admission import Admission, GpuSlot, QueuedJob, Reservation, admit, demand_of
from llmplan.runtime.jobs.cluster import NAMESPACE, head_node_id, node_address
from llmplan.runtime.models.model_store import CACHE_ENV as MODEL_CACHE_ENV
from llmplan.runtime.jobs.paths import LOG_NAME, job_folder, store_key

POLL_S = 0.5
INVENTORY_TTL_S = 5.0
PLACED_STATUSES = ("scheduled", "running", "cancelling")
RUNNER_KEY, SCHEDULER_RUNNER = "runner", "scheduler"  # in a job's request
MAX_QUEUE = 100_000  # queued jobs read per cycle
RELEASE_SWEEPS = 120  # cycles (about a minute) to see a stopped driver's leftovers gone


def _url_key(db_url: str) -> str:
    return store_key(db_url)


def managed(job: Any) -> bool:
    """Jobs `llmplan submit` queued for the scheduler; `llmplan generate` and `chat` run their own jobs."""
    return job.request.get(RUNNER_KEY) == SCHEDULER_RUNNER


def scheduler_name(db_url: str) -> str:
    return f"llmplan-scheduler-{_url_key(db_url)}"


def driver_name(db_url: str, job_id: int) -> str:
    return f"llmplan-job-{_url_key(db_url)}-{job_id}"


def worker_database_url(engine: Any) -> str:
    """The engine's URL as every process on the cluster must open it: absolute SQLite path, password kept."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{Path(url.database).resolve()}"
    return url.render_as_string(hide_password=False)


def ensure_scheduler(db_url: str, address: str | None = None) -> Any:
    """The scheduler of this database on the cluster (started if it is not running), poked awake."""
    from llmplan.runtime.jobs.cluster import connect

    connect(address)  # before importing Ray (see cluster.connect)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the head node, which lives as long as the cluster; restarted by Ray if its process dies (the
    # new one adopts the running drivers, see `_reconcile`).
    scheduler = ray.remote(Scheduler).options(
        name=scheduler_name(db_url), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=8, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id(), soft=False),
    ).remote(db_url)
    ray.get(scheduler.poke.remote())
    return scheduler


def cancel_job(engine: Any, job_id: int, address: str | None = None) -> Any:
    """Record the cancel and, for a placed job of the scheduler's, wake the scheduler to stop it now."""
    job = request_cancel(engine, job_id)
    if not job.status.is_terminal() and managed(job):
        ensure_scheduler(worker_database_url(engine), address)
    return job


def request_cancel(engine: Any, job_id: int) -> Any:
    """Record a cancel: a queued job becomes cancelled; a placed one cancelling (the scheduler then stops it)."""
    from llmplan.runtime.store.errors import TransitionRefusedError
    from llmplan.runtime.store.repository import JobStatus, get_job, transition

    while True:
        job = get_job(engine, job_id)
        if job.status.is_terminal() or job.status is JobStatus.CANCELLING:
            return job
        target, message = ((JobStatus.CANCELLED, "cancelled while queued") if job.status is JobStatus.QUEUED
                           else (JobStatus.CANCELLING, "cancel requested"))
        try:
            return transition(engine, job_id, target, expected_from=job.status, message=message)
        except TransitionRefusedError:
            continue  # the scheduler moved it meanwhile: decide again from its new status


# ---- the driver: one job's recipe, in its own actor ---------------------------------------------------
class JobDriver:
    """Runs one recorded job (the same recipe `llmplan generate` and the tests call), its output in the job's log."""

    def __init__(self, db_url: str, job_id: int) -> None:
        self.db_url, self.job_id = db_url, job_id
        self.finished = threading.Event()
        self.status: str | None = None

    def run(self) -> str:
        from llmplan.runtime.store.opening import open_store
        from llmplan.runtime.store.repository import Artifacts, JobUpdate, get_job, update_job

        engine = open_store(self.db_url)
        try:
            job = get_job(engine, self.job_id)
            if job.request.get("model_cache"):
                os.environ[MODEL_CACHE_ENV] = job.request["model_cache"]  # where the submitter pulled the model
            folder = job_folder(job.request.get("jobs_dir"), job.id)
            _redirect_output(folder / LOG_NAME)
            update_job(engine, job.id, JobUpdate(artifacts=Artifacts(log_path=str(folder / LOG_NAME))))
            print(f"job {job.id}: {job.kind.value} {job.model} on {os.uname().nodename}", flush=True)
            outcome = _run_recipe(engine, job, folder.parent)
            print(f"job {job.id}: {outcome.status.value}" + (f": {outcome.error}" if outcome.error else ""), flush=True)
            self.status = outcome.status.value
            return self.status
        finally:
            engine.dispose()
            self.finished.set()

    def wait(self) -> str | None:
        """Block until `run` ends (a restarted scheduler adopts a running driver through this)."""
        self.finished.wait()
        return self.status


def _run_recipe(engine: Any, job: Any, jobs_dir: Path) -> Any:
    if job.kind.value == "finetune":
        from llmplan.runtime.train.finetune_job import run_recorded

        return run_recorded(engine, job.id)
    if job.kind.value == "serve":
        from llmplan.runtime.infer.serve import run_recorded as run_server

        return run_server(engine, job.id)
    from llmplan.runtime.infer.inference_job import run_recorded as run_inference

    return run_inference(engine, job.id, jobs_dir=jobs_dir)


def _redirect_output(log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    sink = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)


# ---- the scheduler -------------------------------------------------------------------------------------
@dataclass
class Watch:
    """A driver this scheduler launched or adopted: its handle, the call that ends with it, its GPUs."""

    driver: Any
    done: Any  # ObjectRef of driver.run() or driver.wait()
    reservation: Reservation

    @property
    def driver_id(self) -> str:
        return self.driver._actor_id.hex()


@dataclass
class Release:
    """A stopped driver whose leftovers are being freed: swept each cycle until none is found."""

    driver_id: str
    sweeps_left: int = RELEASE_SWEEPS


class Scheduler:
    def __init__(self, db_url: str) -> None:
        from llmplan.runtime.store.opening import open_store

        self.db_url = db_url
        self.engine = open_store(db_url)
        self.watched: dict[int, Watch] = {}
        self.releasing: dict[int, Release] = {}
        self.slots: list[GpuSlot] = []
        self.slots_at = 0.0
        self.cycles = 0
        self.wake = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, name="llmplan-scheduler", daemon=True).start()

    # -- calls from outside (the CLI, tests) --
    def poke(self) -> int:
        self.wake.set()
        return self.cycles

    def inventory(self, refresh: bool = False) -> list[GpuSlot]:
        with self.lock:
            return self._inventory(refresh)

    def cycle(self) -> int:
        """One full cycle now (tests and benchmarks call it; the loop calls it every POLL_S)."""
        with self.lock:
            self._collect()
            self._reconcile()
            self._cancel()
            self._release()
            self._admit()
            self.cycles += 1
            return self.cycles

    # -- the loop --
    def _loop(self) -> None:
        while True:
            try:
                self.cycle()
            except Exception:  # noqa: BLE001 - a bad cycle is logged; the next one starts afresh
                traceback.print_exc()
            self.wake.wait(POLL_S)
            self.wake.clear()

    def _inventory(self, refresh: bool = False) -> list[GpuSlot]:
        from llmplan.runtime.jobs.cluster import gpu_slots

        if refresh or time.monotonic() - self.slots_at > INVENTORY_TTL_S:
            self.slots, self.slots_at = gpu_slots(), time.monotonic()
        return self.slots

    # -- 1. drivers that ended --
    def _collect(self) -> None:
        import ray

        if not self.watched:
            return
        refs = {watch.done: job_id for job_id, watch in self.watched.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            job_id = refs[ref]
            watch = self.watched.pop(job_id)
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the driver died: its node, or a kill
                self._driver_died(job_id, error)
            ray.kill(watch.driver, no_restart=True)
            self._free(job_id, watch.driver_id)
            self._retry_if_out_of_memory(job_id)

    def _driver_died(self, job_id: int, error: BaseException) -> None:
        from llmplan.runtime.store.repository import JobStatus, get_job, transition

        from llmplan.runtime.jobs.failures import fail_job

        job = get_job(self.engine, job_id)
        if job.status is JobStatus.CANCELLING:
            transition(self.engine, job_id, JobStatus.CANCELLED, message="its driver stopped")
        elif not job.status.is_terminal():
            fail_job(self.engine, job_id, error)

    def _retry_if_out_of_memory(self, job_id: int) -> None:
        from llmplan.runtime.jobs.retries import retry_after_oom

        try:
            retried = retry_after_oom(self.engine, job_id)
        except Exception:  # noqa: BLE001 - a re-plan that breaks leaves the job failed; the cycle goes on
            traceback.print_exc()
            return
        if retried is not None:
            print(f"job {job_id} ran out of memory: retrying as job {retried.id}", flush=True)

    # -- 2. placed jobs nobody watches --
    def _reconcile(self) -> None:
        import ray

        from llmplan.runtime.store.repository import JobFilter, JobStatus, list_jobs

        placed = list_jobs(self.engine, JobFilter(statuses=tuple(JobStatus(s) for s in PLACED_STATUSES), limit=10_000))
        for job in placed:
            if job.id in self.watched or not managed(job):
                continue
            try:
                driver = ray.get_actor(driver_name(self.db_url, job.id), namespace=NAMESPACE)
            except ValueError:
                self._vanished(job)
                continue
            self.watched[job.id] = Watch(driver, driver.wait.remote(), reservation_of(job))

    def _vanished(self, job: Any) -> None:
        from llmplan.runtime.store.repository import JobFailure, JobStatus, transition
        from llmplan.runtime.store.status import ErrorClass

        from llmplan.runtime.jobs.retries import resume_after_loss

        self._free(job.id, job.ray_actor_id)
        if job.status is JobStatus.CANCELLING:
            transition(self.engine, job.id, JobStatus.CANCELLED, message="its work had already stopped")
            return
        message = "its work vanished: the Ray cluster or the node running it was restarted or lost"
        transition(self.engine, job.id, JobStatus.FAILED, message=message,
                   failure=JobFailure(ErrorClass.INFRASTRUCTURE, message))
        resumed = resume_after_loss(self.engine, job.id)
        if resumed is not None:
            print(f"job {job.id} vanished: resuming from its checkpoint as job {resumed.id}", flush=True)

    # -- 3. cancellations --
    def _cancel(self) -> None:
        import ray

        from llmplan.runtime.store.errors import TransitionRefusedError
        from llmplan.runtime.store.repository import JobFilter, JobStatus, list_jobs, transition

        for job in list_jobs(self.engine, JobFilter(statuses=(JobStatus.CANCELLING,), limit=10_000)):
            if not managed(job):
                continue  # a foreground job: its own process ends it
            watch = self.watched.pop(job.id, None)
            if watch is not None:
                ray.kill(watch.driver, no_restart=True)
            self._free(job.id, job.ray_actor_id)
            try:
                transition(self.engine, job.id, JobStatus.CANCELLED, expected_from=JobStatus.CANCELLING,
                           message="stopped: its driver and workers were killed, its GPUs freed")
            except TransitionRefusedError:
                pass  # it ended on its own first; the record says how

    # -- what stopped drivers left --
    def _free(self, job_id: int, driver_id: str | None) -> None:
        """Free what the job's stopped driver started: this cycle, before admission (the next job may need its
        placement group), and each cycle after until nothing is left."""
        if driver_id:
            self.releasing[job_id] = Release(driver_id)

    def _release(self) -> None:
        for job_id in list(self.releasing):
            self._sweep(job_id)

    def _sweep(self, job_id: int) -> None:
        from llmplan.runtime.jobs.job_resources import release

        pending = self.releasing[job_id]
        try:
            found = release(pending.driver_id)
        except Exception:  # noqa: BLE001 - Ray's tables unreadable this time: the next cycle tries again
            traceback.print_exc()
            found = None
        if found is not None and not found:
            del self.releasing[job_id]
            return
        if found:
            print(f"job {job_id}: freeing what its driver left: {found.describe()}", flush=True)
        pending.sweeps_left -= 1
        if pending.sweeps_left <= 0:
            print(f"job {job_id}: gave up freeing what its driver left", flush=True)
            del self.releasing[job_id]

    # -- 4. admission --
    def _admit(self) -> None:
        queued = queued_jobs(self.engine)
        if not queued:
            return
        needs_gpus = any(demand_of(job.kind.value, job.plan).on_gpus for job in queued)
        slots = self._inventory() if needs_gpus else []
        for job, admission in admissions(queued, slots, [watch.reservation for watch in self.watched.values()]):
            self._launch(job, admission)

    def _launch(self, job: Any, admission: Admission) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = admission.node_id or ray.get_runtime_context().get_node_id()
        driver = ray.remote(JobDriver).options(
            name=driver_name(self.db_url, job.id), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_concurrency=2, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self.db_url, job.id)
        if not record_admission(self.engine, job, admission, node=node, node_ip=node_address(node),
                                ray_job_id=ray.get_runtime_context().get_job_id(), actor_id=driver._actor_id.hex()):
            ray.kill(driver, no_restart=True)  # cancelled while we decided
            return
        self.watched[job.id] = Watch(driver, driver.run.remote(), admission.reservation())


# ---- admission, step by step (the benchmark times these same functions) ---------------------------------
def queued_jobs(engine: Any) -> list[Any]:
    from llmplan.runtime.store.repository import JobFilter, JobStatus, list_jobs

    return [job for job in list_jobs(engine, JobFilter(statuses=(JobStatus.QUEUED,), limit=MAX_QUEUE)) if managed(job)]


def admissions(queued: list[Any], slots: list[GpuSlot], reserved: list[Reservation]) -> list[tuple[Any, Admission]]:
    """The queued jobs to start now, each with its GPUs (`admission.admit` over the jobs' recorded plans)."""
    waiting = [QueuedJob(job.id, job.priority, job.created_at, demand_of(job.kind.value, job.plan)) for job in queued]
    by_id = {job.id: job for job in queued}
    return [(by_id[admission.job_id], admission) for admission in admit(waiting, slots, reserved)]


def record_admission(engine: Any, job: Any, admission: Admission, *, node: str, node_ip: str | None,
                     ray_job_id: str | None, actor_id: str | None) -> bool:
    """queued -> scheduled with its placement; False when the job left the queue meanwhile (cancelled)."""
    from llmplan.runtime.store.errors import TransitionRefusedError
    from llmplan.runtime.store.repository import JobStatus, JobUpdate, Placement, RayIds, transition

    named = node_ip or f"node {node[:12]}"
    where = f"GPU {', '.join(map(str, admission.gpu_indices))} of {named}" if admission.node_id else "the CPU"
    update = JobUpdate(placement=Placement(node=node, gpus=admission.gpu_indices, node_ip=node_ip),
                       ray=RayIds(job_id=ray_job_id, actor_id=actor_id))
    try:
        transition(engine, job.id, JobStatus.SCHEDULED, expected_from=JobStatus.QUEUED, update=update,
                   message=f"admitted on {where}")
    except TransitionRefusedError:
        return False
    return True


def reservation_of(job: Any) -> Reservation:
    demand = demand_of(job.kind.value, job.plan)
    gpus = tuple((job.placement_node or "", int(i)) for i in (job.placement_gpus or ()))
    return Reservation(job.id, gpus if demand.on_gpus else (), demand.bytes_per_gpu)
