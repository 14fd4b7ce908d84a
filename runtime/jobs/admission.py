"""Admission: which queued jobs start now, and on which GPUs. Pure Python: no Ray, no database.

The scheduler feeds it three things and carries out its answer:

- the cluster's GPUs (`GpuSlot`: total memory, and NVML's free memory where a real GPU reports it),
- the reservations of the jobs already placed (`Reservation`: their plan's bytes on each of their GPUs),
- the queue (`QueuedJob`: each job's `Demand`, read from its plan).

At submission, `never_fits` and `never_fits_on_cpus` refuse what the cluster could not run even idle: a GPU
plan no node's GPUs hold (or whose offload no such node's host memory holds), and a CPU plan whose workers (one CPU and its host memory each) the nodes'
CPUs and memory (`CpuNode`) cannot all hold.

A GPU's available memory is the smaller of what NVML says is free and its total minus the plans placed
on it: NVML sees other processes and jobs still loading; the plans see jobs that have not allocated yet.

Order: higher priority first, first come first within a priority. A GPU job that does not fit blocks
the GPU jobs behind it (no backfilling), so a large job is never starved by a stream of small ones;
jobs that need no GPU never wait for GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GpuKey = tuple[str, int]  # (Ray node id, GPU index on that node)


@dataclass(frozen=True)
class GpuSlot:
    node_id: str
    index: int
    total_bytes: int
    free_bytes: int | None = None  # NVML's free memory now; None for GPUs declared to Ray without NVML
    name: str = ""

    @property
    def key(self) -> GpuKey:
        return (self.node_id, self.index)


@dataclass(frozen=True)
class Demand:
    """What a plan needs: `gpus` GPUs on one node, each with `bytes_per_gpu` available, and `host_bytes` of that
    node's CPU memory for what it offloads; 0 GPUs: the CPU."""

    gpus: int
    bytes_per_gpu: int
    host_bytes: int = 0

    @property
    def on_gpus(self) -> bool:
        return self.gpus > 0

    def describe(self) -> str:
        if not self.on_gpus:
            return "the CPU"
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} with {self.bytes_per_gpu / 2**30:.1f} GiB each"


@dataclass(frozen=True)
class CpuNode:
    """A node's CPUs, and its host memory as Ray measured it at start (its memory and object store)."""

    node_id: str
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class CpuDemand:
    """What a CPU plan needs: `workers` processes of one CPU and `bytes_per_worker` of host memory each."""

    workers: int
    bytes_per_worker: int

    def describe(self) -> str:
        plural = "s" if self.workers > 1 else ""
        return f"{self.workers} CPU worker{plural} with {memory_text(self.bytes_per_worker)} of host memory each"


@dataclass(frozen=True)
class Reservation:
    job_id: int
    gpus: tuple[GpuKey, ...]
    bytes_per_gpu: int


@dataclass(frozen=True)
class QueuedJob:
    job_id: int
    priority: int
    created_at: datetime
    demand: Demand


@dataclass(frozen=True)
class Admission:
    job_id: int
    node_id: str | None  # None: a CPU job, which Ray places
    gpu_indices: tuple[int, ...]
    bytes_per_gpu: int

    def reservation(self) -> Reservation:
        return Reservation(self.job_id, tuple((self.node_id or "", i) for i in self.gpu_indices), self.bytes_per_gpu)


def demand_of(kind: str, plan: Mapping[str, Any] | None) -> Demand:
    """The GPUs a recorded plan asks for: fine-tuning one per worker, inference replicas x GPUs per replica."""
    if not plan or plan.get("device") != "cuda":
        return Demand(0, 0)
    gpus = plan["workers"] if kind == "finetune" else plan["replicas"] * plan["gpus_per_replica"]
    return Demand(int(gpus), int(plan["estimated_device_bytes"]), int(plan.get("host_bytes") or 0))


def memory_text(size: int) -> str:
    """"49.0 GiB", or "12 MiB" below a GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def cpu_demand_of(kind: str, plan: Mapping[str, Any] | None) -> CpuDemand | None:
    """The CPU workers a recorded CPU plan asks for (fine-tuning: its workers; inference: its replicas); None
    for a GPU plan."""
    if not plan or plan.get("device") == "cuda":
        return None
    workers = plan.get("workers", 1) if kind == "finetune" else plan.get("replicas", 1)
    return CpuDemand(int(workers), int(plan["estimated_device_bytes"]))


def cpu_node(ray_node: Mapping[str, Any]) -> CpuNode:
    """A live node as `ray.nodes()` lists it."""
    resources = ray_node.get("Resources", {})
    memory = resources.get("memory", 0) + resources.get("object_store_memory", 0)
    return CpuNode(ray_node["NodeID"], int(resources.get("CPU", 0)), int(memory))


def cpu_capacity(demand: CpuDemand, nodes: Sequence[CpuNode]) -> int:
    """How many of the demand's workers the idle cluster holds: per node, as many as its CPUs and memory allow."""
    per_worker = max(demand.bytes_per_worker, 1)
    return sum(min(node.cpus, node.memory_bytes // per_worker) for node in nodes)


def queue_order(queue: Iterable[QueuedJob]) -> list[QueuedJob]:
    return sorted(queue, key=lambda job: (-job.priority, job.created_at, job.job_id))


def available_bytes(slots: Sequence[GpuSlot], reservations: Iterable[Reservation]) -> dict[GpuKey, int]:
    """Per GPU: min(NVML free, total - planned bytes of the jobs placed on it)."""
    planned: dict[GpuKey, int] = {}
    for reservation in reservations:
        for key in reservation.gpus:
            planned[key] = planned.get(key, 0) + reservation.bytes_per_gpu
    available = {}
    for slot in slots:
        by_plans = slot.total_bytes - planned.get(slot.key, 0)
        available[slot.key] = by_plans if slot.free_bytes is None else min(slot.free_bytes, by_plans)
    return available


def place(demand: Demand, available: Mapping[GpuKey, int]) -> tuple[str, tuple[int, ...]] | None:
    """The node and GPUs for `demand`, or None. Best fit: the GPUs that leave the least memory unused."""
    by_node: dict[str, list[tuple[int, int]]] = {}
    for (node_id, index), free in available.items():
        if free >= demand.bytes_per_gpu:
            by_node.setdefault(node_id, []).append((free, index))
    best: tuple[int, str, tuple[int, ...]] | None = None
    for node_id, fitting in sorted(by_node.items()):
        if len(fitting) < demand.gpus:
            continue
        chosen = sorted(fitting)[: demand.gpus]
        leftover = sum(free - demand.bytes_per_gpu for free, _ in chosen)
        if best is None or leftover < best[0]:
            best = (leftover, node_id, tuple(sorted(index for _, index in chosen)))
    return None if best is None else (best[1], best[2])


def admit(queue: Iterable[QueuedJob], slots: Sequence[GpuSlot], reservations: Iterable[Reservation]) -> list[Admission]:
    """The jobs to start now, in queue order, each with its GPUs."""
    available = available_bytes(slots, reservations)
    admitted: list[Admission] = []
    gpu_queue_blocked = False
    for job in queue_order(queue):
        if not job.demand.on_gpus:
            admitted.append(Admission(job.job_id, None, (), 0))
            continue
        if gpu_queue_blocked:
            continue
        placement = place(job.demand, available)
        if placement is None:
            gpu_queue_blocked = True
            continue
        node_id, indices = placement
        for index in indices:
            available[(node_id, index)] -= job.demand.bytes_per_gpu
        admitted.append(Admission(job.job_id, node_id, indices, job.demand.bytes_per_gpu))
    return admitted


def never_fits(demand: Demand, slots: Sequence[GpuSlot], nodes: Sequence[CpuNode] = ()) -> str | None:
    """Why `demand` cannot run on this cluster even when it is idle; None when it can. With `nodes`, a plan that
    offloads also needs a node whose GPUs hold it to have its host memory."""
    if not demand.on_gpus:
        return None
    if not slots:
        return f"the plan needs {demand.describe()} but the cluster has no GPUs"
    idle = {slot.key: slot.total_bytes for slot in slots}
    placement = place(demand, idle)
    if placement is not None:
        return _short_of_host_memory(demand, slots, idle, nodes)
    per_node: dict[str, list[int]] = {}
    for slot in slots:
        per_node.setdefault(slot.node_id, []).append(slot.total_bytes)
    largest = max(per_node.values(), key=lambda sizes: (len(sizes), max(sizes)))
    return (f"the plan needs {demand.describe()} on one node; the cluster's largest node has {len(largest)} GPU(s) "
            f"of {max(largest) / 2**30:.1f} GiB")


def _short_of_host_memory(demand: Demand, slots: Sequence[GpuSlot], idle: Mapping[GpuKey, int],
                          nodes: Sequence[CpuNode]) -> str | None:
    """Why no node whose GPUs hold `demand` has the host memory its offload needs; None when one has."""
    if not demand.host_bytes or not nodes:
        return None
    memory = {node.node_id: node.memory_bytes for node in nodes}
    holding = [node_id for node_id in {slot.node_id for slot in slots}
               if place(demand, {key: size for key, size in idle.items() if key[0] == node_id}) is not None]
    largest = max((memory.get(node_id, 0) for node_id in holding), default=0)
    if largest >= demand.host_bytes:
        return None
    return (f"the plan needs {memory_text(demand.host_bytes)} of host memory for its offload; the largest node whose "
            f"GPUs hold it has {memory_text(largest)}")


def never_fits_on_cpus(demand: CpuDemand | None, nodes: Sequence[CpuNode]) -> str | None:
    """Why a CPU plan cannot run on this cluster even when it is idle; None when it can (or is a GPU plan)."""
    if demand is None or cpu_capacity(demand, nodes) >= demand.workers:
        return None
    if not nodes:
        return f"the plan needs {demand.describe()} but the cluster has no nodes"
    largest = max(node.memory_bytes for node in nodes)
    if largest < demand.bytes_per_worker:
        return f"the plan needs {demand.describe()}; the cluster's largest node has {memory_text(largest)} of host memory"
    return (f"the plan needs {demand.describe()}; the cluster holds {cpu_capacity(demand, nodes)} "
            f"({sum(node.cpus for node in nodes)} CPUs on {len(nodes)} node{'s' if len(nodes) > 1 else ''})")
