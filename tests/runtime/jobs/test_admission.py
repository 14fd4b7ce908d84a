"""Admission decisions on declared GPUs: priorities, first come first, memory per GPU, no backfilling."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from llmplan.runtime.jobs.admission import (
    CpuDemand,
    CpuNode,
    Demand,
    GpuSlot,
    QueuedJob,
    Reservation,
    admit,
    available_bytes,
    cpu_capacity,
    cpu_demand_of,
    cpu_node,
    demand_of,
    never_fits,
    never_fits_on_cpus,
)

GIB = 2**30
T0 = datetime(2026, 11, 30, tzinfo=timezone.utc)


def gpus(node: str, count: int, gib: int, free_gib: list[int] | None = None) -> list[GpuSlot]:
    return [GpuSlot(node, i, gib * GIB, None if free_gib is None else free_gib[i] * GIB) for i in range(count)]


def job(job_id: int, gib: float, *, gpus: int = 1, priority: int = 0, minute: int | None = None) -> QueuedJob:
    created = T0 + timedelta(minutes=job_id if minute is None else minute)
    return QueuedJob(job_id, priority, created, Demand(gpus, int(gib * GIB)))


def admitted(queue, slots, reservations=()) -> list[tuple[int, str | None, tuple[int, ...]]]:
    return [(a.job_id, a.node_id, a.gpu_indices) for a in admit(queue, slots, reservations)]


def test_higher_priority_first_then_first_come() -> None:
    queue = [job(1, 20), job(2, 20, priority=5), job(3, 20, priority=5), job(4, 20)]
    assert admitted(queue, gpus("a", 2, 24)) == [(2, "a", (0,)), (3, "a", (1,))]


def test_jobs_share_a_gpu_while_their_plans_fit_its_memory() -> None:
    queue = [job(1, 10), job(2, 10), job(3, 10)]
    assert admitted(queue, gpus("a", 1, 24)) == [(1, "a", (0,)), (2, "a", (0,))]


def test_a_waiting_gpu_job_is_not_overtaken_by_smaller_ones_but_cpu_jobs_run() -> None:
    queue = [job(1, 30), job(2, 4), job(3, 0, gpus=0)]
    slots = gpus("a", 1, 40)
    reservations = [Reservation(99, (("a", 0),), 20 * GIB)]  # 20 GiB left: job 1 waits, so must job 2
    assert admitted(queue, slots, reservations) == [(3, None, ())]


def test_nvml_free_memory_counts_other_processes() -> None:
    slots = gpus("a", 2, 80, free_gib=[10, 79])  # GPU 0 busy with a process llmplan did not start
    assert admitted([job(1, 40)], slots) == [(1, "a", (1,))]
    assert available_bytes(slots, [Reservation(7, (("a", 1),), 40 * GIB)]) == {("a", 0): 10 * GIB, ("a", 1): 40 * GIB}


def test_multi_gpu_jobs_stay_on_one_node_and_pick_the_tightest_fit() -> None:
    slots = gpus("a", 2, 80) + gpus("b", 4, 24)
    assert admitted([job(1, 20, gpus=2)], slots) == [(1, "b", (0, 1))]  # 24 GiB cards leave less unused
    assert admitted([job(1, 20, gpus=3)], gpus("a", 2, 80) + gpus("b", 2, 80)) == []


def test_never_fits_says_what_the_cluster_has() -> None:
    slots = gpus("a", 2, 24)
    assert never_fits(Demand(1, 20 * GIB), slots) is None
    assert never_fits(Demand(0, 0), []) is None
    assert "largest node has 2 GPU(s) of 24.0 GiB" in never_fits(Demand(1, 30 * GIB), slots)
    assert never_fits(Demand(4, GIB), slots).startswith("the plan needs 4 GPUs with 1.0 GiB each on one node")
    assert "no GPUs" in never_fits(Demand(1, GIB), [])


def test_demand_is_read_from_the_recorded_plan() -> None:
    finetune = {"device": "cuda", "workers": 2, "estimated_device_bytes": 5 * GIB}
    inference = {"device": "cuda", "replicas": 2, "gpus_per_replica": 2, "estimated_device_bytes": 7 * GIB}
    assert demand_of("finetune", finetune) == Demand(2, 5 * GIB)
    assert demand_of("infer", inference) == Demand(4, 7 * GIB)
    assert demand_of("finetune", {"device": "cpu", "workers": 2, "estimated_device_bytes": GIB}) == Demand(0, 0)
    assert demand_of("infer", None) == Demand(0, 0)


def test_an_offloading_plan_needs_the_host_memory_of_a_node_whose_gpus_hold_it() -> None:
    slots = [GpuSlot("a", 0, 24 * GIB), GpuSlot("b", 0, 80 * GIB)]
    nodes = [CpuNode("a", 16, 256 * GIB), CpuNode("b", 16, 23 * GIB)]
    # 30 GiB per GPU: only node b's card holds it, and b has 23 GiB of host memory
    assert never_fits(Demand(1, 30 * GIB, 180 * GIB), slots, nodes) == (
        "the plan needs 180.0 GiB of host memory for its offload; the largest node whose GPUs hold it has 23.0 GiB")
    assert never_fits(Demand(1, 20 * GIB, 180 * GIB), slots, nodes) is None  # node a holds both
    assert never_fits(Demand(1, 30 * GIB, 20 * GIB), slots, nodes) is None
    assert never_fits(Demand(1, 30 * GIB, 180 * GIB), slots) is None  # no node memory known: not checked
    plan = {"device": "cuda", "workers": 1, "estimated_device_bytes": GIB, "host_bytes": 8 * GIB}
    assert demand_of("finetune", plan) == Demand(1, GIB, 8 * GIB)


# ---- CPU plans ------------------------------------------------------------------------------------------
def test_cpu_workers_are_held_by_the_nodes_cpus_and_memory() -> None:
    nodes = [CpuNode("a", 2, 23 * GIB), CpuNode("b", 8, 10 * GIB)]
    assert cpu_capacity(CpuDemand(1, 4 * GIB), nodes) == 2 + 2  # b: 8 CPUs, but memory for 2 workers
    assert never_fits_on_cpus(CpuDemand(4, 4 * GIB), nodes) is None
    assert never_fits_on_cpus(CpuDemand(1000, GIB // 2), nodes) == (
        "the plan needs 1000 CPU workers with 512 MiB of host memory each; the cluster holds 10 (10 CPUs on 2 nodes)")
    assert never_fits_on_cpus(CpuDemand(1, 49 * GIB), nodes) == (
        "the plan needs 1 CPU worker with 49.0 GiB of host memory each; the cluster's largest node has 23.0 GiB "
        "of host memory")
    assert never_fits_on_cpus(None, []) is None  # a GPU plan: never_fits judges it


def test_cpu_demand_and_nodes_are_read_from_the_plan_and_ray() -> None:
    assert cpu_demand_of("finetune", {"device": "cpu", "workers": 3, "estimated_device_bytes": GIB}) == CpuDemand(3, GIB)
    assert cpu_demand_of("infer", {"device": "cpu", "replicas": 1, "estimated_device_bytes": GIB}) == CpuDemand(1, GIB)
    assert cpu_demand_of("finetune", {"device": "cuda", "workers": 1, "estimated_device_bytes": GIB}) is None
    ray_node = {"NodeID": "n1", "Resources": {"CPU": 2.0, "memory": 16.0 * GIB, "object_store_memory": 7.0 * GIB}}
    assert cpu_node(ray_node) == CpuNode("n1", 2, 23 * GIB)
