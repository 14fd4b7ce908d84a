"""Throughput: tokens per second of one configuration on one kind of GPU, term by term.

Estimation only (no search): `finetune_throughput(req, gpu, ...)` and `generation_throughput(req, gpu, ...)`
turn an `EstimateRequest` into a `Throughput` whose `terms` say where the time goes.

How it works (nanoGPT style: every term named, every constant with its source):

Fine-tuning, per micro-batch on one GPU:
- matmuls: FLOPs over the card's dense peak at the compute dtype (GPU catalog) times an efficiency.
  FLOPs per token (Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, app. B):
    full fine-tuning  6N = 2N forward + 4N backward (input and weight gradients);
    LoRA / QLoRA      4N = 2N forward + 2N backward (input gradients only: the frozen base gets no
                      weight gradient) + 6A for the adapters' A parameters;
    gradient checkpointing recomputes the forward: +2N (+2A);
    attention         2 matmuls (QK^T, AV) x 2 FLOPs x q_dim x the average causal context (seq/2) per layer
                      forward, twice that backward, once more when recomputed.
  N counts the parameters a token multiplies through: decoder linears (active experts only) and the
  output head; the embedding is a lookup.
- memory traffic the FLOPs do not see: PEFT's fp32 adapter path (per targeted layer: cast, lora_A,
  lora_B, scale, add), Gemma-2's eager attention scores, the fp32 logits and loss, QLoRA's dequantization
  of every 4-bit weight on every pass (bitsandbytes dequantizes to the compute dtype, then matmuls).
- host overhead: the measured step times have a floor (~0.07 s per micro-batch on the H200 machine, for
  every model size): Python, autograd and kernel launches. bitsandbytes' 4-bit layers add a cost per
  layer call instead.
Per optimizer step: the AdamW update (memory bound), gradient synchronisation between GPUs, ZeRO-3
parameter gathering, and CPU offload (PCIe transfers plus DeepSpeed's CPU Adam). Per micro-batch under
activation offload: the checkpointed layer inputs' copies to CPU memory and back.

Generation (HF `generate`), per new token:
  step = max(bytes read / bandwidth, FLOPs / (peak x efficiency)) + host overhead
  bytes read = the weights the step touches (all of them; the routed experts for mixture-of-experts) plus
  the KV cache, plus bitsandbytes' dequantized copy for nf4 at batch > 1. On the H200 every measured step
  took 40-80 ms whatever the model size (Llama-3.2-1B: 56 ms, Llama-2-7B: 67 ms, Mixtral: 70 ms), while
  reading the weights takes 0.5-20 ms: HF generate there is launch/host bound, so the host overhead (a
  fixed part plus a part per decoder layer) is the fitted term that matters. LLM.int8() layers are far
  slower (121-124 ms per step on 1.5B and 3B models): they get their own fitted cost per layer call. The
  prompt is prefilled once at matmul efficiency.

Generation on the slots engine (runtime/infer/slots.py: `EstimateRequest.slots_engine`), per call of P prompts
on S slots, every sequence taken to max_new_tokens (N): ceil(P / S) waves of N - 1 captured decode steps (a
refill's prefill gives each sequence its first token). The step runs every slot, busy or not, and is replayed
from a CUDA graph, so there is no host term per step:
  step = max(weights / bandwidth + S x visible x KV bytes per position / (bandwidth x efficiency),
             FLOPs / (peak x eff.))
         + layers x a fitted kernel cost per layer (what the weights' GEMMs take past their bytes, and the step's
           small kernels: norms, RoPE, cache writes, attention's fixed part), one for the compiled step and one
           for the step on Liger's kernels
  The step is compiled when the call is long enough (`slots_compile_step`): the compile is one more term.
  visible: the cache positions attention reads, the furthest slot's rounded up to SLOTS_CACHE_ALIGN, averaged
  over a wave's steps. Per call: the prefills (eager forwards of up to SLOTS_PREFILL_TOKENS padded prompt tokens,
  host bound: a cost per layer, plus their FLOPs), and one capture per visible length reached (two eager warm-up
  passes and the captured one). On the H200 the compiled step of the 7B shape is 4.8 ms at 8 slots and 13.9 ms
  at 256, against 7.6 and 17.6 for transformers' forward captured the same way and 58 ms for HF generate's.

Fitted constants come from `benchmarks/results/memory-h200.jsonl` (the slots engine's from
`benchmarks/results/engine-h200.jsonl`) (NVIDIA H200, torch 2.11,
transformers 5.17, peft 0.21, bitsandbytes 0.50.2; 2026-11-30) by `benchmarks/fit_throughput.py`, which
re-derives them; `tests/planner/test_throughput.py` holds the model to every run it covers. Constants not
fitted there (multi-GPU communication, CPU offload) are first-principles figures, marked as such.
Efficiencies fitted on the H200's tensor cores are applied to every card and precision: on other cards,
and above all on CUDA-core (fp32, Pascal) math, expect larger errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .estimator import (
    EAGER_ATTENTION_BYTES,
    INT8_BYTES_PER_PARAM,
    NF4_BYTES_PER_PARAM,
    checkpoint_bytes_per_layer,
    layer_bytes_per_token,
    trainable_params,
    weight_bytes,
)
from .gpus import GpuSpec
from .models import ModelSpec
from .request import (
    SLOTS_CACHE_ALIGN,
    SLOTS_COMPILE_MIN_STEPS,
    SLOTS_PREFILL_TOKENS,
    EstimateRequest,
    Method,
    Offload,
    Optimizer,
    Parallelism,
    Precision,
    Quant,
    Task,
    slots_cache_len,
    slots_compile_step,
)

# ---- fitted on the H200 runs (benchmarks/fit_throughput.py) -----------------------------------------
# Share of the dense peak the matmuls reach: full fine-tuning and LoRA (one constant fits both).
MATMUL_EFFICIENCY = 0.80
# QLoRA, per 4-bit linear layer call (forward, backward, recompute): bitsandbytes' Python path and its
# dequantize kernel. Once dequantized, the matmul runs in bf16 at MATMUL_EFFICIENCY (the runtime keeps
# QLoRA's activations 16-bit since issue 15), and the dequantization traffic is counted from first
# principles (NF4_DEQUANT_READ_BYTES): what is left is a cost per call, which is why small QLoRA models at
# short sequences run slower than their FLOPs say. Fitted on the QLoRA runs re-measured with the current
# recipe (2026-12-03); it replaces QLORA_MATMUL_EFFICIENCY (0.45), the fit of the fp32-upcast recipe.
QLORA_LINEAR_CALL_S = 0.00029
# Bytes moved per adapter input or output element and pass by PEFT's fp32 LoRA path (cast, lora_A,
# lora_B, scaling, add). Why q,v-only LoRA on Mistral-7B ran 1.3x faster than FLOPs alone predict.
LORA_BYTES_PER_ELEMENT = 16.0
# Elementwise traffic (norms, activations, residual adds, casts): bytes moved per byte of activations the
# layer saves for backward (the estimator's `layer_bytes_per_token`), per pass.
ACTIVATION_TRAFFIC = 4.9
# Host overhead (Python, autograd, kernel launches) per decoder layer and pass (forward, backward x2,
# recompute), measured on the H200 machine; a layer with eager attention (Gemma-2: scores, soft-capping,
# mask, softmax as separate kernels, and four norms) counts twice.
HOST_LAYER_PASS_S = 0.00058
EAGER_LAYER_PASS_WEIGHT = 2
# HF generate, per new token: host/launch bound on the H200 machine. A fixed part (logits processing,
# stopping criteria, cache bookkeeping) and a part per decoder layer (kernel launches): 37 + 0.66 x 32 =
# 58 ms for a 32-layer model.
DECODE_STEP_OVERHEAD_S = 0.037
DECODE_LAYER_OVERHEAD_S = 0.00066
# LLM.int8() (bitsandbytes load_in_8bit), per linear layer per step: outlier decomposition and
# int8 quantization of the activations are several kernels each.
INT8_LINEAR_CALL_S = 0.00034
# nf4 inference, per linear layer per step (bitsandbytes' 4-bit GEMV or dequantize kernel).
NF4_LINEAR_CALL_S = 0.000034
# Gemma-2's generate steps took less host time than every other family's (42 ms at 9B with 42 layers,
# 36 ms at 2B nf4): its fixed part, fitted on those two runs. Likely cause: its hybrid (static-shape)
# cache, which avoids DynamicCache's per-layer concatenation; not established.
HYBRID_CACHE_STEP_OVERHEAD_S = 0.010
# The slots engine's step, fitted on the probe's captured steps (benchmarks/results/slots-step-probe-h200.jsonl:
# 7B shape, 8, 64 and 256 slots at 192 visible positions, compiled and on Liger's kernels). The weights' bytes
# are the same at every slot count, so their read and the per-layer cost cannot be told apart: the weights are
# counted at the full bandwidth and the per-layer cost takes the rest.
# Share of the bandwidth the KV cache is read at (attention at decode: one query row per KV head and slot).
SLOTS_BANDWIDTH_EFFICIENCY = 0.57
# Per decoder layer and captured step: on Liger's kernels (about 20 a layer) and compiled (about 15).
SLOTS_LAYER_STEP_S = 0.000062
SLOTS_COMPILED_LAYER_STEP_S = 0.0000475
# Per decoder layer and eager pass (a refill's prefill forward, a capture's warm-up and captured passes): host
# bound like HF's forward; a capture's passes also pay the graph's instantiation. Fitted on the engine's runs
# (benchmarks/results/engine-h200.jsonl, the step's constants above held).
SLOTS_EAGER_LAYER_S = 0.0022
# Compiling the step (Inductor, both parts of a layer) on a fresh machine: the probe's first compiled step at
# 8 slots (5.6 s; 2.4-2.9 s for another slot count once Inductor's cache is on disk). Measured, not fitted.
SLOTS_COMPILE_S = 5.6

# ---- first principles (not fitted) ------------------------------------------------------------------
# Logits and loss traffic per logit: write fp32 upcast (4), log-softmax read + write (8), backward reads
# and writes the fp32 gradient (8), casts of the 16-bit logits and their gradient (4).
LOSS_BYTES_PER_LOGIT = 24
# Dequantizing one 4-bit weight for a matmul: read 0.5 byte (plus scales), write the compute-dtype copy,
# read it again in the matmul.
NF4_DEQUANT_READ_BYTES = 0.5
# AdamW update per trainable parameter: read param, grad, m, v; write param, m, v (torch fused AdamW).
ADAM_STATE_READS_WRITES = 4  # m and v, each read and written
# Links. NVLink/PCIe figures in the GPU catalog are both directions; a collective moves data one way per
# step, at about this share of the link's rate (NCCL bus bandwidth on a ring; assumption, not measured).
LINK_EFFICIENCY = 0.7
# Host <-> GPU copies for CPU offload: pinned memory over PCIe 4.0 x16 (32 GB/s per direction) at the
# link efficiency, unless the card's own PCIe link is slower (Pascal: PCIe 3.0).
HOST_LINK_BYTES_PER_S = 32e9
# DeepSpeed's CPU Adam (ZeRO-Offload, Ren et al. 2021), parameters updated per second. Assumption, not
# measured: about half a second per billion parameters on a many-core CPU.
CPU_ADAM_PARAMS_PER_S = 2e9
# The slots engine captures a visible length with WARMUP_STEPS = 2 eager passes and the captured one
# (runtime/infer/slots.py).
SLOTS_CAPTURE_PASSES = 3
# Characters per token of English text with a Llama-style tokenizer (rule of thumb: ~4); used to turn a
# data set's size into tokens when only the file is given.
CHARS_PER_TOKEN = 4.0
# When the catalog has no throughput figures for a card (a probed card it does not know), rank with
# these and say the times are unknown.
NOMINAL_FLOPS = 100e12
NOMINAL_BANDWIDTH = 1e12


@dataclass(frozen=True)
class TimeTerm:
    """One named share of a step's time."""

    name: str
    seconds: float
    note: str

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "note": self.note}


@dataclass(frozen=True)
class Throughput:
    """Tokens per second over all GPUs, and where one step's time goes."""

    tokens_per_s: float  # training tokens (fine-tuning) or generated tokens (inference), all GPUs
    step_s: float  # one optimizer step (fine-tuning) or one generate call (inference)
    tokens_per_step: int
    terms: tuple[TimeTerm, ...]
    flops_per_token: float
    known: bool = True  # False: the card has no catalog throughput figures; nominal rates used
    notes: tuple[str, ...] = ()

    def seconds_for(self, tokens: float) -> float:
        return tokens / self.tokens_per_s

    def to_dict(self) -> dict:
        return {
            "tokens_per_s": self.tokens_per_s,
            "step_s": self.step_s,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "rates_known": self.known,
            "terms": [term.to_dict() for term in self.terms],
            "notes": list(self.notes),
        }


# ---- the card ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    flops: float  # dense FLOP/s of the matmuls in the compute dtype
    fp32_flops: float  # dense FLOP/s of fp32 matmuls
    bandwidth: float  # bytes/s of device memory
    link: float | None  # bytes/s one way between GPUs (NVLink or PCIe), None when unknown
    host_link: float  # bytes/s one way between CPU and GPU
    known: bool


def compute_tflops(gpu: GpuSpec, precision: Precision) -> float | None:
    """Dense TFLOP/s of the card's matmuls in the precision's compute dtype (GPU catalog): bf16 or fp16
    tensor rates, or fp32 (CUDA cores; PyTorch leaves TF32 off for matmuls by default)."""
    if precision.uses_bf16:
        return gpu.bf16_tflops
    if precision is Precision.FP32:
        return gpu.fp32_tflops
    return gpu.fp16_tflops


def card_rates(gpu: GpuSpec, precision: Precision) -> Rates:
    tflops = compute_tflops(gpu, precision)
    known = bool(tflops and gpu.memory_bandwidth_gbps)
    link = gpu.interconnect_gbps * 1e9 / 2 * LINK_EFFICIENCY if gpu.interconnect_gbps else None
    host = HOST_LINK_BYTES_PER_S
    if gpu.interconnect == "PCIe" and gpu.interconnect_gbps:
        host = min(host, gpu.interconnect_gbps * 1e9 / 2)
    fp32 = gpu.fp32_tflops * 1e12 if gpu.fp32_tflops else NOMINAL_FLOPS / 8
    return Rates(
        flops=tflops * 1e12 if tflops else NOMINAL_FLOPS,
        fp32_flops=fp32,
        bandwidth=gpu.memory_bandwidth_gbps * 1e9 if gpu.memory_bandwidth_gbps else NOMINAL_BANDWIDTH,
        link=link,
        host_link=host * LINK_EFFICIENCY,
        known=known,
    )


# ---- FLOPs --------------------------------------------------------------------------------------------
def matmul_params(model: ModelSpec) -> int:
    """Parameters one token multiplies through: block linears (routed experts only), router, output head."""
    attention = sum(i * o for i, o in model.attention_linears().values())
    expert = sum(i * o for i, o in model.mlp_linears().values())
    router = model.hidden_size * model.num_experts if model.is_moe else 0
    per_layer = attention + expert * model.experts_per_token + router
    return per_layer * model.num_layers + model.vocab_size * model.hidden_size


def attention_flops_per_token(model: ModelSpec, context: float) -> float:
    """Forward FLOPs of QK^T and AV for one token attending to `context` positions, all layers."""
    if model.sliding_window:
        context = min(context, model.sliding_window)
    return 2 * 2 * model.q_dim * context * model.num_layers


def adapter_params(req: EstimateRequest) -> int:
    return 0 if req.method is Method.FULL else req.lora.params(req.model)


@dataclass(frozen=True)
class FlopsPerToken:
    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def training_flops_per_token(req: EstimateRequest) -> FlopsPerToken:
    n, a = matmul_params(req.model), adapter_params(req)
    attention = attention_flops_per_token(req.model, req.seq_len / 2)  # causal: half the sequence on average
    forward = 2 * n + 2 * a + attention
    weight_grads = 2 * n if req.method is Method.FULL else 0
    backward = 2 * n + weight_grads + 4 * a + 2 * attention
    recompute = forward if req.gradient_checkpointing else 0.0
    return FlopsPerToken(forward, backward, recompute)


# ---- fine-tuning ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingWork:
    """What one micro-batch asks of one GPU, before any rate is applied (what the fit regresses on)."""

    tokens: int
    flops: float  # at the compute dtype's rate
    fp32_flops: float  # at the fp32 rate: QLoRA's output head
    quantized: bool  # QLoRA: matmuls through bitsandbytes 4-bit layers
    adapter_elements: float  # adapter inputs + outputs moved, all passes
    activation_bytes: float  # activations saved for backward, times the passes that touch them
    fixed_bytes: float  # logits and loss, dequantization: first-principles traffic
    layer_passes: float  # decoder layers x passes, eager-attention layers weighted
    quantized_linear_calls: float = 0.0  # QLoRA: 4-bit linear layer calls per micro-batch


def _passes(req: EstimateRequest) -> int:
    """Activation passes: forward 1, backward 2 (it reads and writes), recompute 1."""
    return 3 + (1 if req.gradient_checkpointing else 0)


def _weight_passes(req: EstimateRequest) -> int:
    """Times each weight is used: forward, backward (input gradient), recompute."""
    return 2 + (1 if req.gradient_checkpointing else 0)


def training_work(req: EstimateRequest) -> TrainingWork:
    m = req.model
    tokens = req.micro_batch_size * req.seq_len
    adapter_elements = 0.0
    if req.method is not Method.FULL:
        mlp = set(m.mlp_linears())
        widths = sum((i + o) * (m.experts_per_token if name in mlp else 1)
                     for name, (i, o) in req.lora.target_shapes(m).items())
        adapter_elements = float(tokens * widths * m.num_layers * _passes(req))
    saved = layer_bytes_per_token(req) * tokens
    eager = m.attention == "eager"
    if eager:
        saved += EAGER_ATTENTION_BYTES * req.micro_batch_size * m.num_heads * req.seq_len**2
    quantized = req.method is Method.QLORA
    dequant = 0.0
    if quantized:
        per_param = NF4_DEQUANT_READ_BYTES + 2 * req.precision.compute_bytes
        dequant = m.linear_params * per_param * _weight_passes(req)
    logits = tokens * m.vocab_size * LOSS_BYTES_PER_LOGIT
    flops = tokens * training_flops_per_token(req).total
    # The runtime keeps QLoRA's output head in the compute dtype (issue 15; before, PEFT's k-bit preparation
    # upcast it to fp32 and its matmuls ran at the fp32 rate): no matmul runs at the fp32 rate any more.
    fp32_flops = 0.0
    return TrainingWork(
        tokens=tokens,
        flops=flops - fp32_flops,
        fp32_flops=fp32_flops,
        quantized=quantized,
        adapter_elements=adapter_elements,
        activation_bytes=saved * m.num_layers * _passes(req),
        fixed_bytes=logits + dequant,
        layer_passes=float(m.num_layers * _passes(req) * (EAGER_LAYER_PASS_WEIGHT if eager else 1)),
        quantized_linear_calls=float(m.num_layers * len(m.block_linears()) * _weight_passes(req)) if quantized else 0.0,
    )


def _micro_batch_terms(req: EstimateRequest, rates: Rates, accum: int) -> list[TimeTerm]:
    work = training_work(req)
    efficiency = MATMUL_EFFICIENCY
    per = f" x {accum} micro-batches" if accum > 1 else ""
    terms = [TimeTerm("matmuls", accum * work.flops / (rates.flops * efficiency),
                      f"{work.flops / work.tokens / 1e9:.1f} GFLOP/token at {efficiency:.0%} of "
                      f"{rates.flops / 1e12:.3g} TFLOP/s{per}")]
    if work.fp32_flops:
        terms.append(TimeTerm("fp32 output head", accum * work.fp32_flops / (rates.fp32_flops * efficiency),
                              f"QLoRA upcasts the head to fp32: {work.fp32_flops / work.tokens / 1e9:.1f} GFLOP/token "
                              f"at {rates.fp32_flops / 1e12:.3g} TFLOP/s"))
    if work.adapter_elements:
        terms.append(TimeTerm("LoRA adapter traffic", accum * work.adapter_elements * LORA_BYTES_PER_ELEMENT / rates.bandwidth,
                              f"PEFT's fp32 adapter path, {LORA_BYTES_PER_ELEMENT:g} bytes per element and pass"))
    terms.append(TimeTerm("elementwise traffic", accum * work.activation_bytes * ACTIVATION_TRAFFIC / rates.bandwidth,
                          f"norms, activations, casts: {ACTIVATION_TRAFFIC:g} x the saved activations per pass"))
    terms.append(TimeTerm("logits, loss" + (", dequantization" if work.quantized else ""),
                          accum * work.fixed_bytes / rates.bandwidth, "memory bound"))
    if work.quantized_linear_calls:
        terms.append(TimeTerm("4-bit layer calls", accum * work.quantized_linear_calls * QLORA_LINEAR_CALL_S,
                              f"{QLORA_LINEAR_CALL_S * 1e6:.0f} us per 4-bit linear call, measured (bitsandbytes)"))
    terms.append(TimeTerm("host overhead", accum * work.layer_passes * HOST_LAYER_PASS_S,
                          f"{HOST_LAYER_PASS_S * 1e3:.2f} ms per layer and pass, measured (Python, launches)"))
    return terms


def _optimizer_term(req: EstimateRequest, rates: Rates) -> TimeTerm:
    trainable = trainable_params(req)
    param = req.precision.param_bytes if req.method is Method.FULL else 4
    grad = param
    state = 1.0 if req.optimizer is not Optimizer.ADAMW else float(param)
    per_param = 2 * param + grad + ADAM_STATE_READS_WRITES * state
    shards = req.parallel.gpus if req.parallel.zero >= 1 else 1
    if req.parallel.offload is not Offload.NONE:
        return TimeTerm("optimizer step", 0.0, "on the CPU (see CPU offload)")
    return TimeTerm("optimizer step", trainable * per_param / shards / rates.bandwidth,
                    f"AdamW over {trainable / 1e6:.1f}M trainable params, memory bound")


def _gathered_weight_bytes(req: EstimateRequest) -> float:
    """What ZeRO-3 / FSDP move when they gather the weights: 16-bit copies (full fine-tuning keeps the
    fp32 masters in the optimizer), or the frozen base as stored."""
    if req.method is Method.FULL:
        return req.model.params * req.precision.compute_bytes
    return weight_bytes(replace(req, parallel=Parallelism())).bytes


def _communication_terms(req: EstimateRequest, rates: Rates, accum: int) -> list[TimeTerm]:
    gpus, zero = req.parallel.gpus, req.parallel.zero
    if gpus == 1 or rates.link is None:
        return []
    share = (gpus - 1) / gpus
    trainable = trainable_params(req)
    grad_bytes = trainable * (req.precision.param_bytes if req.method is Method.FULL else 4)
    terms = []
    if zero == 0:
        # Ring all-reduce of the gradients once per optimizer step (DDP skips it while accumulating).
        terms.append(TimeTerm("gradient all-reduce", 2 * share * grad_bytes / rates.link,
                              f"{grad_bytes / 2**30:.2f} GiB of gradients, ring all-reduce"))
    else:
        # ZeRO / FSDP reduce-scatter the gradients every micro-batch and all-gather the updated parameters.
        terms.append(TimeTerm("gradient reduce-scatter", accum * share * grad_bytes / rates.link,
                              "every micro-batch (ZeRO-2/3, FSDP)"))
    if zero == 3:
        weights = _gathered_weight_bytes(req)
        gathers = accum * _weight_passes(req) * share * weights
        terms.append(TimeTerm("parameter all-gather", gathers / rates.link,
                              f"ZeRO-3 / FSDP gather {weights / 2**30:.1f} GiB of weights per forward, backward"
                              + (" and recompute" if req.gradient_checkpointing else "")))
    return terms


def _activation_offload_terms(req: EstimateRequest, rates: Rates, accum: int) -> list[TimeTerm]:
    """Activation offload copies every checkpointed layer input to CPU memory and back once per micro-batch
    (torch's save_on_cpu: the copies are not overlapped with compute). First principles, not fitted."""
    if not req.activation_offload:
        return []
    copied = 2 * req.model.num_layers * checkpoint_bytes_per_layer(req)
    return [TimeTerm("activation offload", accum * copied / rates.host_link,
                     f"{copied / 2**30:.2f} GiB of checkpointed layer inputs to CPU memory and back per micro-batch")]


def _offload_terms(req: EstimateRequest, rates: Rates, accum: int) -> list[TimeTerm]:
    offload = req.parallel.offload
    if offload is Offload.NONE:
        return _activation_offload_terms(req, rates, accum)
    gpus = req.parallel.gpus
    trainable = trainable_params(req)
    grad = req.precision.param_bytes if req.method is Method.FULL else 4
    # Gradients down, updated 16-bit parameters up, each GPU its 1/gpus partition.
    transfers = trainable * (grad + req.precision.compute_bytes) / gpus
    terms = [TimeTerm("CPU offload: optimizer", transfers / rates.host_link + trainable / gpus / CPU_ADAM_PARAMS_PER_S,
                      "gradients to the CPU, Adam on the CPU (DeepSpeed CPUAdam), parameters back; assumed rates")]
    if offload is Offload.PARAMS:
        weights = _gathered_weight_bytes(req)
        fetched = accum * _weight_passes(req) * weights / gpus
        terms.append(TimeTerm("CPU offload: parameters", fetched / rates.host_link,
                              "each GPU fetches its partition of the weights from CPU memory every pass"))
    return terms + _activation_offload_terms(req, rates, accum)


def finetune_throughput(req: EstimateRequest, gpu: GpuSpec, grad_accum: int = 1) -> Throughput:
    """Training tokens per second over `req.parallel.gpus` data-parallel GPUs, `req.micro_batch_size` per
    micro-batch, `grad_accum` micro-batches per optimizer step."""
    if req.task is not Task.FINETUNE:
        raise ValueError("finetune_throughput needs a fine-tuning request")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
    rates = card_rates(gpu, req.precision)
    terms = (*_micro_batch_terms(req, rates, grad_accum), _optimizer_term(req, rates),
             *_communication_terms(req, rates, grad_accum), *_offload_terms(req, rates, grad_accum))
    step = sum(term.seconds for term in terms)
    tokens = req.micro_batch_size * req.seq_len * grad_accum * req.parallel.gpus
    return Throughput(
        tokens_per_s=tokens / step,
        step_s=step,
        tokens_per_step=tokens,
        terms=tuple(term for term in terms if term.seconds > 0),
        flops_per_token=training_flops_per_token(req).total,
        known=rates.known,
        notes=_training_notes(req, gpu),
    )


def _training_notes(req: EstimateRequest, gpu: GpuSpec) -> tuple[str, ...]:
    notes = []
    m = req.model
    if m.sliding_window and req.seq_len > m.sliding_window and m.attention == "sdpa":
        notes.append(f"{m.name}'s sliding window ({m.sliding_window}) is shorter than the sequence: attention "
                     "gets an explicit mask and leaves the flash kernel, so this estimate is optimistic "
                     "(Phi-3-mini at 4096 tokens ran 1.5x slower than modelled on the H200)")
    return tuple(notes)


# ---- generation --------------------------------------------------------------------------------------
def touched_params_fraction(model: ModelSpec, batch: int) -> float:
    """Share of the block weights one decode step reads: every dense weight; for mixture-of-experts, the
    experts the batch's tokens are routed to (expected distinct experts of `batch` tokens x k choices)."""
    if not model.is_moe:
        return 1.0
    experts, k = model.num_experts, model.experts_per_token
    touched = experts * (1 - (1 - k / experts) ** batch)
    expert_params = sum(i * o for i, o in model.mlp_linears().values()) * model.num_layers
    dense = model.params - expert_params * experts
    return (dense + expert_params * touched) / model.params


def _weights_read_per_step(req: EstimateRequest) -> float:
    full = replace(req, parallel=Parallelism())  # all shards: a sharded model still reads every weight once
    read = weight_bytes(full).bytes * touched_params_fraction(req.model, req.micro_batch_size)
    if req.quant is Quant.NF4 and req.micro_batch_size > 1:
        # bitsandbytes uses its 4-bit GEMV for a single token; otherwise it dequantizes, then matmuls.
        linear = req.model.linear_params * touched_params_fraction(req.model, req.micro_batch_size)
        read += linear * 2 * req.precision.compute_bytes
    return read


@dataclass(frozen=True)
class DecodeWork:
    """What one `generate` call asks of one model copy, before any rate is applied."""

    steps: int  # new tokens per sequence
    bytes_per_step: float  # weights touched + KV cache (at the average context)
    flops_per_step: float
    prefill_flops: float
    linear_calls_per_step: int
    layers: int
    quant: Quant
    hybrid_cache: bool  # Gemma-2 (see HYBRID_CACHE_STEP_OVERHEAD_S)


def decode_work(req: EstimateRequest) -> DecodeWork:
    m, batch = req.model, req.micro_batch_size
    n = matmul_params(m)
    context = req.prompt_len + req.max_new_tokens / 2
    kv_read = batch * context * m.kv_cache_bytes_per_token(req.precision.compute_bytes)
    prefill_per_token = 2 * n + attention_flops_per_token(m, req.prompt_len / 2)
    return DecodeWork(
        steps=req.max_new_tokens,
        bytes_per_step=_weights_read_per_step(req) + kv_read,
        flops_per_step=batch * (2 * n + attention_flops_per_token(m, context)),
        prefill_flops=batch * req.prompt_len * prefill_per_token,
        linear_calls_per_step=len(m.block_linears()) * m.num_layers,
        layers=m.num_layers,
        quant=req.quant,
        hybrid_cache=m.model_type == "gemma2",
    )


def decode_host_overhead(work: DecodeWork) -> float:
    per_call = {Quant.INT8: INT8_LINEAR_CALL_S, Quant.NF4: NF4_LINEAR_CALL_S}.get(work.quant, 0.0)
    fixed = HYBRID_CACHE_STEP_OVERHEAD_S if work.hybrid_cache else DECODE_STEP_OVERHEAD_S
    return fixed + work.layers * DECODE_LAYER_OVERHEAD_S + work.linear_calls_per_step * per_call


def _quant_bytes(quant: Quant) -> str:
    return {Quant.NONE: "16/32-bit", Quant.INT8: f"int8 ({INT8_BYTES_PER_PARAM:g} B/param)",
            Quant.NF4: f"nf4 ({NF4_BYTES_PER_PARAM:.2f} B/param)"}[quant]


def generation_throughput(req: EstimateRequest, gpu: GpuSpec, replicas: int = 1, prompts: int | None = None) -> Throughput:
    """Generated tokens per second: `req.micro_batch_size` sequences per model copy (the slots engine's slots),
    `replicas` copies (each on its own GPU or GPUs), `prompts` in all (None: one batch per copy). A model
    sharded over `req.parallel.gpus` GPUs runs them one after another (HF device_map pipeline), so it reads
    its weights at one card's bandwidth."""
    if req.task is not Task.INFER:
        raise ValueError("generation_throughput needs an inference request")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if prompts is not None and prompts < 1:
        raise ValueError(f"prompts must be at least 1, got {prompts}")
    if req.slots_engine:
        per_copy = req.micro_batch_size if prompts is None else math.ceil(prompts / replicas)
        return slots_throughput(req, gpu, per_copy, replicas)
    rates = card_rates(gpu, req.precision)
    work = decode_work(req)
    memory_s = work.bytes_per_step / rates.bandwidth
    compute_s = work.flops_per_step / (rates.flops * MATMUL_EFFICIENCY)
    host_s = decode_host_overhead(work)
    bound = "memory bound" if memory_s >= compute_s else "compute bound"
    terms = (
        TimeTerm("prefill", work.prefill_flops / (rates.flops * MATMUL_EFFICIENCY),
                 f"{req.micro_batch_size} x {req.prompt_len} prompt tokens at {MATMUL_EFFICIENCY:.0%} of peak"),
        TimeTerm("decode: weights and KV cache", work.steps * max(memory_s, compute_s),
                 f"{work.steps} steps, {bound}: weights in {_quant_bytes(req.quant)} and the KV cache, every step"),
        TimeTerm("decode: host overhead", work.steps * host_s, f"{host_s * 1e3:.0f} ms per step, measured (HF generate)"),
    )
    total = sum(term.seconds for term in terms)
    tokens = req.micro_batch_size * work.steps * replicas
    notes = ()
    if req.parallel.gpus > 1:
        notes = (f"sharded over {req.parallel.gpus} GPUs: they work in turn, so it runs at one card's speed",)
    return Throughput(tokens_per_s=tokens / total, step_s=total, tokens_per_step=tokens, terms=terms,
                      flops_per_token=work.flops_per_step / req.micro_batch_size, known=rates.known, notes=notes)


# ---- the slots engine --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotsWork:
    """What one call of the slots engine asks of one model copy, before any rate is applied (what the fit
    regresses on)."""

    prompts: int
    slots: int
    waves: int  # refills of every slot: all sequences run max_new_tokens, so they finish together
    steps: int  # captured decode steps
    visible: float  # cache positions attention reads, averaged over a wave's steps
    weight_bytes_per_step: float
    kv_bytes_per_step: float  # every slot's KV cache over the visible positions
    flops_per_step: float
    prefill_forwards: int
    prefill_flops: float
    graphs: int  # visible lengths captured
    layers: int
    compiled: bool  # the step compiled (slots_compile_step)

    @property
    def eager_layer_passes(self) -> int:
        return (self.prefill_forwards + self.graphs * SLOTS_CAPTURE_PASSES) * self.layers


def _visible_lengths(req: EstimateRequest) -> list[int]:
    """The positions each decode step of a wave reads: the furthest slot's next write, in whole blocks."""
    cache = slots_cache_len(req.prompt_len, req.max_new_tokens)
    return [min(cache, -(-(req.prompt_len + step + 1) // SLOTS_CACHE_ALIGN) * SLOTS_CACHE_ALIGN)
            for step in range(req.max_new_tokens - 1)]


def _prefill_forwards(prompts: int, slots: int, prompt_len: int) -> int:
    """Forwards of the refills: each wave's prompts in groups of at most SLOTS_PREFILL_TOKENS padded tokens."""
    per_forward = max(1, SLOTS_PREFILL_TOKENS // prompt_len)
    full, rest = divmod(prompts, slots)
    return full * math.ceil(slots / per_forward) + math.ceil(rest / per_forward)


def slots_work(req: EstimateRequest, prompts: int) -> SlotsWork:
    m, slots = req.model, req.micro_batch_size
    n = matmul_params(m)
    visible = _visible_lengths(req)
    average = sum(visible) / len(visible) if visible else float(req.prompt_len)
    waves = math.ceil(prompts / slots)
    kv_read = slots * average * m.kv_cache_bytes_per_token(req.precision.compute_bytes)
    return SlotsWork(
        prompts=prompts,
        slots=slots,
        waves=waves,
        steps=waves * len(visible),
        visible=average,
        weight_bytes_per_step=_weights_read_per_step(req),
        kv_bytes_per_step=kv_read,
        flops_per_step=slots * (2 * n + attention_flops_per_token(m, average)),
        prefill_forwards=_prefill_forwards(prompts, slots, req.prompt_len),
        prefill_flops=prompts * req.prompt_len * (2 * n + attention_flops_per_token(m, req.prompt_len / 2)),
        graphs=len(set(visible)),
        layers=m.num_layers,
        compiled=slots_compile_step(prompts, slots, req.max_new_tokens),
    )


def slots_throughput(req: EstimateRequest, gpu: GpuSpec, prompts: int, replicas: int = 1) -> Throughput:
    """Generated tokens per second of the slots engine: `prompts` per copy on `req.micro_batch_size` slots."""
    rates = card_rates(gpu, req.precision)
    work = slots_work(req, prompts)
    memory_s = (work.weight_bytes_per_step + work.kv_bytes_per_step / SLOTS_BANDWIDTH_EFFICIENCY) / rates.bandwidth
    compute_s = work.flops_per_step / (rates.flops * MATMUL_EFFICIENCY)
    bound = "memory bound" if memory_s >= compute_s else "compute bound"
    kernels_s = work.layers * (SLOTS_COMPILED_LAYER_STEP_S if work.compiled else SLOTS_LAYER_STEP_S)
    eager_s = SLOTS_EAGER_LAYER_S * work.layers
    waves = f"{work.waves} wave{'s' if work.waves > 1 else ''} of {work.slots} slots"
    terms = (
        TimeTerm("prefill", work.prefill_forwards * eager_s + work.prefill_flops / (rates.flops * MATMUL_EFFICIENCY),
                 f"{work.prefill_forwards} eager forward{'s' if work.prefill_forwards > 1 else ''} of up to "
                 f"{SLOTS_PREFILL_TOKENS:,} prompt tokens, {eager_s * 1e3:.0f} ms each plus the FLOPs"),
        TimeTerm("decode: weights and KV cache", work.steps * max(memory_s, compute_s),
                 f"{work.steps} captured steps ({waves}), {bound}: the weights at the bandwidth, {work.visible:.0f} "
                 f"cache positions a slot at {SLOTS_BANDWIDTH_EFFICIENCY:.0%} of it"),
        TimeTerm("decode: step kernels", work.steps * kernels_s,
                 f"{kernels_s * 1e3:.1f} ms per step, measured (a graph replay of the "
                 f"{'compiled' if work.compiled else 'eager'} step's small kernels)"),
        TimeTerm("step compile", SLOTS_COMPILE_S if work.compiled else 0.0,
                 f"the step compiled once ({work.steps:,} steps: at least {SLOTS_COMPILE_MIN_STEPS:,})"
                 if work.compiled else f"not compiled ({work.steps:,} steps: under {SLOTS_COMPILE_MIN_STEPS:,})"),
        TimeTerm("graph capture", work.graphs * SLOTS_CAPTURE_PASSES * eager_s,
                 f"{work.graphs} visible lengths, each captured once ({SLOTS_CAPTURE_PASSES} eager passes)"),
    )
    total = sum(term.seconds for term in terms)
    tokens = prompts * req.max_new_tokens * replicas
    return Throughput(tokens_per_s=tokens / total, step_s=total, tokens_per_step=tokens, terms=terms,
                      flops_per_token=work.flops_per_step / work.slots, known=rates.known,
                      notes=("slots engine: CUDA-graph decode steps, slots refilled as sequences finish",))


def approx_tokens(chars: int) -> int:
    """Tokens in `chars` characters of text (CHARS_PER_TOKEN)."""
    return max(1, round(chars / CHARS_PER_TOKEN))
