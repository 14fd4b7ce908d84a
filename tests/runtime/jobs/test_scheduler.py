"""The scheduler on real Ray clusters started on this machine (`ray start`), driven like a user drives it:
records in the job store, `llmplan cluster`, `llmplan submit`, `llmplan cancel`.

GPU jobs here are declared, not real: the nodes declare logical GPUs and their memory
(`--num-gpus`, `llmplan_gpu_mib`), the recorded plans ask for GPU memory, and the work itself trains a
tiny Llama on the CPU (its TrainConfig says device cpu). Admission, placement and cancellation only
read the plans, so they are exercised exactly as on GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # real Ray clusters (`ray start`) and their jobs

from llmplan.planner.plan import FinetuneAsk, plan_finetune  # noqa: E402
from llmplan.planner.resolve import resolve_model  # noqa: E402
from llmplan.runtime.train import finetune_job  # noqa: E402
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobStatus, get_job, get_job_details, retry_of_job  # noqa: E402
from llmplan.runtime.store.status import ErrorClass  # noqa: E402
from llmplan.runtime.train.train import TEST_OOM_ENV  # noqa: E402
from llmplan.runtime.train.train_config import DataConfig, TrainConfig  # noqa: E402

from ..conftest import TEST_CACHE, run_llmplan_here  # noqa: E402
from ..ray_nodes import RayNode, free_port, joined, start_node  # noqa: E402

GIB = 2**30
LLMPLAN = str(Path(sys.executable).with_name("llmplan"))
FOREVER = 1_000_000  # steps: a job that runs until it is cancelled or lost


# ---- helpers ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Site:
    """One test's job store, jobs folder and cluster, as the CLI sees them."""

    tmp: Path
    node: RayNode
    model: Path
    data: Path
    joined: bool = False  # this process has joined the node's cluster (`ray_nodes.joined`): commands run here

    @property
    def db(self) -> str:
        return f"sqlite:///{self.tmp / 'jobs.db'}"

    def llmplan_env(self) -> dict[str, str]:
        return {"LLMPLAN_DB": self.db, "LLMPLAN_JOBS_DIR": str(self.tmp / "jobs"),
                "LLMPLAN_RAY_ADDRESS": self.node.address, "LLMPLAN_CACHE": str(TEST_CACHE)}

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.llmplan_env()}

    def llmplan(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """`llmplan ARGS`: in a process of its own, or here once this process has joined the cluster."""
        if self.joined:
            return run_llmplan_here(*args, env=self.llmplan_env())
        return subprocess.run([LLMPLAN, *args], capture_output=True, text=True, env=self.env(), timeout=timeout)

    def cluster(self) -> dict[str, Any]:
        """`llmplan cluster --json` (which also starts the scheduler when it is not running)."""
        done = self.llmplan("cluster", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def queue(self, *, gpu_gib: float | None, steps: int, priority: int = 0, micro_batch: int = 1,
              save_every: int = 100_000, name: str = "job", workers: int = 1) -> int:
        """A queued fine-tuning record, as `llmplan submit` writes one: its plan asks for one GPU with
        `gpu_gib` (None: a CPU plan); it trains the tiny model on the CPU, in `workers` DDP processes."""
        spec = resolve_model(str(self.model)).spec
        plan = plan_finetune(FinetuneAsk(model=str(self.model), spec=spec, batch_size=2 * micro_batch,
                                         micro_batch=micro_batch, seq_len=64), None)
        if gpu_gib is not None:
            plan = dataclasses.replace(plan, device="cuda", estimated_device_bytes=int(gpu_gib * GIB))
        config = TrainConfig(model=str(self.model), data=DataConfig(path=str(self.data), template="alpaca"),
                             output_dir=str(self.tmp / "out" / f"{name}-{time.monotonic_ns()}"), method="lora",
                             precision="fp32", micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, seq_len=64,
                             lr=1e-3, warmup_steps=1, max_steps=steps, save_every=save_every, device="cpu",
                             workers=workers, backend="ddp" if workers > 1 else "single")
        engine = open_store(self.db)
        try:
            job = finetune_job.submit(engine, plan, config, name=name, submitter="test", priority=priority,
                                      scheduling={"runner": "scheduler", "jobs_dir": str(self.tmp / "jobs"),
                                                  "max_retries": 2})
        finally:
            engine.dispose()
        return job.id

    def job(self, job_id: int) -> Any:
        engine = open_store(self.db)
        try:
            return get_job(engine, job_id)
        finally:
            engine.dispose()

    def details(self, job_id: int) -> Any:
        engine = open_store(self.db)
        try:
            return get_job_details(engine, job_id)
        finally:
            engine.dispose()

    def retry_of(self, job_id: int) -> int | None:
        engine = open_store(self.db)
        try:
            return retry_of_job(engine, job_id)
        finally:
            engine.dispose()

    def wait(self, job_id: int, until: Callable[[Any], bool], timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                log = Path(job.log_path).read_text()[-3000:] if job.log_path and Path(job.log_path).exists() else ""
                raise AssertionError(f"job {job_id} is {job.status.value} after {timeout}s: {job.error_message}\n{log}")
            time.sleep(0.3)


def status_is(*statuses: JobStatus) -> Callable[[Any], bool]:
    return lambda job: job.status in statuses


ended = status_is(JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@pytest.fixture(scope="module")
def gpu_site(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_alpaca: Path) -> Iterator[Site]:
    """A one-node cluster declaring one 24 GiB GPU; runs with micro-batch > 1 run out of memory (the test hook)."""
    node = start_node(cpus=4, gpus=1, gpu_mib=24 * 1024, env={TEST_OOM_ENV: "1"})
    try:
        yield Site(tmp_path_factory.mktemp("sched"), node, tiny_llama, tiny_alpaca)
    finally:
        node.kill()


@pytest.fixture
def joined_gpu_site(gpu_site: Site) -> Iterator[Site]:
    """`gpu_site`, with this test process joined to its cluster: its commands run here."""
    with joined(gpu_site.node.address):
        yield dataclasses.replace(gpu_site, joined=True)


# ---- queueing -----------------------------------------------------------------------------------------
def test_jobs_wait_for_gpu_memory_and_start_by_priority_then_submission(joined_gpu_site: Site) -> None:
    site = joined_gpu_site
    blocker = site.queue(gpu_gib=16, steps=FOREVER, name="blocker")
    site.cluster()  # starts the scheduler
    site.wait(blocker, status_is(JobStatus.RUNNING))

    low = site.queue(gpu_gib=16, steps=2, name="low")
    high = site.queue(gpu_gib=16, steps=2, priority=5, name="high")
    high_later = site.queue(gpu_gib=16, steps=2, priority=5, name="high-later")
    withdrawn = site.queue(gpu_gib=16, steps=2, name="withdrawn")
    cpu = site.queue(gpu_gib=None, steps=2, name="cpu")

    site.wait(cpu, status_is(JobStatus.SUCCEEDED))  # needs no GPU: not held behind the GPU queue
    view = site.cluster()
    gpu = view["nodes"][0]["gpus"][0]
    assert (gpu["name"], gpu["total_bytes"], gpu["jobs"]) == ("declared", 24 * GIB, [blocker])
    assert gpu["available_bytes"] == 8 * GIB and view["queued"] == 4
    assert {site.job(j).status for j in (low, high, high_later, withdrawn)} == {JobStatus.QUEUED}

    cancelled = site.llmplan("cancel", str(withdrawn))
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {withdrawn}: cancelled", cancelled.stderr
    stopped = site.llmplan("cancel", str(blocker))
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {blocker}: cancelled", stopped.stderr

    finished = [site.wait(j, ended) for j in (high, high_later, low)]
    assert [job.status for job in finished] == [JobStatus.SUCCEEDED] * 3
    starts = [job.started_at for job in finished]
    assert starts == sorted(starts)  # priority 5 first, in submission order, then priority 0
    assert finished[0].started_at >= site.job(blocker).finished_at  # only once the cancel freed the GPU
    assert site.job(withdrawn).started_at is None
    messages = [event.message for event in site.details(high).events]
    head_ip = view["nodes"][0]["address"]
    assert f"admitted on GPU 0 of {head_ip}" in messages, messages
    assert site.job(high).placement_node_ip == head_ip  # `llmplan jobs` shows the node by its IP
    assert site.job(blocker).error_class is ErrorClass.CANCELLED
    log = site.llmplan("logs", str(high))
    assert log.returncode == 0 and f"job {high}: succeeded" in log.stdout, log.stderr
    assert "step 2: loss " in log.stdout, log.stdout  # each logged optimizer step, from the driver


def test_a_plan_the_cluster_could_never_hold_is_refused_at_submission(joined_gpu_site: Site) -> None:
    site = joined_gpu_site  # one 24 GiB GPU
    llama_7b = site.tmp / "llama-2-7b"  # its config and a weights file: nothing is loaded before the refusal
    llama_7b.mkdir(exist_ok=True)
    (llama_7b / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    (llama_7b / "model.safetensors").write_bytes(b"")
    full = site.llmplan("submit", "finetune", "--model", str(llama_7b), "--data", str(site.data), "--method", "full")
    assert full.returncode != 0
    assert "does not fit 1 x" in full.stderr and "24.0 GiB" in full.stderr, full.stderr
    two = site.llmplan("submit", "finetune", "--model", str(site.model), "--data", str(site.data), "--gpus", "2",
                       "--method", "lora", "--zero", "0")
    assert two.returncode == 1
    assert "refused: the plan needs 2 GPUs" in two.stderr and "largest node has 1 GPU(s) of 24.0 GiB" in two.stderr
    assert site.cluster()["queued"] == 0


def test_out_of_memory_is_replanned_with_more_headroom_and_retried(joined_gpu_site: Site) -> None:
    site = joined_gpu_site
    first = site.queue(gpu_gib=None, steps=2, micro_batch=2, name="oom")
    site.cluster()
    failed = site.wait(first, ended)
    assert (failed.status, failed.error_class) == (JobStatus.FAILED, ErrorClass.OOM), failed.error_message
    assert "CUDA out of memory (injected" in failed.error_message

    retry_id = None
    deadline = time.monotonic() + 30
    while retry_id is None and time.monotonic() < deadline:
        retry_id = site.retry_of(first)
        time.sleep(0.3)
    assert retry_id is not None, "no retry was queued"
    retry = site.wait(retry_id, ended)
    assert retry.status is JobStatus.SUCCEEDED, retry.error_message
    assert (retry.attempt, retry.retry_of) == (2, first)
    assert (failed.plan["micro_batch"], failed.plan["grad_accum"]) == (2, 2)
    assert (retry.plan["micro_batch"], retry.plan["grad_accum"]) == (1, 4)  # the same global batch
    assert retry.request["config"]["micro_batch"] == 1
    assert retry.request["margin"] == pytest.approx(0.15)  # one recorded OOM of this model on this card
    assert "after out of memory: micro-batch 1 x 4 accumulation" in site.details(retry_id).events[0].message


# ---- failures and restarts ------------------------------------------------------------------------------
def test_after_a_ray_restart_lost_jobs_fail_and_checkpointed_training_resumes(
        tmp_path: Path, tiny_llama: Path, tiny_alpaca: Path) -> None:
    port = free_port()
    site = Site(tmp_path, start_node(port=port, cpus=4), tiny_llama, tiny_alpaca, joined=True)
    try:
        with joined(site.node.address):  # left before the cluster goes: Ray ends a driver whose cluster is lost
            submitted = site.llmplan("submit", "finetune", "--model", str(tiny_llama), "--data", str(tiny_alpaca),
                                     "--micro-batch", "1", "--batch-size", "2", "--seq-len", "64", "--lr", "1e-3",
                                     "--max-steps", str(FOREVER), "--save-every", "2", "--json")
            assert submitted.returncode == 0, submitted.stderr
            resumable = json.loads(submitted.stdout)["id"]
            lost = site.queue(gpu_gib=None, steps=FOREVER, name="no-checkpoint")
            site.cluster()
        checkpoints = Path(site.wait(resumable, status_is(JobStatus.RUNNING)).request["config"]["output_dir"])
        site.wait(lost, status_is(JobStatus.RUNNING))
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("checkpoints/step-*/trainer_state.pt")):
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.3)

        site.node.kill()  # the whole cluster goes, drivers and workers with it: nothing could record anything
        assert site.job(resumable).status is JobStatus.RUNNING
        site.node = start_node(port=port, cpus=4)
        with joined(site.node.address):
            site.cluster()  # a new scheduler on the new cluster reconciles what the database says was running

            for job_id in (resumable, lost):
                failed = site.wait(job_id, ended)
                assert (failed.status, failed.error_class) == (JobStatus.FAILED, ErrorClass.INFRASTRUCTURE)
                assert "vanished" in failed.error_message
            assert site.retry_of(lost) is None
            resumed_id = site.retry_of(resumable)
            assert resumed_id is not None
            resumed = site.wait(resumed_id, lambda job: bool(site.details(job.id).metrics), timeout=180)
            assert resumed.request["config"]["resume"] is True
            assert site.details(resumed_id).metrics[0].step > 2  # continued after a saved step, not from step 1
            stopped = site.llmplan("cancel", str(resumed_id))
            assert stopped.stdout.strip() == f"job {resumed_id}: cancelled", stopped.stderr
    finally:
        site.node.kill()


# The head's GCS declares a node dead after `failure_threshold` failed health checks `period_ms` apart: Ray's
# defaults (5 x 3 s) keep the test waiting 15 s for a killed node; a killed raylet fails each check at once, while
# a slow one still has the default 10 s timeout per check before it counts as failed.
QUICK_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


def test_a_job_on_a_worker_node_that_dies_fails_as_infrastructure(
        tmp_path: Path, tiny_llama: Path, tiny_alpaca: Path) -> None:
    head = start_node(cpus=2, env=QUICK_NODE_DEATH)
    worker = start_node(head_address=head.address, cpus=2, gpus=1, gpu_mib=24 * 1024)
    site = Site(tmp_path, head, tiny_llama, tiny_alpaca, joined=True)
    try:
        with joined(head.address):  # the head outlives the test's worker: this process stays joined to it
            job_id = site.queue(gpu_gib=16, steps=FOREVER, name="on-the-worker")
            view = site.cluster()
            assert sorted((node["head"], len(node["gpus"])) for node in view["nodes"]) == [(False, 1), (True, 0)]
            worker_id = next(node["node_id"] for node in view["nodes"] if not node["head"])
            running = site.wait(job_id, status_is(JobStatus.RUNNING))
            assert running.placement_node == worker_id  # the only node with a GPU

            worker.kill()
            failed = site.wait(job_id, ended, timeout=180)
            assert (failed.status, failed.error_class) == (JobStatus.FAILED, ErrorClass.INFRASTRUCTURE)
            assert failed.error_message.startswith(("ActorDiedError", "ActorUnavailableError")), failed.error_message
            assert site.cluster()["nodes"][0]["head"]  # the cluster goes on without the worker
    finally:
        worker.kill()
        head.kill()


# ---- what a stopped job leaves on the cluster -----------------------------------------------------------
RESERVING = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")  # placement group states that hold resources
TRAIN_ACTORS = frozenset({"TrainController", "RayTrainWorker", "PlacementGroupCleaner"})


@pytest.fixture
def ray_client(ray_head: RayNode) -> Iterator[Any]:
    """This test process joined to the session's cluster, to read Ray's own tables (and run its commands here)."""
    import ray

    with joined(ray_head.address):
        yield ray


def reserved_groups(ray: Any) -> set[str]:
    return {pg_id for pg_id, group in ray.util.placement_group_table().items() if group["state"] in RESERVING}


def live_train_actors(ray: Any) -> set[str]:
    from ray._private.state import actors

    return {actor_id for actor_id, actor in actors().items()
            if actor["State"] == "ALIVE" and actor["ActorClassName"] in TRAIN_ACTORS}


def new_group(ray: Any, known: set[str], timeout: float = 180) -> str:
    """A placement group not in `known` (a job's Ray Train run reserved it), once there is one; added to `known`."""
    deadline = time.monotonic() + timeout
    while not (new := reserved_groups(ray) - known):
        assert time.monotonic() < deadline, "no new placement group"
        time.sleep(0.3)
    known.update(new)
    return new.pop()


@pytest.mark.slow
def test_cancelled_and_dead_drivers_leave_no_placement_group_or_actor(
        tmp_path: Path, ray_head: RayNode, ray_client: Any, tiny_llama: Path, tiny_alpaca: Path) -> None:
    """Ray Train's placement group (2 CPUs for 2 workers) and its detached cleaner outlived a killed driver: on
    this 4-CPU head, two cancels left the next jobs running for ever with no step. Two cancels in a row and a
    driver killed by SIGKILL, each once its workers have their group (were the cancelled groups left reserved,
    the third job's would never come), then a fourth job runs, and nothing of theirs is left reserved or alive."""
    ray = ray_client
    site = Site(tmp_path, ray_head, tiny_llama, tiny_alpaca, joined=True)
    groups_before, actors_before = reserved_groups(ray), live_train_actors(ray)
    seen = set(groups_before)

    for turn in range(2):
        job_id = site.queue(gpu_gib=None, steps=FOREVER, workers=2, name=f"cancelled-{turn}")
        if turn == 0:
            site.cluster()  # starts the scheduler
        new_group(ray, seen)
        stopped = site.llmplan("cancel", str(job_id))
        assert stopped.stdout.strip() == f"job {job_id}: cancelled", stopped.stderr

    killed = site.queue(gpu_gib=None, steps=FOREVER, workers=2, name="driver-killed")
    new_group(ray, seen)
    os.kill(ray._private.state.actors(site.job(killed).ray_actor_id)["Pid"], signal.SIGKILL)
    failed = site.wait(killed, ended)
    assert (failed.status, failed.error_class) == (JobStatus.FAILED, ErrorClass.INFRASTRUCTURE)

    wait_until_freed(ray, groups_before, actors_before)  # swept by the scheduler within RELEASE_SWEEPS cycles
    last = site.wait(site.queue(gpu_gib=None, steps=2, workers=2, name="after"), ended)
    assert last.status is JobStatus.SUCCEEDED, last.error_message
    deadline = time.monotonic() + 120  # the last run's own teardown may still be under way
    while reserved_groups(ray) != groups_before:
        assert time.monotonic() < deadline, reserved_groups(ray) - groups_before
        time.sleep(0.5)


def wait_until_freed(ray: Any, groups_before: set[str], actors_before: set[str], timeout: float = 120) -> None:
    """Placement groups freed; Ray Train's controllers, workers and detached PlacementGroupCleaners dead (a cleaner
    still being created when its driver died starts afterwards: the sweep waits for it and kills it)."""
    deadline = time.monotonic() + timeout
    while (reserved_groups(ray), live_train_actors(ray)) != (groups_before, actors_before):
        left = (reserved_groups(ray) - groups_before,
                train_actor_names(ray, live_train_actors(ray) - actors_before))
        assert time.monotonic() < deadline, left
        time.sleep(0.5)


def train_actor_names(ray: Any, actor_ids: set[str]) -> list[str]:
    from ray._private.state import actors

    return sorted(f"{actors(actor_id)['ActorClassName']} {actor_id[:8]}" for actor_id in actor_ids)
