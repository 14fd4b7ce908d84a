"""`llmplan fit`'s search: which configurations fit the GPUs, ranked by estimated throughput.

The SkyPilot optimizer's shape: estimation lives elsewhere (`estimator.estimate` for memory,
`throughput` for speed); this module enumerates candidates, filters them by memory, ranks them, and
when nothing fits says what would. Pure functions, no printing, no I/O.

Enumeration (fine-tuning): method x quantization x precision x parallelism x gradient checkpointing, and
for each of those "families" the largest micro-batch that fits (memory grows with the micro-batch, so a
binary search over the divisors of the per-GPU batch finds it); gradient accumulation makes up the rest
of the global batch. Precision: bf16 where the card has it, else fp16; fp32 as well where the card
computes 16-bit slower than fp32 (Pascal: a P40 runs fp16 at 1/64 of its fp32 rate). Parallelism: one
GPU; DDP; DeepSpeed ZeRO-2/3 and CPU offload where DeepSpeed can run, else FSDP (estimated as the ZeRO
stage it equals). Inference: quantization x precision x (replicas x sharding) x batch. Where the slots engine
runs (`EstimateRequest.slots_engine`), the batch is its slots: of the slot counts that fit (up to --batch-size,
or SLOTS_MAX_BATCH and the prompts per copy when the user gave no --batch-size), the one the throughput model
gives the most tokens/s (prompts run in waves of the slots, so with a known prompt count fewer slots can finish
as soon: 257 prompts take two waves on 256 slots or on 129, and 129 slots step faster).

Ranking: fine-tuning by training tokens/s. Inference by weights first (unquantized, then int8, then nf4:
quantization changes the model's outputs, so it is recommended only where 16-bit weights do not fit;
a precision the card computes slowly ranks last), then by generated tokens/s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum

from .defaults import DEFAULT_GLOBAL_BATCH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN
from .estimator import MemoryEstimate, estimate
from .gpus import GpuSpec
from .hardware import Hardware
from .models import ModelSpec
from .request import (
    EstimateRequest,
    Kernels,
    LoraSpec,
    Method,
    Offload,
    Parallelism,
    Precision,
    Quant,
    RequestError,
    Task,
    liger_runs_on,
)
from .throughput import Throughput, finetune_throughput, generation_throughput
from .units import GiB, format_gib

ALL_METHODS = (Method.FULL, Method.LORA, Method.QLORA)
MORE_GPUS = (2, 4, 8, 16, 32, 64)
SHORTEST_SEQUENCE = 128
# A more complex parallelism must be this much faster than a simpler one to be listed.
DOMINANCE_TOLERANCE = 0.02
# The most slots `fit --task infer` tries on the slots engine when --batch-size is not given: the largest the
# engine was measured at (benchmarks/results/engine-h200.jsonl: 11,533-13,494 tokens/s at 256 on the H200).
SLOTS_MAX_BATCH = 256
# A precision is "slow" on a card when its matmuls run below this share of the card's fp32 rate.
SLOW_PRECISION_SHARE = 1.0


class FitError(ValueError):
    """A fit request that cannot be searched as asked; the message says what to change."""


class Backend(str, Enum):
    SINGLE = "single"
    DDP = "ddp"
    DEEPSPEED = "deepspeed"
    FSDP = "fsdp"
    REPLICAS = "replicas"  # inference: copies of the model, each on its own GPU(s)


@dataclass(frozen=True)
class Strategy:
    """How a configuration uses the GPUs.

    Fine-tuning is data parallel over all `gpus`; `zero`/`offload` are DeepSpeed's (or, for FSDP, the ZeRO
    stage its sharding equals: SHARD_GRAD_OP = 2, FULL_SHARD = 3; its CPU offload moves parameters).
    Inference runs `replicas` copies, each sharded over `shard` GPUs (HF device_map).
    """

    backend: Backend
    gpus: int = 1
    zero: int = 0
    offload: Offload = Offload.NONE
    shard: int = 1

    @property
    def parallel(self) -> Parallelism:
        """What the estimator sees: per-GPU memory of one data-parallel rank or one model copy."""
        if self.backend is Backend.REPLICAS:
            return Parallelism(gpus=self.shard)
        return Parallelism(gpus=self.gpus, zero=self.zero, offload=self.offload)

    @property
    def replicas(self) -> int:
        return self.gpus // self.shard if self.backend is Backend.REPLICAS else 1

    @property
    def uses_deepspeed(self) -> bool:
        return self.backend is Backend.DEEPSPEED

    @property
    def fsdp_mode(self) -> str:
        return "full-shard" if self.zero == 3 else "shard-grad-op"

    @property
    def label(self) -> str:
        offload = f" + offload {self.offload.value}" if self.offload is not Offload.NONE else ""
        if self.backend is Backend.SINGLE:
            return "1 GPU"
        if self.backend is Backend.DDP:
            return f"DDP x{self.gpus}"
        if self.backend is Backend.DEEPSPEED:
            where = f" x{self.gpus}" if self.gpus > 1 else ""
            return f"ZeRO-{self.zero}{where}{offload}"
        if self.backend is Backend.FSDP:
            cpu = " + CPU offload" if self.offload is not Offload.NONE else ""
            return f"FSDP {self.fsdp_mode} x{self.gpus}{cpu}"
        if self.replicas == 1:
            return f"sharded over {self.shard}" if self.shard > 1 else "1 GPU"
        copies = f"{self.replicas} replicas"
        return f"{copies}, each sharded over {self.shard}" if self.shard > 1 else copies

    def to_dict(self) -> dict:
        return {"backend": self.backend.value, "gpus": self.gpus, "zero": self.zero, "offload": self.offload.value,
                "shard": self.shard, "replicas": self.replicas, "label": self.label}


@dataclass(frozen=True)
class FitRequest:
    """What `llmplan fit` searches for. `batch_size` is global: sequences per optimizer step (fine-tuning)
    or sequences generated at once (inference). `tokens` is per epoch (None: no time estimate)."""

    model: ModelSpec
    hardware: Hardware
    task: Task = Task.FINETUNE
    methods: tuple[Method, ...] = ALL_METHODS
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_GLOBAL_BATCH
    prompt_len: int = DEFAULT_PROMPT_LEN
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    lora: LoraSpec = field(default_factory=LoraSpec)
    tokens: int | None = None
    epochs: float = 1.0
    margin: float = 0.10
    deepspeed: bool = False
    micro_batch: int | None = None  # fine-tuning: only this micro-batch (the user's, or a re-plan's)
    kernels: Kernels = Kernels.NONE  # the CLI passes liger, what the runtime uses on CUDA
    lora_dropout: float = 0.0
    # Checkpointed layer inputs in CPU memory: None lets the search add it only where nothing fits without it,
    # True plans only with it, False never.
    activation_offload: bool | None = None
    prompts: int | None = None  # inference: prompts to complete (None: not known; one batch per copy)
    max_slots: int | None = None  # inference on the slots engine: the most slots per copy (None: --batch-size)

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise FitError(f"--margin must be at least 0 and below 1, got {self.margin:g}")
        sizes = {"--seq-len": self.seq_len, "--batch-size": self.batch_size, "--prompt-len": self.prompt_len,
                 "--max-new-tokens": self.max_new_tokens}
        for option, value in sizes.items():
            if value <= 0:
                raise FitError(f"{option} must be positive, got {value}")
        if self.epochs <= 0:
            raise FitError(f"--epochs must be positive, got {self.epochs:g}")
        if self.tokens is not None and self.tokens <= 0:
            raise FitError(f"--tokens must be positive, got {self.tokens}")
        if self.prompts is not None and self.prompts <= 0:
            raise FitError(f"--prompts must be positive, got {self.prompts}")
        if self.max_slots is not None and self.max_slots <= 0:
            raise FitError(f"the slots cap must be positive, got {self.max_slots}")
        if not self.methods:
            raise FitError("no fine-tuning method to search")
        if self.task is Task.FINETUNE and set(self.methods) - {Method.FULL}:
            try:
                self.lora.target_shapes(self.model)
            except RequestError as error:
                raise FitError(str(error)) from error
        gpus = self.hardware.count
        if self.task is Task.FINETUNE and self.batch_size % gpus:
            up = math.ceil(self.batch_size / gpus) * gpus
            raise FitError(f"--batch-size {self.batch_size} (global) does not split over {gpus} GPUs: "
                           f"use a multiple of {gpus}, e.g. {up}")

    @property
    def gpu(self) -> GpuSpec:
        return self.hardware.gpu

    @property
    def budget_bytes(self) -> int:
        """Per-GPU memory a plan may use: the free (or catalog) memory less the margin."""
        return int(self.hardware.memory_bytes * (1 - self.margin))

    @property
    def total_tokens(self) -> float | None:
        return None if self.tokens is None else self.tokens * self.epochs

    @property
    def host_memory_bytes(self) -> int | None:
        """The node's CPU memory offloading plans may fill; None: not known, not checked."""
        return self.hardware.host_memory_bytes

    def holds(self, memory: MemoryEstimate) -> bool:
        """The configuration fits each GPU, and what it offloads fits the node's CPU memory."""
        host = self.host_memory_bytes
        return memory.device_bytes <= self.budget_bytes and (host is None or node_host_bytes(memory) <= host)


def node_host_bytes(memory: MemoryEstimate) -> int:
    """CPU memory a plan's ranks need together on their node (every rank of a plan runs on one node)."""
    return memory.host_bytes * memory.request.parallel.gpus


@dataclass(frozen=True)
class Candidate:
    """One configuration, its per-GPU memory and its throughput."""

    request: EstimateRequest
    strategy: Strategy
    grad_accum: int
    memory: MemoryEstimate
    throughput: Throughput
    budget_bytes: int
    host_budget_bytes: int | None = None  # the node's CPU memory; None: not checked

    @property
    def memory_bytes(self) -> int:
        return self.memory.device_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.memory_bytes

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.budget_bytes and self.fits_host

    @property
    def fits_host(self) -> bool:
        return self.host_budget_bytes is None or self.host_bytes <= self.host_budget_bytes

    @property
    def method(self) -> Method | None:
        return self.request.method if self.request.task is Task.FINETUNE else None

    @property
    def quant(self) -> Quant:
        return self.request.effective_quant

    @property
    def precision(self) -> Precision:
        return self.request.precision

    @property
    def micro_batch(self) -> int:
        return self.request.micro_batch_size

    @property
    def checkpointing(self) -> bool:
        return self.request.gradient_checkpointing

    @property
    def tokens_per_s(self) -> float:
        return self.throughput.tokens_per_s

    @property
    def host_bytes(self) -> int:
        """CPU memory the plan's offload needs, all ranks together (the estimator's host terms: DeepSpeed's
        optimizer states and parameters, checkpointed layer inputs)."""
        return node_host_bytes(self.memory)

    @property
    def activation_offload(self) -> bool:
        return self.request.activation_offload

    @property
    def offload_label(self) -> str:
        """What the plan offloads, for sentences: "ZeRO-3 offload (params)", "activation offload" or both."""
        parts = []
        if self.strategy.offload is not Offload.NONE:
            parts.append(f"ZeRO-{self.strategy.zero} offload ({self.strategy.offload.value})")
        if self.activation_offload:
            parts.append("activation offload")
        return " and ".join(parts)

    def seconds_for(self, tokens: float | None) -> float | None:
        return None if tokens is None or not self.throughput.known else self.throughput.seconds_for(tokens)

    def describe(self) -> str:
        """"lora, bf16-true, 1 GPU, micro-batch 4 x 4, gradient checkpointing" or "bf16-true, nf4 weights,
        2 replicas, batch 8" (one line for sentences)."""
        if self.request.task is Task.INFER:
            weights = [f"{self.quant.value} weights"] if self.quant is not Quant.NONE else []
            return ", ".join([self.precision.value, *weights, self.strategy.label, f"batch {self.micro_batch}"])
        parts = [self.method.value, self.precision.value, self.strategy.label]
        if self.request.task is Task.FINETUNE:
            parts.append(f"micro-batch {self.micro_batch} x {self.grad_accum}")
            if self.checkpointing:
                parts.append("gradient checkpointing")
            if self.activation_offload:
                parts.append("activation offload")
        return ", ".join(parts)

    def to_dict(self, total_tokens: float | None = None) -> dict:
        req = self.request
        data = {
            "method": self.method.value if self.method else None,
            "quant": self.quant.value,
            "precision": self.precision.value,
            "parallelism": self.strategy.to_dict(),
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "gradient_checkpointing": self.checkpointing,
            "activation_offload": self.activation_offload,
            "seq_len": req.seq_len if req.task is Task.FINETUNE else None,
            "prompt_len": req.prompt_len if req.task is Task.INFER else None,
            "max_new_tokens": req.max_new_tokens if req.task is Task.INFER else None,
            "memory_bytes": self.memory_bytes,
            "budget_bytes": self.budget_bytes,
            "headroom_bytes": self.headroom_bytes,
            "host_bytes": self.host_bytes,
            "peak_phase": self.memory.peak_phase,
            "breakdown": [term.to_dict() for term in self.memory.terms],
            "cuda_context_bytes": self.memory.cuda_context_bytes,
            "throughput": self.throughput.to_dict(),
            "tokens_per_s": self.tokens_per_s if self.throughput.known else None,
            "time_s": self.seconds_for(total_tokens),
        }
        return data


@dataclass(frozen=True)
class Suggestion:
    """A change that makes something fit, and the best configuration it gives."""

    change: str  # gpus | seq_len | prompt_len | method | deepspeed | memory
    text: str
    candidate: Candidate | None = None

    def to_dict(self) -> dict:
        return {"change": self.change, "text": self.text,
                "candidate": self.candidate.describe() if self.candidate else None}


@dataclass(frozen=True)
class FitResult:
    request: FitRequest
    candidates: tuple[Candidate, ...]  # the feasible ones, best first
    nearest: Candidate | None = None  # nothing fits: the configuration closest to fitting
    reasons: tuple[str, ...] = ()  # nothing fits: why
    suggestions: tuple[Suggestion, ...] = ()
    warnings: tuple[str, ...] = ()
    considered: int = 0  # memory estimates made

    @property
    def feasible(self) -> bool:
        return bool(self.candidates)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


# ---- enumeration ---------------------------------------------------------------------------------------
def slow_precisions(gpu: GpuSpec) -> frozenset[Precision]:
    """Precisions whose matmuls run slower than fp32 on this card (fp16 on a P40: 0.18 vs 11.8 TFLOP/s)."""
    if not (gpu.fp32_tflops and gpu.fp16_tflops) or gpu.fp16_tflops >= SLOW_PRECISION_SHARE * gpu.fp32_tflops:
        return frozenset()
    return frozenset({Precision.FP16_TRUE, Precision.FP16_MIXED})


def precisions_for(gpu: GpuSpec, method: Method | None) -> tuple[Precision, ...]:
    """bf16 where the card has it, else fp16; plus fp32 where 16-bit compute is slow on the card.
    Full fine-tuning gets mixed precision (fp32 masters) too; pure fp16 training without masters is
    left out (updates underflow)."""
    full = method is Method.FULL
    if gpu.bf16:
        found = (Precision.BF16_TRUE, Precision.BF16_MIXED) if full else (Precision.BF16_TRUE,)
    else:
        found = (Precision.FP16_MIXED,) if full else (Precision.FP16_TRUE,)
    if slow_precisions(gpu) & set(found):
        found = (*found, Precision.FP32)
    return found


def finetune_quants(gpu: GpuSpec, method: Method) -> tuple[Quant, ...]:
    """QLoRA needs bitsandbytes' 4-bit kernels on the card; full and LoRA train a 16/32-bit base."""
    if method is Method.QLORA:
        return (Quant.NF4,) if gpu.bnb_4bit else ()
    return (Quant.NONE,)


def finetune_strategies(gpus: int, deepspeed: bool) -> tuple[Strategy, ...]:
    if gpus == 1:
        single = (Strategy(Backend.SINGLE),)
        if not deepspeed:
            return single
        return (*single, Strategy(Backend.DEEPSPEED, 1, 2, Offload.OPTIMIZER), Strategy(Backend.DEEPSPEED, 1, 3, Offload.PARAMS))
    ddp = (Strategy(Backend.DDP, gpus),)
    if deepspeed:
        return (*ddp, *(Strategy(Backend.DEEPSPEED, gpus, zero, offload) for zero, offload in (
            (2, Offload.NONE), (3, Offload.NONE), (2, Offload.OPTIMIZER), (3, Offload.OPTIMIZER), (3, Offload.PARAMS))))
    return (*ddp, Strategy(Backend.FSDP, gpus, 2), Strategy(Backend.FSDP, gpus, 3), Strategy(Backend.FSDP, gpus, 3, Offload.PARAMS))


def inference_strategies(gpus: int) -> tuple[Strategy, ...]:
    """Every split of the GPUs into replicas x shard (1 x 1 on one GPU)."""
    if gpus == 1:
        return (Strategy(Backend.SINGLE),)
    return tuple(Strategy(Backend.REPLICAS, gpus, shard=shard) for shard in divisors(gpus))


def inference_quants(gpu: GpuSpec) -> tuple[Quant, ...]:
    quants = [Quant.NONE]
    if gpu.bnb_int8:
        quants.append(Quant.INT8)
    if gpu.bnb_4bit:
        quants.append(Quant.NF4)
    return tuple(quants)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class _Family:
    """Every setting but the batch: the search finds the largest batch that fits."""

    method: Method
    quant: Quant
    precision: Precision
    strategy: Strategy
    checkpointing: bool
    activation_offload: bool = False


def _finetune_families(fit: FitRequest, activation_offload: bool = False) -> Iterator[_Family]:
    """Every fine-tuning family; with `activation_offload`, those with checkpointing, their inputs offloaded."""
    for method in fit.methods:
        for quant in finetune_quants(fit.gpu, method):
            for precision in precisions_for(fit.gpu, method):
                for strategy in finetune_strategies(fit.hardware.count, fit.deepspeed):
                    if method is Method.QLORA and strategy.zero == 3:
                        continue  # ZeRO-3 would partition the 4-bit weights, which bitsandbytes cannot compute
                    for checkpointing in ((True,) if activation_offload else (False, True)):
                        yield _Family(method, quant, precision, strategy, checkpointing, activation_offload)


def _inference_families(fit: FitRequest) -> Iterator[_Family]:
    for quant in inference_quants(fit.gpu):
        for precision in precisions_for(fit.gpu, None):
            for strategy in inference_strategies(fit.hardware.count):
                yield _Family(Method.LORA, quant, precision, strategy, False)


def _request(fit: FitRequest, family: _Family, batch: int) -> EstimateRequest:
    return EstimateRequest(
        model=fit.model,
        task=fit.task,
        method=family.method,
        precision=family.precision,
        quant=family.quant,
        micro_batch_size=batch,
        seq_len=fit.seq_len,
        prompt_len=fit.prompt_len,
        max_new_tokens=fit.max_new_tokens,
        lora=fit.lora,
        gradient_checkpointing=family.checkpointing,
        parallel=family.strategy.parallel,
        kernels=fit.kernels if fit.gpu is None or liger_runs_on(fit.gpu.compute_capability) else Kernels.NONE,
        lora_dropout=fit.lora_dropout,
        activation_offload=family.activation_offload,
    )


class _Counter:
    """Memory estimates made (for `FitResult.considered`)."""

    def __init__(self) -> None:
        self.count = 0

    def estimate(self, req: EstimateRequest) -> MemoryEstimate:
        self.count += 1
        return estimate(req)


def _batch_sizes(fit: FitRequest, family: _Family) -> list[int]:
    """Batch sizes to try, ascending: the divisors of the per-GPU share of the global batch (fine-tuning:
    the rest is gradient accumulation), the slot counts of the slots engine, or powers of two up to each
    copy's share (inference)."""
    if fit.task is Task.FINETUNE:
        return [fit.micro_batch] if fit.micro_batch else divisors(fit.batch_size // fit.hardware.count)
    if _runs_on_slots(fit, family):
        return _slot_counts(fit, family)
    per_copy = math.ceil(fit.batch_size / family.strategy.replicas)
    return sorted({min(2**k, per_copy) for k in range(per_copy.bit_length() + 1)})


def _runs_on_slots(fit: FitRequest, family: _Family) -> bool:
    return fit.task is Task.INFER and _request(fit, family, 1).slots_engine


def _prompts_per_copy(fit: FitRequest, family: _Family) -> int | None:
    return None if fit.prompts is None else math.ceil(fit.prompts / family.strategy.replicas)


def slots_cap(fit: FitRequest, replicas: int = 1) -> tuple[int, str]:
    """The most slots one copy of the slots engine gets, and what sets it."""
    if fit.max_slots is None:
        cap, why = math.ceil(fit.batch_size / replicas), "--batch-size"
    else:
        cap, why = fit.max_slots, ("the most the engine was measured at" if fit.max_slots == SLOTS_MAX_BATCH
                                   else "the slots cap")
    if fit.prompts is not None and math.ceil(fit.prompts / replicas) < cap:
        cap, why = math.ceil(fit.prompts / replicas), "the prompts" + (" per copy" if replicas > 1 else "")
    return cap, why


def _slot_counts(fit: FitRequest, family: _Family) -> list[int]:
    """Powers of two up to the cap, the cap, and with a known prompt count the fewest slots for each number of
    waves (more slots than that run the same waves with slower steps)."""
    cap, _ = slots_cap(fit, family.strategy.replicas)
    counts = {min(2**k, cap) for k in range(cap.bit_length() + 1)}
    prompts = _prompts_per_copy(fit, family)
    if prompts is not None:
        counts |= {math.ceil(prompts / math.ceil(prompts / slots)) for slots in range(1, cap + 1)}
    return sorted(counts)


def _largest_fitting(fit: FitRequest, family: _Family, counter: _Counter) -> tuple[EstimateRequest, MemoryEstimate, bool]:
    """The largest batch of the family that fits (binary search: memory grows with the batch), or the
    smallest batch's estimate when none does."""
    sizes = _batch_sizes(fit, family)
    smallest = _request(fit, family, sizes[0])
    best = (smallest, counter.estimate(smallest))
    if not fit.holds(best[1]):
        return best[0], best[1], False
    low, high = 1, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        req = _request(fit, family, sizes[middle])
        found = counter.estimate(req)
        if fit.holds(found):
            best, low = (req, found), middle + 1
        else:
            high = middle - 1
    return best[0], best[1], True


def _fastest_slots(fit: FitRequest, family: _Family, largest: EstimateRequest) -> EstimateRequest:
    """Of the slot counts up to the largest that fits (memory grows with the slots), the fastest by the
    throughput model; the fewer slots on a tie."""
    sizes = [size for size in _batch_sizes(fit, family) if size <= largest.micro_batch_size]

    def speed(size: int) -> float:
        req = _request(fit, family, size)
        return generation_throughput(req, fit.gpu, family.strategy.replicas, fit.prompts).tokens_per_s

    return _request(fit, family, max(sizes, key=lambda size: (speed(size), -size)))


def _candidate(fit: FitRequest, family: _Family, req: EstimateRequest, memory: MemoryEstimate) -> Candidate:
    if fit.task is Task.FINETUNE:
        accum = (fit.batch_size // fit.hardware.count) // req.micro_batch_size
        throughput = finetune_throughput(req, fit.gpu, accum)
    else:
        accum = 1
        throughput = generation_throughput(req, fit.gpu, family.strategy.replicas, fit.prompts)
    return Candidate(req, family.strategy, accum, memory, throughput, fit.budget_bytes, fit.host_memory_bytes)


def _evaluate(fit: FitRequest, counter: _Counter, activation_offload: bool = False) -> tuple[list[Candidate], list[Candidate]]:
    """(fitting candidates, smallest configuration of each family that does not fit)."""
    families = _finetune_families(fit, activation_offload) if fit.task is Task.FINETUNE else _inference_families(fit)
    fitting, misses = [], []
    for family in families:
        req, memory, fits = _largest_fitting(fit, family, counter)
        if fits and _runs_on_slots(fit, family):
            fastest = _fastest_slots(fit, family, req)
            if fastest != req:
                req, memory = fastest, counter.estimate(fastest)
        candidate = _candidate(fit, family, req, memory)
        (fitting if fits else misses).append(candidate)
    return fitting, misses


# ---- ranking -------------------------------------------------------------------------------------------
_QUANT_TIER = {Quant.NONE: 0, Quant.INT8: 1, Quant.NF4: 2}
_STRATEGY_ORDER = {Backend.SINGLE: 0, Backend.REPLICAS: 0, Backend.DDP: 1, Backend.FSDP: 2, Backend.DEEPSPEED: 3}


def _simplicity(candidate: Candidate) -> tuple:
    s = candidate.strategy
    return (_STRATEGY_ORDER[s.backend], s.zero, s.offload is not Offload.NONE, s.shard, candidate.checkpointing)


def rank_key(candidate: Candidate, gpu: GpuSpec) -> tuple:
    speed = -candidate.tokens_per_s
    if candidate.request.task is Task.FINETUNE:
        return (speed, candidate.memory_bytes, _simplicity(candidate))
    tier = 3 if candidate.precision in slow_precisions(gpu) else _QUANT_TIER[candidate.quant]
    return (tier, speed, candidate.memory_bytes, _simplicity(candidate))


def rank(candidates: Iterable[Candidate], gpu: GpuSpec) -> tuple[Candidate, ...]:
    return tuple(sorted(prune_dominated(candidates), key=lambda c: rank_key(c, gpu)))


def prune_dominated(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Drop a candidate when one with the same method, weights and precision, a simpler parallelism
    (single GPU < DDP < FSDP < DeepSpeed; less sharding, no offload) is at least as fast (within
    DOMINANCE_TOLERANCE): ZeRO or offload that buys nothing is not worth listing."""
    pool = list(candidates)

    def same_kind(a: Candidate, b: Candidate) -> bool:
        return (a.method, a.quant, a.precision) == (b.method, b.quant, b.precision)

    def dominates(a: Candidate, b: Candidate) -> bool:
        return (a is not b and same_kind(a, b) and _simplicity(a)[:4] < _simplicity(b)[:4]
                and a.tokens_per_s >= (1 - DOMINANCE_TOLERANCE) * b.tokens_per_s)

    return [c for c in pool if not any(dominates(other, c) for other in pool)]


# ---- warnings ------------------------------------------------------------------------------------------
def hardware_warnings(fit: FitRequest) -> tuple[str, ...]:
    gpu = fit.gpu
    found = []
    if not gpu.bf16:
        found.append(f"{gpu.name} has no bf16 (compute capability {gpu.compute_capability_str}; bf16 needs 8.0+): "
                     "16-bit plans use fp16")
    if slow_precisions(gpu):
        found.append(f"{gpu.name} computes fp16 at {gpu.fp16_tflops:g} TFLOP/s against {gpu.fp32_tflops:g} in fp32 "
                     f"(1/{gpu.fp32_tflops / gpu.fp16_tflops:.0f}): fp32 compute is planned too (over 4-bit weights "
                     "where 32-bit ones do not fit), and fp16 plans are timed at the slow rate")
    if not gpu.bnb_4bit:
        found.append(f"bitsandbytes does not support the {gpu.name} (compute capability {gpu.compute_capability_str}; "
                     "needs 5.0+): no QLoRA, nf4 or int8")
    elif not gpu.bnb_int8 and fit.task is Task.INFER:
        found.append(f"no LLM.int8() on the {gpu.name} (bitsandbytes' int8 matmul needs compute capability 7.5+): "
                     "nf4 only")
    return tuple(found)


def candidate_warnings(candidate: Candidate, gpu: GpuSpec) -> tuple[str, ...]:
    found = list(candidate.throughput.notes)
    if candidate.precision in slow_precisions(gpu):
        found.append(f"{candidate.precision.value} is slow on the {gpu.name} ({gpu.fp16_tflops:g} TFLOP/s)")
    if candidate.quant is not Quant.NONE and gpu.bitsandbytes_note:
        found.append(f"bitsandbytes on the {gpu.name}: {gpu.bitsandbytes_note}")
    if candidate.host_bytes:
        found.append(f"{candidate.offload_label} needs about {format_gib(candidate.host_bytes)} of host memory")
    return tuple(found)


def slots_note(fit: FitRequest, candidate: Candidate) -> tuple[str, ...]:
    """Why the slots engine got the batch it did."""
    req, replicas = candidate.request, candidate.strategy.replicas
    if not req.slots_engine:
        return ()
    cap, why = slots_cap(fit, replicas)
    where = " per GPU" if replicas > 1 else ""
    text = (f"batch {req.micro_batch_size} is the slots engine's slots{where}: of 1 to {cap} ({why}), the most tokens/s "
            f"the throughput model gives within memory")
    if fit.prompts is not None:
        prompts = math.ceil(fit.prompts / replicas)
        waves = math.ceil(prompts / req.micro_batch_size)
        text += f"; {prompts:,} prompts{where} run in {waves} wave{'s' if waves > 1 else ''} of slots"
    return (text,)


# ---- search ---------------------------------------------------------------------------------------------
def search(fit: FitRequest, *, advise: bool = True) -> FitResult:
    """The configurations that fit, best first; when none does, the nearest one and what would fit."""
    counter = _Counter()
    fitting, misses = _evaluate(fit, counter, activation_offload=fit.activation_offload is True)
    if not fitting and fit.activation_offload is None and fit.task is Task.FINETUNE:
        fitting, offloaded_misses = _evaluate(fit, counter, activation_offload=True)
        misses += offloaded_misses
    ranked = rank(fitting, fit.gpu)
    warnings = hardware_warnings(fit)
    if ranked:
        return FitResult(fit, ranked, warnings=warnings + candidate_warnings(ranked[0], fit.gpu) + slots_note(fit, ranked[0]),
                         considered=counter.count)
    nearest = min(misses, key=lambda c: c.memory_bytes, default=None)
    short_of_host = min((c for c in misses if c.memory_bytes <= c.budget_bytes and not c.fits_host),
                        key=lambda c: c.host_bytes, default=None)
    reasons = (*_host_reasons(fit, short_of_host), *_reasons(fit, nearest))
    suggestions = tuple(suggest(fit, nearest)) if advise else ()
    return FitResult(fit, (), nearest=nearest, reasons=reasons, suggestions=suggestions, warnings=warnings,
                     considered=counter.count)


def _host_reasons(fit: FitRequest, candidate: Candidate | None) -> tuple[str, ...]:
    """The configuration that fits the GPUs but not the node's CPU memory, and by how much."""
    if candidate is None:
        return ()
    return (f"{candidate.describe()} fits the GPUs but needs {format_gib(candidate.host_bytes)} of host memory for "
            f"{candidate.offload_label}, this node has {format_gib(fit.host_memory_bytes or 0)}",)


def _reasons(fit: FitRequest, nearest: Candidate | None) -> tuple[str, ...]:
    budget = (f"{format_gib(fit.budget_bytes)} per GPU ({format_gib(fit.hardware.memory_bytes)} x "
              f"(1 - {fit.margin:g} margin))")
    if nearest is None:
        if fit.task is Task.FINETUNE and fit.methods == (Method.QLORA,) and not fit.gpu.bnb_4bit:
            return (f"QLoRA needs bitsandbytes' 4-bit kernels, which do not run on the {fit.gpu.name} "
                    f"(compute capability {fit.gpu.compute_capability_str}): use --method lora or full",)
        return (f"no configuration of {fit.model.name} can run on the {fit.gpu.name} as asked",)
    over = nearest.memory_bytes - fit.budget_bytes
    return (f"nothing fits in {budget}",
            f"the smallest configuration, {nearest.describe()}, needs {format_gib(nearest.memory_bytes)} per GPU "
            f"({format_gib(over)} over)")


def _best_after(fit: FitRequest, **changes: object) -> Candidate | None:
    try:
        changed = replace(fit, **changes)
    except FitError:
        return None
    return search(changed, advise=False).best


def suggest(fit: FitRequest, nearest: Candidate | None) -> Iterator[Suggestion]:
    """The smallest changes that make something fit, each with the best configuration it gives."""
    gpu, count = fit.gpu, fit.hardware.count
    for more in MORE_GPUS:
        if more <= count:
            continue
        hardware = replace(fit.hardware, count=more)
        batch = fit.batch_size if fit.task is Task.INFER else math.ceil(fit.batch_size / more) * more
        best = _best_after(fit, hardware=hardware, batch_size=batch)
        if best is not None:
            yield Suggestion("gpus", f"{more} x {gpu.name} (--gpus {more}): {best.describe()}, "
                                     f"{format_gib(best.memory_bytes)} per GPU", best)
            break
    yield from _shorter(fit)
    if fit.task is Task.FINETUNE and Method.QLORA not in fit.methods and gpu.bnb_4bit:
        best = _best_after(fit, methods=(Method.QLORA,))
        if best is not None:
            yield Suggestion("method", f"QLoRA (--method qlora): {best.describe()}, {format_gib(best.memory_bytes)}", best)
    if fit.task is Task.FINETUNE and not fit.deepspeed:
        best = _best_after(fit, deepspeed=True)
        if best is not None:
            yield Suggestion("deepspeed", f"DeepSpeed ({best.strategy.label}; it needs nvcc from a CUDA toolkit): "
                                          f"{best.describe()}, {format_gib(best.memory_bytes)} per GPU", best)
    if nearest is not None and nearest.memory_bytes > nearest.budget_bytes:
        needed = math.ceil(nearest.memory_bytes / (1 - fit.margin) / GiB * 10) / 10
        yield Suggestion("memory", f"a GPU with at least {needed:.1f} GiB free runs {nearest.describe()}")
    if fit.host_memory_bytes is not None:
        yield from _more_host_memory(fit)


def _more_host_memory(fit: FitRequest) -> Iterator[Suggestion]:
    """The best plan a node with enough CPU memory would run, when the GPUs are not what is short."""
    best = _best_after(fit, hardware=replace(fit.hardware, host_memory_bytes=None))
    if best is not None and best.host_bytes:
        yield Suggestion("host_memory", f"a node with at least {format_gib(best.host_bytes)} of host memory: "
                                        f"{best.describe()}, {format_gib(best.memory_bytes)} per GPU", best)


def _shorter(fit: FitRequest) -> Iterator[Suggestion]:
    option, length = ("--seq-len", fit.seq_len) if fit.task is Task.FINETUNE else ("--prompt-len", fit.prompt_len)
    key = "seq_len" if fit.task is Task.FINETUNE else "prompt_len"
    shorter = length // 2
    while shorter >= SHORTEST_SEQUENCE:
        best = _best_after(fit, **{key: shorter})
        if best is not None:
            yield Suggestion(key, f"a shorter sequence ({option} {shorter}): {best.describe()}, "
                                  f"{format_gib(best.memory_bytes)} per GPU", best)
            return
        shorter //= 2
