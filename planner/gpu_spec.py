"""`GpuSpec`: one GPU model as its datasheet describes it (the catalog's entries, `gpu_catalog.py`; name
lookup and probed devices are in `gpus.py`). Nothing here imports a heavy module."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .units import GB, MiB, format_gib

# bitsandbytes (0.45+, https://huggingface.co/docs/bitsandbytes/main/installation): NF4/FP4 (QLoRA)
# and 8-bit optimizers need compute capability 5.0+ (6.0+ in the PyPI wheels from 0.48.0, which drop
# Maxwell); LLM.int8() (`load_in_8bit`) needs 7.5+ (Turing) for its int8 matmul.
BNB_MIN_CC_4BIT = (5, 0)
BNB_MIN_CC_INT8 = (7, 5)
BF16_MIN_CC = (8, 0)

MEMORY_BASES = ("nvml", "approx", "probed", "user")
INTERCONNECTS = ("NVLink", "PCIe")


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: memory, compute capability and dense (no sparsity) throughput."""

    name: str
    compute_capability: tuple[int, int]
    memory_gb: float = 0.0  # as the vendor datasheet prints it (decimal GB); 0 for probed unknowns
    # Usable bytes. 0: derived from nvml_memory_mib, or else approximated from memory_gb (see below).
    memory_bytes: int = 0
    nvml_memory_mib: int = 0  # total NVML (nvidia-smi) reports on this card; 0: not known
    memory_basis: str = ""  # nvml | approx | probed | user; derived when left empty
    fp32_tflops: float | None = None
    # Dense fp16 matmul rate with fp32 accumulation (what PyTorch uses): tensor cores where the card
    # has them, else the CUDA-core fp16 rate (Pascal).
    fp16_tflops: float | None = None
    bf16_tflops: float | None = None  # dense bf16 tensor rate; None below compute capability 8.0
    tf32_tflops: float | None = None  # dense
    fp16_nontensor_tflops: float | None = None  # CUDA-core fp16, recorded for pre-Ampere cards
    int8_tops: float | None = None  # dense int8 tensor rate (P40: dp4a)
    memory_bandwidth_gbps: float | None = None  # GB/s
    tensor_cores: bool = False
    interconnect: str = "PCIe"  # how cards of this model talk in a typical server: NVLink or PCIe
    interconnect_gbps: float | None = None  # GB/s, both directions, per GPU
    memory_type: str = ""
    architecture: str = ""
    source: str = ""  # URL of the datasheet or whitepaper the numbers come from
    nvml_names: tuple[str, ...] = ()  # exactly as nvmlDeviceGetName returns them
    aliases: tuple[str, ...] = ()
    bitsandbytes_note: str = ""
    notes: str = ""
    bf16: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a GPU spec needs a name")
        cc = tuple(self.compute_capability)
        if len(cc) != 2 or not all(isinstance(part, int) and part >= 0 for part in cc):
            raise ValueError(f"{self.name}: compute_capability must be (major, minor), got {self.compute_capability!r}")
        object.__setattr__(self, "compute_capability", cc)
        object.__setattr__(self, "bf16", cc >= BF16_MIN_CC)
        if self.bf16_tflops is not None and not self.bf16:
            raise ValueError(f"{self.name}: bf16_tflops given but compute capability {cc} has no bf16 (needs 8.0+)")
        if self.interconnect not in INTERCONNECTS:
            raise ValueError(f"{self.name}: interconnect must be one of {INTERCONNECTS}, got {self.interconnect!r}")
        self._derive_memory()

    def _derive_memory(self) -> None:
        if self.memory_bytes < 0 or self.memory_gb < 0 or self.nvml_memory_mib < 0:
            raise ValueError(f"{self.name}: memory figures cannot be negative")
        basis = self.memory_basis
        if self.memory_bytes == 0:
            if self.nvml_memory_mib:
                object.__setattr__(self, "memory_bytes", self.nvml_memory_mib * MiB)
                basis = basis or "nvml"
            elif self.memory_gb:
                # Approximation: the vendor's GB read as 10^9 bytes. That is below what NVML reports
                # on every card whose figure we know (ECC and driver reservations included), so a
                # plan made with it errs on the safe side.
                object.__setattr__(self, "memory_bytes", round(self.memory_gb * GB))
                basis = basis or "approx"
            else:
                raise ValueError(f"{self.name}: give memory_bytes, nvml_memory_mib or memory_gb")
        object.__setattr__(self, "memory_basis", basis or "user")
        if self.memory_basis not in MEMORY_BASES:
            raise ValueError(f"{self.name}: memory_basis must be one of {MEMORY_BASES}, got {self.memory_basis!r}")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def memory_approximate(self) -> bool:
        return self.memory_basis == "approx"

    @property
    def bnb_4bit(self) -> bool:
        """bitsandbytes NF4/FP4 (QLoRA) and 8-bit optimizers run on this card."""
        return self.compute_capability >= BNB_MIN_CC_4BIT

    @property
    def bnb_int8(self) -> bool:
        """bitsandbytes LLM.int8() (`load_in_8bit`) runs on this card."""
        return self.compute_capability >= BNB_MIN_CC_INT8

    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes' CUDA kernels support this card at all (4-bit and 8-bit optimizers)."""
        return self.bnb_4bit

    @property
    def compute_capability_str(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def label(self) -> str:
        """"RTX 4090 (24 GB)": the name with the datasheet memory, for sentences."""
        if self.memory_gb:
            return f"{self.name} ({self.memory_gb:g} GB)"
        return f"{self.name} ({format_gib(self.memory_bytes)})"

    def with_memory(self, memory_bytes: int, basis: str, name: str = "") -> GpuSpec:
        """This card with a measured (``probed``) or user-given (``user``) memory size.

        A user-given size makes a different card: it drops the datasheet memory and the names NVML
        and users know this card by, and keeps compute capability and throughput.
        """
        if memory_bytes <= 0:
            raise ValueError(f"{self.name}: memory must be positive, got {memory_bytes} bytes")
        changes: dict[str, Any] = {"memory_bytes": memory_bytes, "memory_basis": basis, "name": name or self.name}
        if basis == "user":
            changes.update(memory_gb=0.0, nvml_memory_mib=0, aliases=(), nvml_names=())
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compute_capability"] = self.compute_capability_str
        data["nvml_names"] = list(self.nvml_names)
        data["aliases"] = list(self.aliases)
        data["bnb_4bit"] = self.bnb_4bit
        data["bnb_int8"] = self.bnb_int8
        return data
