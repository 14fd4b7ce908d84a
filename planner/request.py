"""What the user asks the estimator: a typed, validated request.

Every choice is a `str` enum so that it prints, parses and serialises as the text users type.
`EstimateRequest.__post_init__` refuses contradictory requests with a message that says what to do.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from enum import Enum

from .defaults import ALL_LINEAR, DEFAULT_LORA_R, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN, lora_alpha
from .models import ModelSpec


class RequestError(ValueError):
    """A request that cannot be estimated as asked; the message says what to change, `field` the field (of
    the request, named as the submission's) at fault, when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def values_of(enum: type[Enum]) -> tuple[str, ...]:
    """An enum's values as users type them, in its order: what a command's choices and a config accept."""
    return tuple(member.value for member in enum)


class Task(str, Enum):
    INFER = "infer"
    FINETUNE = "finetune"


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class Precision(str, Enum):
    BF16_TRUE = "bf16-true"
    BF16_MIXED = "bf16-mixed"
    FP16_TRUE = "fp16-true"
    FP16_MIXED = "fp16-mixed"
    FP32 = "fp32"

    @property
    def is_mixed(self) -> bool:
        return self in (Precision.BF16_MIXED, Precision.FP16_MIXED)

    @property
    def uses_bf16(self) -> bool:
        return self in (Precision.BF16_TRUE, Precision.BF16_MIXED)

    @property
    def param_bytes(self) -> int:
        """Bytes per parameter as stored: mixed precision keeps fp32 master weights."""
        return 2 if self in (Precision.BF16_TRUE, Precision.FP16_TRUE) else 4

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element: 16-bit unless everything runs in fp32."""
        return 4 if self is Precision.FP32 else 2


class Quant(str, Enum):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class Engine(str, Enum):
    """Which generation engine runs an inference request (runtime.infer.engine); AUTO: the runtime's choice."""

    AUTO = "auto"
    GENERATE = "generate"  # plain model.generate in batches: the CPU, quantized and sharded models
    SLOTS = "slots"  # runtime.infer.slots: static slot cache, continuous refill, captured decode step
    CONTINUOUS = "continuous"  # transformers' continuous batching
    GRAPHS = "graphs"  # generate on a compiled static cache


class Optimizer(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw-8bit"
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"


class Offload(str, Enum):
    NONE = "none"
    OPTIMIZER = "optimizer"
    PARAMS = "params"


class Kernels(str, Enum):
    """Fused training kernels: Liger's (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) or none."""

    LIGER = "liger"
    NONE = "none"


# Architectures Liger Kernel patches (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN);
# the runtime applies it to these only, and the estimator models it for these only.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})
# Liger's kernels are Triton kernels, and Triton compiles for NVIDIA compute capability 7.0 and newer (Volta on;
# Unsloth, built on Triton kernels too, states the same minimum): a Pascal card (P40, P100) trains without them.
LIGER_MIN_COMPUTE_CAPABILITY = (7, 0)


# Architectures the slots inference engine runs (runtime.infer.slots: plain full attention through transformers'
# cache API); the runtime refuses others, and the estimator models its static cache for these only.
SLOTS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
SLOTS_CACHE_ALIGN = 64  # cache positions per slot, rounded up to this
SLOTS_PREFILL_TOKENS = 8192  # padded prompt tokens one prefill forward of the slots engine takes in


# Compiling the slots engine's decode step (runtime/infer/slot_step.py) costs 5.6 s on a fresh machine and 2.4-2.9 s
# for another slot count (Inductor's cache on disk), and saves 0.4-0.5 ms a step against Liger's kernels, 2.3-3.7 ms
# against the eager step (H200, 7B, 8-256 slots: benchmarks/results/slots-step-probe-h200.jsonl). From this many
# planned steps (waves of prompts x max_new_tokens) it is paid back against the eager step on a fresh machine, and
# against Liger's kernels with the cache warm at 8 slots; below it the step runs on Liger's kernels.
SLOTS_COMPILE_MIN_STEPS = 2048


def slots_compile_step(prompts: int, slots: int, max_new_tokens: int) -> bool:
    """Whether the slots engine compiles its decode step for a call of `prompts` on `slots` slots."""
    return math.ceil(prompts / slots) * max_new_tokens >= SLOTS_COMPILE_MIN_STEPS


def slots_cache_len(prompt_len: int, max_new_tokens: int) -> int:
    """Positions one slot of the slots engine holds: its longest sequence, rounded up to SLOTS_CACHE_ALIGN."""
    return -(-(prompt_len + max_new_tokens) // SLOTS_CACHE_ALIGN) * SLOTS_CACHE_ALIGN


def liger_runs_on(compute_capability: tuple[int, int] | None) -> bool:
    """Whether Liger's Triton kernels run on a GPU of this compute capability (None: not known, assumed new)."""
    return compute_capability is None or tuple(compute_capability) >= LIGER_MIN_COMPUTE_CAPABILITY

@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters; `targets` is a tuple of module names or ("all-linear",) (PEFT's spelling)."""

    r: int = DEFAULT_LORA_R
    alpha: int = lora_alpha(DEFAULT_LORA_R)
    targets: tuple[str, ...] = (ALL_LINEAR,)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise RequestError(f"--lora-r must be positive, got {self.r}", "lora_r")
        if not self.targets:
            raise RequestError("--lora-targets is empty: name modules (q_proj,v_proj) or use all-linear", "lora_targets")

    def target_shapes(self, model: ModelSpec) -> dict[str, tuple[int, int]]:
        """(in, out) of each targeted linear in one block; unknown names are an error."""
        linears = model.block_linears()
        if self.targets == (ALL_LINEAR,):
            return linears
        unknown = [t for t in self.targets if t not in linears]
        if unknown:
            raise RequestError(
                f"--lora-targets: {model.name} has no linear layer named {', '.join(unknown)}; its layers are "
                f"{', '.join(linears)} (or use all-linear)", "lora_targets"
            )
        return {name: linears[name] for name in self.targets}

    def params(self, model: ModelSpec) -> int:
        """A (r x in) and B (out x r) per targeted linear, every layer; experts each get their own."""
        experts = model.num_experts
        mlp_names = set(model.mlp_linears())
        per_layer = sum(
            self.r * (i + o) * (experts if name in mlp_names else 1)
            for name, (i, o) in self.target_shapes(model).items()
        )
        return per_layer * model.num_layers


@dataclass(frozen=True)
class Parallelism:
    """How the work is spread: data parallel (ZeRO stage 0 is plain DDP), or sharded inference."""

    gpus: int = 1
    zero: int = 0
    offload: Offload = Offload.NONE

    def __post_init__(self) -> None:
        if self.gpus <= 0:
            raise RequestError(f"--gpus must be at least 1, got {self.gpus}", "gpus")
        if self.zero not in (0, 1, 2, 3):
            raise RequestError(f"--zero must be 0, 1, 2 or 3, got {self.zero}", "zero")
        if self.offload is not Offload.NONE and self.zero == 0:
            raise RequestError("--offload needs DeepSpeed: add --zero 2 (optimizer) or --zero 3 (optimizer or params)",
                               "offload")
        if self.offload is Offload.PARAMS and self.zero != 3:
            raise RequestError("--offload params needs --zero 3 (DeepSpeed offloads parameters only in stage 3)",
                               "offload")


@dataclass(frozen=True)
class EstimateRequest:
    model: ModelSpec
    task: Task = Task.FINETUNE
    method: Method = Method.LORA
    precision: Precision = Precision.BF16_TRUE
    quant: Quant = Quant.NONE
    micro_batch_size: int = 1  # sequences per GPU in one pass: fine-tuning's micro-batch, one model copy's batch
    seq_len: int = DEFAULT_SEQ_LEN  # fine-tuning
    prompt_len: int = DEFAULT_PROMPT_LEN  # inference
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # inference
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    optimizer: Optimizer = Optimizer.ADAMW
    parallel: Parallelism = field(default_factory=Parallelism)
    kernels: Kernels = Kernels.NONE
    lora_dropout: float = 0.0
    activation_offload: bool = False  # checkpointed layer inputs in CPU memory (needs gradient checkpointing)
    on_cuda: bool = True  # inference on a CUDA GPU, where the fast engines may run (runtime.infer.engine); False: CPU
    engine: Engine = Engine.AUTO  # inference: the engine that runs (a measured run says which one did)
    compiled_layers: bool = False  # fine-tuning: decoder layers through torch.compile (runtime.train: regional)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RequestError(f"--lora-dropout must be at least 0 and below 1, got {self.lora_dropout}",
                               "lora_dropout")
        if self.activation_offload and not (self.task is Task.FINETUNE and self.gradient_checkpointing):
            raise RequestError("--activation-offload moves the checkpointed layer inputs to CPU memory: it needs "
                               "fine-tuning with --gradient-checkpointing", "activation_offload")
        sizes = {"--batch-size": self.micro_batch_size, "--seq-len": self.seq_len, "--prompt-len": self.prompt_len,
                 "--max-new-tokens": self.max_new_tokens}
        for option, value in sizes.items():
            if value <= 0:
                raise RequestError(f"{option} must be positive, got {value}", option[2:].replace("-", "_"))
        if self.task is Task.INFER:
            self._check_inference()
        else:
            self._check_finetuning()

    def _check_inference(self) -> None:
        if self.parallel.zero or self.parallel.offload is not Offload.NONE:
            raise RequestError("--zero and --offload apply to fine-tuning; inference shards the model over --gpus", "zero")
        if self.precision.is_mixed:
            raise RequestError(f"--precision {self.precision.value} is a training mode: use bf16-true, fp16-true or fp32 for "
                               "inference", "precision")

    def _check_finetuning(self) -> None:
        if self.method is Method.FULL and self.quant is not Quant.NONE:
            raise RequestError(
                f"--quant {self.quant.value} freezes the weights, so full fine-tuning cannot update them: "
                "use --method qlora (4-bit base + LoRA) or --quant none", "quant"
            )
        if self.method is Method.QLORA and self.quant is Quant.INT8:
            raise RequestError("--method qlora loads the base in nf4: use --quant nf4 (or --method lora --quant int8)",
                               "quant")
        if self.method is not Method.FULL and self.precision.is_mixed:
            raise RequestError(
                f"--precision {self.precision.value} keeps fp32 master weights, which a frozen LoRA base does not need: "
                "use bf16-true (adapters stay fp32) or fp16-true", "precision"
            )
        if self.max_new_tokens and self.task is Task.FINETUNE:
            pass  # generation lengths are ignored when fine-tuning

    @property
    def effective_quant(self) -> Quant:
        """QLoRA always quantizes the base to nf4."""
        return Quant.NF4 if self.method is Method.QLORA and self.task is Task.FINETUNE else self.quant

    @property
    def fused_kernels(self) -> bool:
        """Liger's kernels run: asked for, fine-tuning, and an architecture Liger supports."""
        return (self.kernels is Kernels.LIGER and self.task is Task.FINETUNE
                and self.model.model_type in LIGER_MODEL_TYPES)

    @property
    def slots_engine(self) -> bool:
        """Inference runs on the slots engine: asked for, or by default on one CUDA GPU with 16/32-bit weights of a
        full-attention family it runs."""
        if self.task is not Task.INFER or self.engine not in (Engine.AUTO, Engine.SLOTS):
            return False
        return self.engine is Engine.SLOTS or (self.on_cuda and self.quant is Quant.NONE and self.parallel.gpus == 1
                                               and self.model.model_type in SLOTS_MODEL_TYPES
                                               and not self.model.sliding_window)

    @property
    def transformers_fast_engine(self) -> bool:
        """Inference runs on transformers' continuous batching or compiled static cache (by default where the slots
        engine cannot: one CUDA GPU, 16/32-bit weights)."""
        if self.task is not Task.INFER or self.engine in (Engine.CONTINUOUS, Engine.GRAPHS):
            return self.task is Task.INFER
        return (self.engine is Engine.AUTO and not self.slots_engine and self.on_cuda and self.quant is Quant.NONE
                and self.parallel.gpus == 1)

    @property
    def tokens(self) -> int:
        """Tokens in flight per GPU: one micro-batch of sequences, or prompts plus generated tokens."""
        length = self.seq_len if self.task is Task.FINETUNE else self.prompt_len + self.max_new_tokens
        return self.micro_batch_size * length
