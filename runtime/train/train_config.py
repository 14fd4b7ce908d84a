"""What a fine-tuning run executes: one frozen, JSON-serialisable config, filled from the plan.

The planner decides method, precision, micro-batch, accumulation, checkpointing, optimizer and
parallelism (`llmplan fit`); the user adds data, schedule and output. The recipe (`runtime/train/train.py`)
never re-derives any of these on its own. No torch import here: the CLI and the store read it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmplan.planner.defaults import ALL_LINEAR, DEFAULT_LORA_R, DEFAULT_SEQ_LEN, lora_alpha
from llmplan.planner.request import Kernels, Method, Offload, Optimizer, Precision, values_of
from llmplan.planner.search import Backend

METHODS = values_of(Method)
PRECISIONS = values_of(Precision)
OPTIMIZERS = values_of(Optimizer)
BACKENDS = tuple(backend.value for backend in Backend if backend is not Backend.FSDP)  # the runtime has no FSDP
OFFLOADS = values_of(Offload)
KERNELS = values_of(Kernels)
COMPILE_MODES = ("layers", "none")  # regional compilation of the decoder layers (train.compile_that_runs)
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
TEMPLATES = ("auto", "alpaca", "chat")
# The fields a FinetunePlan decides (`TrainConfig.from_plan`); lora_alpha follows lora_r.
PLANNED = ("method", "precision", "micro_batch", "grad_accum", "seq_len", "gradient_checkpointing", "optimizer",
           "lora_r", "lora_targets", "kernels", "lora_dropout", "activation_offload", "device", "workers", "backend",
           "zero", "offload")
# Where a run keeps its checkpoints: <output_dir>/checkpoints/step-N/trainer_state.pt (train.py writes them;
# the scheduler looks for them without importing torch).
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


class TrainConfigError(ValueError):
    """A configuration that cannot run as written; the message says what to change, `field` which field is
    at fault when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _option(field_name: str) -> str:
    return f"--{field_name.replace('_', '-')}"


@dataclass(frozen=True)
class DataConfig:
    path: str
    format: str = "auto"  # detected from the first record when auto
    template: str = "auto"  # alpaca for instruction data, the tokenizer's chat template for conversations
    packing: bool = False  # concatenate short examples into full sequences
    val_fraction: float = 0.05  # held out for a validation loss
    response_only: bool = True  # loss on the response tokens only


@dataclass(frozen=True)
class TrainConfig:
    model: str  # a local Hugging Face directory (the runtime resolves catalog names and Meta checkpoints first)
    data: DataConfig
    output_dir: str
    method: str = "lora"
    precision: str = "bf16-true"
    micro_batch: int = 1
    grad_accum: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0: no clipping
    warmup_steps: int = 10
    max_steps: int | None = None  # optimizer steps; None: run `epochs`
    epochs: float = 1.0
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: int = lora_alpha(DEFAULT_LORA_R)
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    kernels: str | None = None  # liger | none; None: Liger on CUDA where supported, none on CPU
    activation_offload: bool = False  # checkpointed layer inputs in CPU memory (needs gradient_checkpointing)
    compile: str | None = None  # layers | none; None: the recipe decides (train.compile_that_runs)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 50  # optimizer steps between checkpoints
    resume: bool = False  # continue from the latest checkpoint in output_dir
    device: str = "cuda"  # cuda | cpu
    workers: int = 1  # data-parallel processes (Ray Train workers)
    backend: str = "single"  # single | ddp | deepspeed
    zero: int = 0  # DeepSpeed ZeRO stage
    offload: str = "none"  # none | optimizer | params (DeepSpeed)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"method": METHODS, "precision": PRECISIONS, "optimizer": OPTIMIZERS, "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("micro_batch", "grad_accum", "seq_len", "workers", "lora_r", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise TrainConfigError(f"max_steps must be positive, got {self.max_steps}")
        if self.backend == "single" and self.workers > 1:
            raise TrainConfigError("several workers need backend ddp or deepspeed")
        if self.backend == "deepspeed" and self.zero not in (1, 2, 3):
            raise TrainConfigError("backend deepspeed needs zero 1, 2 or 3")
        if self.kernels is not None and self.kernels not in KERNELS:
            raise TrainConfigError(f"kernels must be liger or none, got {self.kernels!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise TrainConfigError(f"compile must be layers or none, got {self.compile!r}", "compile")
        if self.activation_offload and not self.gradient_checkpointing:
            raise TrainConfigError("activation_offload moves the checkpointed layer inputs to CPU memory: it needs "
                                   "gradient_checkpointing")
        if self.offload not in OFFLOADS:
            raise TrainConfigError(f"offload must be one of {', '.join(OFFLOADS)}, got {self.offload!r}")
        if self.offload != "none" and self.backend != "deepspeed":
            raise TrainConfigError(f"offload {self.offload} needs backend deepspeed (with zero 1, 2 or 3 for the "
                                   "optimizer, zero 3 for the parameters)")
        if self.offload == "params" and self.zero != 3:
            raise TrainConfigError("offload params needs zero 3: DeepSpeed offloads parameters only with ZeRO-3")
        if self.method == "full" and self.precision == "fp16-true":
            raise TrainConfigError("full fine-tuning in fp16-true keeps no fp32 master weights and loses small "
                                   "updates: use fp16-mixed (or bf16 where the card has it)")
        if self.backend == "deepspeed" and self.optimizer != "adamw":
            raise TrainConfigError(f"DeepSpeed runs llmplan's torch AdamW on its ZeRO partitions (which already shard "
                                   f"the optimizer states); {self.optimizer} is not supported there: use adamw")
        if self.backend == "deepspeed" and self.zero == 3 and self.method == "qlora":
            raise TrainConfigError("ZeRO-3 would partition QLoRA's 4-bit weights, which bitsandbytes cannot compute "
                                   "with: use zero 2 (or backend ddp)")
        self._check_numbers()
        if self.data.format not in DATA_FORMATS or self.data.template not in TEMPLATES:
            raise TrainConfigError(f"data format must be one of {DATA_FORMATS} and template one of {TEMPLATES}")

    def _check_numbers(self) -> None:
        """Finite, in range; named as the options that set them (`--lr`), since they mirror these fields."""
        for name in ("lr", "epochs", "weight_decay", "max_grad_norm", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainConfigError(f"{_option(name)} must be a finite number, got {value!r}", name)
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{_option(name)} must be positive, got {getattr(self, name)}", name)
        for name in ("warmup_steps", "eval_every", "max_grad_norm", "weight_decay", "lora_dropout"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{_option(name)} must be 0 or more, got {getattr(self, name)}", name)
        fraction = self.data.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise TrainConfigError(f"--val-fraction must be at least 0 and below 1, got {fraction!r}", "val_fraction")

    @classmethod
    def from_plan(cls, plan: Any, *, data: DataConfig, output_dir: str, **run: Any) -> "TrainConfig":
        """The config a `FinetunePlan` fixes (every field in PLANNED), with the user's data, output and `run`
        settings (schedule, seed, ...): what a submission records and what an OOM re-plan records again."""
        planned = {name: getattr(plan, name) for name in PLANNED}
        return cls(model=plan.model, data=data, output_dir=output_dir, lora_alpha=lora_alpha(plan.lora_r),
                   **planned, **run)

    def run_settings(self) -> dict[str, Any]:
        """The fields the user sets, not the plan (all but the model, data, output and PLANNED ones)."""
        fixed = {"model", "data", "output_dir", "lora_alpha", *PLANNED}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in fixed}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.workers

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown keys: {', '.join(unknown)}")
        values = dict(data)
        values["data"] = DataConfig(**values["data"]) if isinstance(values.get("data"), dict) else values["data"]
        values["lora_targets"] = tuple(values.get("lora_targets", (ALL_LINEAR,)))
        return cls(**values)
