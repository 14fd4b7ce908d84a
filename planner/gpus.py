"""GPUs as typed data: catalog specs, probed devices, and name lookup.

A `GpuSpec` is one card model as its datasheet describes it (the numbers live in `gpu_catalog.py`).
A `ProbedGpu` is one device NVML reported on this machine (`nvml_probe.py` builds them); it carries
the `GpuSpec` its NVML name matched, when the catalog knows the card. Planning code asks either for
a `GpuSpec`: `lookup_gpu("A100 80GB")`, `ProbedGpu.planning_spec()` or `gpu_with_memory(...)`.

Names are matched case-insensitively, ignoring punctuation, spaces and the vendor words NVIDIA,
GeForce, Tesla and Quadro, so "A100-80GB", "a100 80gb" and "NVIDIA A100-SXM4-80GB" all find the
same entry. Nothing here imports pynvml, torch or any other heavy module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .gpu_spec import BF16_MIN_CC, GpuSpec
from .units import format_gb, format_gib

# The card planning assumes when NVML finds none and the user names none: the typical single
# consumer card people fine-tune on.
DEFAULT_GPU_NAME = "RTX 4090"

_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro"})


class UnknownGpuError(LookupError):
    """A GPU name the catalog does not know (or that names several cards); says what to type instead."""

    def __init__(self, message: str, suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.suggestions = suggestions

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    name: str | None  # None when NVML may not tell (another container's pid, no permission)
    used_memory_bytes: int | None  # None when the driver does not account it (e.g. Windows WDDM)
    kind: str = "compute"  # compute | graphics | compute+graphics

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProbedGpu:
    """One GPU as NVML reports it on this machine."""

    index: int  # NVML index: PCI bus order, which CUDA uses only with CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str
    uuid: str
    memory_total_bytes: int  # 0 when NVML could not say (see notes)
    memory_used_bytes: int
    memory_free_bytes: int
    compute_capability: tuple[int, int]
    driver_version: str = ""
    cuda_version: str = ""  # the newest CUDA the driver supports, e.g. "12.4"
    pci_bus_id: str = ""
    nvlink_peers: tuple[int, ...] = ()  # indices of the local GPUs this one reaches over NVLink
    nvswitch: bool = False  # its NVLinks go to NVSwitches (HGX/DGX boards)
    processes: tuple[GpuProcess, ...] = ()
    catalog: GpuSpec | None = None  # the catalog entry its name matched
    notes: tuple[str, ...] = ()  # what NVML could not tell, and why
    bf16: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capability", tuple(self.compute_capability))
        object.__setattr__(self, "bf16", self.compute_capability >= BF16_MIN_CC)

    def planning_spec(self) -> GpuSpec:
        """The spec to plan with: the catalog's throughput with the memory this device really has.

        A card the catalog does not know gets a spec with its memory and compute capability and no
        throughput figures (None).
        """
        if self.catalog is not None:
            if self.memory_total_bytes <= 0:
                return self.catalog
            return self.catalog.with_memory(self.memory_total_bytes, basis="probed")
        if self.memory_total_bytes <= 0:
            raise ValueError(f"GPU {self.index} ({self.name}): NVML gave no memory size; pass --gpu-mem SIZE")
        return GpuSpec(
            name=self.name,
            compute_capability=self.compute_capability,
            memory_bytes=self.memory_total_bytes,
            memory_basis="probed",
            source="NVML probe (not in the llmplan GPU catalog)",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_free_bytes": self.memory_free_bytes,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "bf16": self.bf16,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "nvlink_peers": list(self.nvlink_peers),
            "nvswitch": self.nvswitch,
            "processes": [process.to_dict() for process in self.processes],
            "catalog_name": self.catalog.name if self.catalog else None,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class GpuProbe:
    """What one NVML probe found: the GPUs, or the sentence saying why there are none."""

    gpus: tuple[ProbedGpu, ...] = ()
    driver_version: str = ""
    cuda_version: str = ""
    reason: str = ""  # why no GPU is listed; empty when NVML answered and found some
    cuda_visible_devices: str | None = None  # the environment variable, when set: CUDA sees a subset
    notes: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "reason": self.reason or None,
            "cuda_visible_devices": self.cuda_visible_devices,
            "notes": list(self.notes),
        }
        if not self.gpus:
            data["planning_default"] = DEFAULT_GPU_NAME
        return data


# ---- names ------------------------------------------------------------------------------------
def normalize_gpu_name(name: str) -> str:
    """The lookup key of a GPU name: lower case, no vendor words, no punctuation, "80GB" -> "80g"."""
    words = re.split(r"[^a-z0-9]+", name.strip().lower())
    text = "".join(word for word in words if word not in _VENDOR_WORDS)
    return re.sub(r"(\d)gb", r"\1g", text)


@functools.lru_cache(maxsize=1)
def _catalog_index() -> Mapping[str, GpuSpec]:
    """normalized name, alias or NVML name -> spec; refuses a key two cards would share."""
    from .gpu_catalog import AMBIGUOUS_NAMES, GPUS

    index: dict[str, GpuSpec] = {}
    ambiguous = {normalize_gpu_name(name) for name in AMBIGUOUS_NAMES}
    for spec in GPUS:
        for name in (spec.name, *spec.aliases, *spec.nvml_names):
            key = normalize_gpu_name(name)
            owner = index.get(key)
            if (owner is not None and owner is not spec) or key in ambiguous:
                raise ValueError(f"GPU catalog: name {name!r} of {spec.name} is also claimed elsewhere")
            index[key] = spec
    return MappingProxyType(index)


def catalog_gpus() -> tuple[GpuSpec, ...]:
    from .gpu_catalog import GPUS

    return GPUS


def find_gpu(name: str) -> GpuSpec | None:
    """The catalog entry a name or alias denotes, or None."""
    return _catalog_index().get(normalize_gpu_name(name))


def _ambiguous_choices(name: str) -> tuple[str, ...]:
    """The cards a name such as "A100" could mean; empty when it is not one of those names."""
    from .gpu_catalog import AMBIGUOUS_NAMES

    key = normalize_gpu_name(name)
    for ambiguous, choices in AMBIGUOUS_NAMES.items():
        if normalize_gpu_name(ambiguous) == key:
            return tuple(choices)
    return ()


def suggest_gpus(name: str, limit: int = 3) -> tuple[str, ...]:
    """Catalog names close to a misspelled one, best first (difflib)."""
    choices = _ambiguous_choices(name)
    if choices:
        return choices[:limit]
    index = _catalog_index()
    key = normalize_gpu_name(name)
    suggestions: list[str] = []
    for close in difflib.get_close_matches(key, list(index), n=limit * 4, cutoff=0.6):
        if index[close].name not in suggestions:
            suggestions.append(index[close].name)
    return tuple(suggestions[:limit])


def lookup_gpu(name: str) -> GpuSpec:
    """The catalog entry for a name such as "A100 80GB", "h100", "4090" or "NVIDIA H200".

    Raises UnknownGpuError with "did you mean" suggestions for unknown or ambiguous names.
    """
    spec = find_gpu(name)
    if spec is not None:
        return spec
    choices = _ambiguous_choices(name)
    if choices:
        options = " or ".join(repr(choice) for choice in choices)
        raise UnknownGpuError(f"{name!r} names more than one card (memory differs): say {options}", choices)
    suggestions = suggest_gpus(name)
    hint = f" Did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise UnknownGpuError(
        f"unknown GPU {name!r}.{hint} `llmplan gpus --catalog` lists the known cards; "
        "for another card pass its memory with --gpu-mem SIZE (e.g. 24GiB).",
        suggestions,
    )


def match_nvml_name(nvml_name: str) -> GpuSpec | None:
    """The catalog entry for a name as NVML reports it ("NVIDIA H200", "Tesla P40", ...), or None.

    Exact matches only (after normalization): a near miss such as "NVIDIA A100 80GB PCIe" is a
    different card, and guessing would lend it another card's throughput.
    """
    return find_gpu(nvml_name)


def default_gpu() -> GpuSpec:
    return lookup_gpu(DEFAULT_GPU_NAME)


def default_planning_notice(reason: str = "no GPU found") -> str:
    """"no GPU found: planning for 1 x RTX 4090 (24 GB); use --gpu NAME or --gpu-mem SIZE"."""
    return f"{reason}: planning for 1 x {default_gpu().label}; use --gpu NAME or --gpu-mem SIZE"


def gpu_with_memory(memory_bytes: int, like: str | GpuSpec = DEFAULT_GPU_NAME) -> GpuSpec:
    """A card with ``memory_bytes`` of memory (``--gpu-mem``) and the rest of ``like``'s spec.

    Throughput, compute capability and bf16 come from ``like`` (the default card unless the user
    also named one); the name says so, e.g. "RTX 4090-class, 16.0 GiB".
    """
    base = like if isinstance(like, GpuSpec) else lookup_gpu(like)
    name = f"{base.name}-class, {format_gib(memory_bytes)}"
    return base.with_memory(memory_bytes, basis="user", name=name)


def describe_memory(spec: GpuSpec) -> str:
    """"24 GB (23.99 GiB)": the datasheet figure, then the usable bytes ("~" when approximated)."""
    vendor = f"{spec.memory_gb:g} GB" if spec.memory_gb else format_gb(spec.memory_bytes)
    marker = "~" if spec.memory_approximate else ""
    return f"{vendor} ({marker}{format_gib(spec.memory_bytes, 1)})"
