"""The Plan: everything the runtime executes, decided by the planner, nothing left to guess.

An `InferencePlan` is frozen and JSON round-trips (`to_dict` / `from_dict`), so the job store records
exactly what ran. `plan_inference` picks it: on GPUs through the same search `llmplan fit` runs (16-bit,
int8 or nf4 to fit the card; replicas when one GPU holds the model, sharding when it does not); with no
GPU, the CPU in fp32 unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .estimator import estimate
from .hardware import Hardware
from .models import ModelSpec
from .request import EstimateRequest, Precision, Quant, Task
from .search import FitRequest, search

DTYPE_OF_PRECISION = {Precision.BF16_TRUE: "bf16", Precision.FP16_TRUE: "fp16", Precision.FP32: "fp32"}


class PlanError(ValueError):
    """Nothing the planner can run fits; the message says what would."""


@dataclass(frozen=True)
class InferencePlan:
    model: str  # what the runtime loads: a directory or a runnable catalog name, as the user gave it
    model_name: str  # the architecture the estimate used
    device: str  # cuda | cpu
    dtype: str  # bf16 | fp16 | fp32
    quant: str  # none | int8 | nf4
    replicas: int  # copies of the model, each serving a share of the prompts
    gpus_per_replica: int  # 0 on the CPU; > 1 shards one copy over several GPUs
    batch_size: int  # prompts generated together by one replica
    prompt_len: int
    max_new_tokens: int
    estimated_peak_bytes: int  # per GPU (or host memory on the CPU)
    estimated_device_bytes: int
    estimated_tokens_per_s: float | None
    breakdown: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InferencePlan":
        return cls(**{**data, "notes": tuple(data.get("notes", ()))})

    @property
    def gpus(self) -> int:
        return self.replicas * self.gpus_per_replica


@dataclass(frozen=True)
class InferenceAsk:
    """What the user asked for; None leaves the choice to the planner."""

    model: str
    spec: ModelSpec
    batch_size: int = 8
    prompt_len: int = 512
    max_new_tokens: int = 256
    precision: Precision | None = None
    quant: Quant | None = None
    margin: float = 0.10


def plan_inference(ask: InferenceAsk, hardware: Hardware | None) -> InferencePlan:
    """On GPUs, the best configuration `llmplan fit --task infer` finds; without, the CPU."""
    if hardware is None:
        return _cpu_plan(ask)
    return _gpu_plan(ask, hardware)


def _cpu_plan(ask: InferenceAsk) -> InferencePlan:
    precision = ask.precision or Precision.FP32
    quant = ask.quant or Quant.NONE
    req = EstimateRequest(model=ask.spec, task=Task.INFER, precision=precision, quant=quant,
                          batch_size=ask.batch_size, prompt_len=ask.prompt_len, max_new_tokens=ask.max_new_tokens)
    memory = estimate(req)
    return InferencePlan(
        model=ask.model, model_name=ask.spec.name, device="cpu", dtype=DTYPE_OF_PRECISION[precision],
        quant=quant.value, replicas=1, gpus_per_replica=0, batch_size=ask.batch_size, prompt_len=ask.prompt_len,
        max_new_tokens=ask.max_new_tokens, estimated_peak_bytes=memory.peak_bytes,
        estimated_device_bytes=memory.peak_bytes, estimated_tokens_per_s=None, breakdown=memory.breakdown(),
        notes=("no GPU: running on the CPU",),
    )


def _gpu_plan(ask: InferenceAsk, hardware: Hardware) -> InferencePlan:
    fit = FitRequest(model=ask.spec, hardware=hardware, task=Task.INFER, batch_size=ask.batch_size * hardware.count,
                     prompt_len=ask.prompt_len, max_new_tokens=ask.max_new_tokens, margin=ask.margin)
    result = search(fit)
    wanted = [c for c in result.candidates
              if (ask.precision is None or c.request.precision is ask.precision)
              and (ask.quant is None or c.quant is ask.quant)]
    if not wanted:
        raise PlanError(_infeasible_message(ask, hardware, result))
    best = wanted[0]
    strategy = best.strategy
    return InferencePlan(
        model=ask.model, model_name=ask.spec.name, device="cuda", dtype=DTYPE_OF_PRECISION[best.request.precision],
        quant=best.quant.value, replicas=strategy.replicas, gpus_per_replica=strategy.shard,
        batch_size=best.request.batch_size, prompt_len=ask.prompt_len, max_new_tokens=ask.max_new_tokens,
        estimated_peak_bytes=best.memory.peak_bytes, estimated_device_bytes=best.memory.device_bytes,
        estimated_tokens_per_s=best.throughput.tokens_per_s, breakdown=best.memory.breakdown(),
        notes=(*hardware.notes, f"{strategy.label} on {hardware.count} x {hardware.gpu.name}"),
    )


def _infeasible_message(ask: InferenceAsk, hardware: Hardware, result: Any) -> str:
    asked = ", ".join(f"{name} {value.value}" for name, value in (("precision", ask.precision), ("quant", ask.quant))
                      if value is not None)
    what = f" with {asked}" if asked else ""
    hint = "; ".join(s.text for s in result.suggestions[:2]) or "; ".join(result.reasons[:1])
    if result.candidates and asked:
        hint = f"drop {asked.split(' ')[0]} and let the planner choose"
    return (f"{ask.spec.name} inference (batch {ask.batch_size}, {ask.prompt_len}+{ask.max_new_tokens} tokens){what} "
            f"does not fit {hardware.count} x {hardware.gpu.name}: {hint or 'use more or larger GPUs'}")
