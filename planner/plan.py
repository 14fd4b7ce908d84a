"""The Plan: everything the runtime executes, decided by the planner, nothing left to guess.

An `InferencePlan` is frozen and JSON round-trips (`to_dict` / `from_dict`), so the job store records
exactly what ran. `plan_inference` picks it: on GPUs through the same search `llmplan fit` runs (16-bit,
int8 or nf4 to fit the card; replicas when one GPU holds the model, sharding when it does not); with no
GPU, the CPU in fp32 unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .defaults import DEFAULT_GLOBAL_BATCH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN
from .estimator import estimate
from .hardware import Hardware
from .models import ModelSpec
from .request import EstimateRequest, Kernels, LoraSpec, Method, Offload, Precision, Quant, Task
from .search import FitRequest, search

DTYPE_OF_PRECISION = {Precision.BF16_TRUE: "bf16", Precision.FP16_TRUE: "fp16", Precision.FP32: "fp32"}


class PlanError(ValueError):
    """Nothing the planner can run fits; the message says what would (`field`: the field at fault, when one is)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def plan_to_dict(plan: Any) -> dict[str, Any]:
    """A plan as JSON-ready data: tuples become lists."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(plan).items()}


def plan_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The plan `plan_to_dict` wrote: the lists of tuple-typed fields become tuples again."""
    tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
    return cls(**{key: tuple(value) if key in tuples else value for key, value in data.items()})


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
        return plan_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InferencePlan":
        return plan_from_dict(cls, data)

    @property
    def gpus(self) -> int:
        return self.replicas * self.gpus_per_replica

    def summary(self) -> str:
        where = "CPU" if self.device == "cpu" else (
            f"{self.replicas} replica(s) x {self.gpus_per_replica} GPU" + ("s" if self.gpus_per_replica > 1 else ""))
        rate = f", ~{self.estimated_tokens_per_s:,.0f} tokens/s" if self.estimated_tokens_per_s else ""
        return (f"plan: {self.model_name}, {self.dtype}, quant {self.quant}, {where}, batch {self.batch_size}, "
                f"{self.estimated_device_bytes / 2**30:.1f} GiB per device{rate}")


@dataclass(frozen=True)
class InferenceAsk:
    """What the user asked for; None leaves the choice to the planner."""

    model: str
    spec: ModelSpec
    batch_size: int = 8
    prompt_len: int = DEFAULT_PROMPT_LEN
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
                          micro_batch_size=ask.batch_size, prompt_len=ask.prompt_len, max_new_tokens=ask.max_new_tokens,
                          on_cuda=False)
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
        batch_size=best.request.micro_batch_size, prompt_len=ask.prompt_len, max_new_tokens=ask.max_new_tokens,
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


# ---- fine-tuning ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetunePlan:
    """The plan-decided half of a training run (the user adds data, schedule and output)."""

    model: str
    model_name: str
    device: str  # cuda | cpu
    method: str
    precision: str
    micro_batch: int
    grad_accum: int
    workers: int  # data-parallel ranks (one per GPU)
    backend: str  # single | ddp | deepspeed | fsdp
    zero: int
    offload: str
    gradient_checkpointing: bool
    optimizer: str
    seq_len: int
    lora_r: int
    lora_targets: tuple[str, ...]
    estimated_peak_bytes: int
    estimated_device_bytes: int
    estimated_tokens_per_s: float | None
    breakdown: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    kernels: str = "none"  # liger | none: the fused training kernels the run uses
    lora_dropout: float = 0.0
    activation_offload: bool = False  # checkpointed layer inputs in CPU memory
    host_bytes: int = 0  # CPU memory the plan's offload needs on its node (all workers)

    def to_dict(self) -> dict[str, Any]:
        return plan_to_dict(self)

    def summary(self) -> str:
        where = "CPU" if self.device == "cpu" else "GPU"
        zero = f" ZeRO-{self.zero}" if self.zero else ""
        parallel = f", {self.workers} {where} workers ({self.backend}{zero})" if self.workers > 1 else f", 1 {where}"
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        rate = f", ~{self.estimated_tokens_per_s:,.0f} tokens/s" if self.estimated_tokens_per_s else ""
        kernels = ", Liger kernels" if self.kernels == "liger" else ""
        offload = ", activation offload" if self.activation_offload else ""
        host = f" + {self.host_bytes / 2**30:.1f} GiB of host memory" if self.host_bytes else ""
        return (f"plan: {self.model_name}, {self.method}, {self.precision}, micro-batch {self.micro_batch} x "
                f"{self.grad_accum}{parallel}{checkpointing}{offload}{kernels}, {self.estimated_device_bytes / 2**30:.1f} GiB "
                f"per device{host}{rate}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetunePlan":
        return plan_from_dict(cls, data)


@dataclass(frozen=True)
class FinetuneAsk:
    """What the user asked for; None leaves the choice to the planner (the user's choices are checked)."""

    model: str
    spec: ModelSpec
    methods: tuple[Method, ...] = (Method.LORA, Method.QLORA, Method.FULL)
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_GLOBAL_BATCH  # global: sequences per optimizer step
    lora: LoraSpec = field(default_factory=LoraSpec)
    precision: Precision | None = None
    micro_batch: int | None = None
    gradient_checkpointing: bool | None = None
    zero: int | None = None
    offload: Offload | None = None
    workers: int = 1  # only for the CPU, where no planner decides
    margin: float = 0.10
    deepspeed: bool = False
    kernels: Kernels = Kernels.LIGER  # used where the GPU run supports them (EstimateRequest.fused_kernels)
    lora_dropout: float = 0.0
    activation_offload: bool | None = None  # None: the planner adds it where nothing fits without it


def plan_finetune(ask: FinetuneAsk, hardware: Hardware | None) -> FinetunePlan:
    """On GPUs, the best configuration `llmplan fit` finds that honours the user's choices; else the CPU."""
    if hardware is None:
        return _cpu_finetune(ask)
    fit = FitRequest(model=ask.spec, hardware=hardware, task=Task.FINETUNE, methods=ask.methods, seq_len=ask.seq_len,
                     batch_size=ask.batch_size, lora=ask.lora, margin=ask.margin, deepspeed=ask.deepspeed,
                     micro_batch=ask.micro_batch, kernels=ask.kernels, lora_dropout=ask.lora_dropout,
                     activation_offload=ask.activation_offload)
    per_gpu = ask.batch_size // hardware.count
    if ask.micro_batch and (ask.batch_size % hardware.count or per_gpu % ask.micro_batch):
        raise PlanError(f"--batch-size {ask.batch_size} over {hardware.count} GPU(s) is not a multiple of "
                        f"--micro-batch {ask.micro_batch}", "batch_size")
    result = search(fit)
    wanted = [c for c in result.candidates if _honours(c, ask)]
    if not wanted:
        asked = _asked(ask)
        hint = "; ".join(s.text for s in result.suggestions[:2]) or "; ".join(result.reasons[:1])
        host = [reason for reason in result.reasons if "of host memory" in reason]
        if host:
            hint = f"{host[0]}; what would fit: {hint}"
        raise PlanError(f"{ask.spec.name} fine-tuning ({ask.batch_size} x {ask.seq_len} tokens{asked}) does not fit "
                        f"{hardware.count} x {hardware.gpu.name}: {hint or 'use more or larger GPUs'}")
    best = wanted[0]
    req, strategy = best.request, best.strategy
    return FinetunePlan(
        model=ask.model, model_name=ask.spec.name, device="cuda", method=req.method.value, precision=req.precision.value,
        micro_batch=req.micro_batch_size, grad_accum=best.grad_accum, workers=strategy.gpus, backend=strategy.backend.value,
        zero=strategy.zero, offload=strategy.offload.value, gradient_checkpointing=req.gradient_checkpointing,
        optimizer=req.optimizer.value, seq_len=ask.seq_len, lora_r=req.lora.r, lora_targets=req.lora.targets,
        estimated_peak_bytes=best.memory.peak_bytes, estimated_device_bytes=best.memory.device_bytes,
        estimated_tokens_per_s=best.tokens_per_s if best.throughput.known else None,
        breakdown=best.memory.breakdown(), notes=(*hardware.notes, best.describe()),
        kernels=Kernels.LIGER.value if req.fused_kernels else Kernels.NONE.value, lora_dropout=ask.lora_dropout,
        activation_offload=req.activation_offload, host_bytes=best.host_bytes,
    )


def _honours(candidate: Any, ask: FinetuneAsk) -> bool:
    req, strategy = candidate.request, candidate.strategy
    checks = (
        (ask.precision, req.precision), (ask.micro_batch, req.micro_batch_size),
        (ask.gradient_checkpointing, req.gradient_checkpointing), (ask.zero, strategy.zero),
        (ask.offload, strategy.offload), (ask.activation_offload, req.activation_offload),
    )
    return all(wanted is None or wanted == actual for wanted, actual in checks)


def _asked(ask: FinetuneAsk) -> str:
    choices = {"precision": ask.precision and ask.precision.value, "micro-batch": ask.micro_batch,
               "gradient checkpointing": ask.gradient_checkpointing, "zero": ask.zero,
               "offload": ask.offload and ask.offload.value, "activation offload": ask.activation_offload}
    given = [f"{name} {value}" for name, value in choices.items() if value is not None]
    return f", {', '.join(given)}" if given else ""


def _cpu_finetune(ask: FinetuneAsk) -> FinetunePlan:
    """No GPU: fp32 on the CPU (bf16 matmuls are slow on most CPUs), data parallel over `workers` processes."""
    method = ask.methods[0]
    precision = ask.precision or Precision.FP32
    per_worker = max(ask.batch_size // ask.workers, 1)
    micro = ask.micro_batch or min(per_worker, 4)
    if per_worker % micro:
        raise PlanError(f"--batch-size {ask.batch_size} over {ask.workers} worker(s) is not a multiple of "
                        f"--micro-batch {micro}", "batch_size")
    req = EstimateRequest(model=ask.spec, task=Task.FINETUNE, method=method, precision=precision, micro_batch_size=micro,
                          seq_len=ask.seq_len, lora=ask.lora, gradient_checkpointing=bool(ask.gradient_checkpointing),
                          lora_dropout=ask.lora_dropout)
    memory = estimate(req)
    backend = "deepspeed" if ask.zero else ("ddp" if ask.workers > 1 else "single")
    return FinetunePlan(
        model=ask.model, model_name=ask.spec.name, device="cpu", method=method.value, precision=precision.value,
        micro_batch=micro, grad_accum=per_worker // micro, workers=ask.workers, backend=backend, zero=ask.zero or 0,
        offload=(ask.offload or Offload.NONE).value, gradient_checkpointing=bool(ask.gradient_checkpointing),
        optimizer="adamw", seq_len=ask.seq_len, lora_r=ask.lora.r, lora_targets=ask.lora.targets,
        estimated_peak_bytes=memory.peak_bytes, estimated_device_bytes=memory.peak_bytes, estimated_tokens_per_s=None,
        breakdown=memory.breakdown(), notes=("no GPU: training on the CPU",), lora_dropout=ask.lora_dropout,
    )
