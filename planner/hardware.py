"""What hardware a plan is for, and what can run on it.

`plan_hardware` answers "which GPUs are we planning for": a card named with `--gpu NAME` (hardware that
need not be present), any card with `--gpu-mem SIZE`, else the GPUs NVML finds here (their free memory),
else the default card, with the sentence that says so. `deepspeed_preflight` says whether DeepSpeed can
run here: its CUDA ops are compiled on first use, which needs a CUDA toolkit with nvcc.

NVML and the file system are reached through parameters (a probe callable, `which`, `environ`,
`is_file`), so tests pass stand-ins.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .gpus import GpuProbe, GpuSpec, default_gpu, default_planning_notice, find_gpu, gpu_with_memory, lookup_gpu
from .units import format_gib, parse_size


class HardwareError(ValueError):
    """Hardware options that cannot describe a plan; the message says what to pass instead."""


@dataclass(frozen=True)
class Hardware:
    """`count` GPUs of one kind, each with `memory_bytes` a plan may fill (before the safety margin)."""

    gpu: GpuSpec
    count: int
    memory_bytes: int
    source: str  # nvml | catalog | user | default
    notice: str = ""  # the first line to print when planning for hardware nobody named or found
    notes: tuple[str, ...] = ()
    host_memory_bytes: int | None = None  # the node's CPU memory for offload; None: not known, not checked

    def __post_init__(self) -> None:
        if self.count < 1:
            raise HardwareError(f"--gpus must be at least 1, got {self.count}")
        if self.memory_bytes <= 0:
            raise HardwareError(f"{self.gpu.name} has no free memory to plan with")

    @property
    def memory_basis(self) -> str:
        return {"nvml": "free now, NVML", "catalog": "catalog", "user": "--gpu-mem", "default": "catalog",
                "cluster": "free now, Ray cluster"}[self.source]

    def describe(self) -> str:
        """"2 x A100 80GB, 80.0 GiB each (catalog)"."""
        return f"{self.count} x {self.gpu.name}, {format_gib(self.memory_bytes)} each ({self.memory_basis})"

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu.name,
            "count": self.count,
            "memory_bytes": self.memory_bytes,
            "memory_basis": self.memory_basis,
            "source": self.source,
            "compute_capability": self.gpu.compute_capability_str,
            "bf16": self.gpu.bf16,
            "notice": self.notice or None,
            "notes": list(self.notes),
            "host_memory_bytes": self.host_memory_bytes,
        }


def hardware_from_dict(data: dict) -> Hardware:
    """`Hardware.to_dict` read back (a recorded job re-planned later): catalog cards by name, others by memory."""
    spec = find_gpu(data["gpu"]) or gpu_with_memory(int(data["memory_bytes"]))
    return Hardware(spec, int(data["count"]), int(data["memory_bytes"]), data.get("source", "catalog"),
                    notes=tuple(data.get("notes") or ()), host_memory_bytes=data.get("host_memory_bytes"))


MEMINFO = Path("/proc/meminfo")


def host_memory_from_meminfo(text: str) -> int | None:
    """The CPU memory a plan may use here: MemAvailable of /proc/meminfo (kB), None when it is not there."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def local_host_memory_bytes(meminfo: Path = MEMINFO) -> int | None:
    """This machine's available CPU memory (Linux), or None where /proc/meminfo cannot be read."""
    try:
        return host_memory_from_meminfo(meminfo.read_text())
    except OSError:
        return None


def plan_hardware(gpus: int | None, gpu_name: str | None, gpu_mem: str | int | None,
                  probe: Callable[[], GpuProbe],
                  host_memory: Callable[[], int | None] = local_host_memory_bytes) -> Hardware:
    """The GPUs to plan for. `probe` is called only when neither `gpu_name` nor `gpu_mem` is given; `host_memory`
    (this machine's CPU memory, which offloading plans need) only when the probe finds GPUs here."""
    if gpus is not None and gpus < 1:
        raise HardwareError(f"--gpus must be at least 1, got {gpus}")
    if gpu_name or gpu_mem:
        return _named(gpus or 1, gpu_name, gpu_mem)
    hardware = _probed(gpus, probe())
    return replace(hardware, host_memory_bytes=host_memory()) if hardware.source == "nvml" else hardware


def _named(count: int, gpu_name: str | None, gpu_mem: str | int | None) -> Hardware:
    try:
        spec = lookup_gpu(gpu_name) if gpu_name else None
        memory = parse_size(gpu_mem) if gpu_mem is not None else None
    except (LookupError, ValueError) as error:
        raise HardwareError(str(error)) from error
    if memory is None:
        if spec is None:
            raise HardwareError("name a card with --gpu NAME or give its memory with --gpu-mem SIZE")
        return Hardware(spec, count, spec.memory_bytes, "catalog", notes=_approximate(spec))
    card = gpu_with_memory(memory, like=spec or default_gpu())
    notes = () if spec else (f"--gpu-mem without --gpu: compute figures are the {default_gpu().name}'s "
                             "(add --gpu NAME for another card's)",)
    return Hardware(card, count, memory, "user", notes=notes)


def _approximate(spec: GpuSpec) -> tuple[str, ...]:
    if not spec.memory_approximate:
        return ()
    return (f"{spec.name}: usable memory approximated from the datasheet's {spec.memory_gb:g} GB; "
            "pass --gpu-mem for the exact figure",)


def _probed(gpus: int | None, probe: GpuProbe) -> Hardware:
    if not probe.found:
        count = gpus or 1
        notice = default_planning_notice() if count == 1 else (
            f"no GPU found: planning for {count} x {default_gpu().label}; use --gpu NAME or --gpu-mem SIZE")
        spec = default_gpu()
        notes = (f"NVML: {probe.reason}",) if probe.reason else ()
        return Hardware(spec, count, spec.memory_bytes, "default", notice=notice, notes=notes)
    # The GPUs with the most free memory; a plan must fit the smallest of them.
    chosen = sorted(probe.gpus, key=lambda gpu: gpu.memory_free_bytes, reverse=True)[: gpus or len(probe.gpus)]
    smallest = min(chosen, key=lambda gpu: gpu.memory_free_bytes)
    try:
        spec = smallest.planning_spec()
    except ValueError as error:
        raise HardwareError(str(error)) from error
    notes = []
    count = gpus or len(probe.gpus)
    if count > len(probe.gpus):
        notes.append(f"NVML finds {len(probe.gpus)} GPU{'s' if len(probe.gpus) > 1 else ''} here; planning for "
                     f"{count} like them (use --gpu NAME to plan for other hardware)")
    names = {gpu.name for gpu in chosen}
    if len(names) > 1:
        notes.append(f"mixed GPUs ({', '.join(sorted(names))}): planning for the one with the least free memory, "
                     f"GPU {smallest.index} ({smallest.name})")
    used = smallest.memory_total_bytes - smallest.memory_free_bytes
    if smallest.memory_total_bytes and used > 0.05 * smallest.memory_total_bytes:
        notes.append(f"GPU {smallest.index} has {format_gib(used)} in use by other processes: "
                     "planning with what is free")
    if smallest.catalog is None:
        notes.append(f"{smallest.name} is not in the GPU catalog: no throughput figures, so times are not "
                     "estimated (use --gpu NAME for a similar card's)")
    return Hardware(spec, count, smallest.memory_free_bytes or spec.memory_bytes, "nvml", notes=tuple(notes))


# ---- DeepSpeed ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preflight:
    """Whether the plan may use DeepSpeed, and why."""

    deepspeed: bool
    nvcc: str | None
    reason: str

    def to_dict(self) -> dict:
        return {"deepspeed": self.deepspeed, "nvcc": self.nvcc, "reason": self.reason}


def find_nvcc(which: Callable[[str], str | None] = shutil.which, environ: Mapping[str, str] | None = None,
              is_file: Callable[[str], bool] = os.path.isfile) -> str | None:
    """nvcc on PATH, else $CUDA_HOME/bin/nvcc, else None."""
    found = which("nvcc")
    if found:
        return found
    home = (os.environ if environ is None else environ).get("CUDA_HOME")
    if home:
        candidate = os.path.join(home, "bin", "nvcc")
        if is_file(candidate):
            return candidate
    return None


def deepspeed_preflight(override: bool | None, nvcc: str | None) -> Preflight:
    """`override`: True (--deepspeed), False (--no-deepspeed) or None (decide from nvcc)."""
    if override is False:
        return Preflight(False, nvcc, "DeepSpeed left out (--no-deepspeed): DDP and FSDP only")
    if override is True:
        reason = f"DeepSpeed planned (--deepspeed); nvcc at {nvcc}" if nvcc else (
            "DeepSpeed planned (--deepspeed) although no nvcc was found: its CUDA ops will need a CUDA toolkit")
        return Preflight(True, nvcc, reason)
    if nvcc:
        return Preflight(True, nvcc, f"DeepSpeed can build its CUDA ops (nvcc at {nvcc})")
    return Preflight(False, None, "no nvcc (CUDA toolkit) on PATH or in $CUDA_HOME/bin, which DeepSpeed needs to "
                                  "build its CUDA ops: planning without DeepSpeed (DDP and FSDP; no ZeRO-Offload). "
                                  "Install the toolkit, or pass --deepspeed to plan with it anyway")
