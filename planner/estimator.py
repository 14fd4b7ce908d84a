"""The memory estimator: a pure function from an `EstimateRequest` to an itemised `MemoryEstimate`.

It predicts, per GPU, what `torch.cuda.max_memory_reserved()` reports for llmplan's runtime
(`llmplan.runtime.models.modeling`: SDPA attention, expandable-segment allocator, fused torch AdamW, PEFT
LoRA adapters in fp32, bitsandbytes NF4 with double quantization), plus the CUDA context that
nvidia-smi shows on top.

How it works (nanoGPT style: every term named, every constant with its source):
1. Count bytes of each kind of tensor: weights, LoRA adapters, gradients, optimizer states, saved
   activations, logits and loss, KV cache, generation transients. One function per term.
2. A training step passes through phases; each phase holds a different set of those tensors. The
   estimate is the phase with the most bytes alive (`peak_phase`), and its terms are the breakdown.
3. The caching allocator reserves more than is allocated when large short-lived tensors (the fp32
   logits) come and go; `allocator_slack` adds that, fitted to the H200 measurements.

Constants that were not derived from the code they model were fitted to
`benchmarks/results/memory-h200.jsonl` (41 runs on an NVIDIA H200, torch 2.11, transformers 5.17,
peft 0.21, bitsandbytes 0.50.2, 2026-11-30; its 6 QLoRA runs re-measured on 2026-12-03 with the recipe of
issue 15); `tests/planner/test_estimator_accuracy.py` holds the
estimator to every one of those measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec
from .request import SLOTS_PREFILL_TOKENS, EstimateRequest, Method, Offload, Optimizer, Quant, Task, slots_cache_len

# ---- constants --------------------------------------------------------------------------------
BF16 = 2
FP32 = 4

# bitsandbytes NF4 (QLoRA paper, Dettmers et al. 2023, sec. 3): 4 bits per weight, one 8-bit absmax per
# 64-weight block (double quantization), plus one fp32 constant per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights plus an fp32 scale per output row (SCB).
INT8_BYTES_PER_PARAM = 1.0

# HF `ForCausalLMLoss` upcasts the logits to fp32 and `cross_entropy` saves its fp32 log-softmax. The peak
# comes in the loss backward: saved log-softmax (4) + incoming grad (4) + grad of the fp32 logits (4)
# = 12 bytes per logit, while every saved activation is still alive (measured: full-llama32-1b).
LOSS_BYTES_PER_LOGIT = 12
# Gemma-2 soft-caps its logits (tanh(x / 30) * 30): two more bf16 copies, one saved by tanh.
SOFTCAP_BYTES_PER_LOGIT = 4
# `generate` computes logits for the last position only and copies them to fp32.
GENERATE_LOGIT_BYTES = BF16 + FP32

# bitsandbytes 8-bit optimizers: 1 byte per state, blockwise (256) fp32 absmax; tensors with fewer than
# 4096 elements keep 32-bit states (`min_8bit_size`, bitsandbytes/optim/optimizer.py).
ADAM_8BIT_BYTES_PER_STATE = 1 + 4 / 256

# CUDA context with lazy module loading, what nvidia-smi shows beyond PyTorch's reservation:
# 72-156 MiB over the H200 runs (device_used_bytes - idle - peak_reserved); we take the largest.
CUDA_CONTEXT_BYTES = 156 * 2**20

# Each KV-cache update of HF's DynamicCache concatenates the new token onto one layer's K or V, so
# two copies of that layer's tensor are alive for a moment.
KV_CONCAT_COPIES = 1


@dataclass(frozen=True)
class Term:
    """One named line of the breakdown."""

    name: str
    bytes: int
    note: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "note": self.note}


@dataclass(frozen=True)
class MemoryEstimate:
    request: EstimateRequest
    terms: tuple[Term, ...]  # what is alive at the peak, plus allocator slack
    peak_phase: str
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    host_terms: tuple[Term, ...] = ()  # what this GPU's rank keeps in CPU memory instead (offload)

    @property
    def host_bytes(self) -> int:
        """CPU memory one rank needs for what is offloaded (0 without offload)."""
        return sum(term.bytes for term in self.host_terms)

    @property
    def peak_bytes(self) -> int:
        """Predicted `torch.cuda.max_memory_reserved()` per GPU."""
        return sum(term.bytes for term in self.terms)

    @property
    def device_bytes(self) -> int:
        """What nvidia-smi shows for the process: the reservation plus the CUDA context."""
        return self.peak_bytes + self.cuda_context_bytes

    def breakdown(self) -> dict[str, int]:
        return {term.name: term.bytes for term in self.terms}


# ---- weights ------------------------------------------------------------------------------------
def _non_linear_params(model: ModelSpec) -> int:
    """Embeddings, output head, norms and biases: what bitsandbytes leaves unquantized."""
    return model.params - model.linear_params


def weight_bytes(req: EstimateRequest) -> Term:
    model, quant = req.model, req.effective_quant
    if quant is Quant.NONE:
        # Full fine-tuning stores the trainable weights (fp32 masters in mixed precision); a frozen LoRA base
        # and inference hold them in the compute dtype.
        full = req.task is Task.FINETUNE and req.method is Method.FULL
        per_param = req.precision.param_bytes if full else req.precision.compute_bytes
        return Term("weights", int(model.params * per_param), f"{model.params / 1e9:.2f}B params x {per_param} bytes")
    quantized = NF4_BYTES_PER_PARAM if quant is Quant.NF4 else INT8_BYTES_PER_PARAM
    # The runtime keeps every non-quantized parameter (embeddings, norms, head) in the compute dtype, QLoRA
    # too (runtime.modeling.prepare_for_training: no fp32 upcast as in PEFT's prepare_model_for_kbit_training).
    rest = req.precision.compute_bytes
    total = model.linear_params * quantized + _non_linear_params(model) * rest
    return Term(
        "weights",
        int(total),
        f"{model.linear_params / 1e9:.2f}B linear params in {quant.value} ({quantized:.3f} B/param), "
        f"{_non_linear_params(model) / 1e9:.2f}B others x {rest} bytes",
    )


def _sharded_weights(term: Term, req: EstimateRequest) -> Term:
    """Inference over several GPUs splits the blocks evenly; embeddings and head sit on the end GPUs."""
    gpus = req.parallel.gpus
    if gpus == 1:
        return term
    model = req.model
    edge = max(model.embedding_params, model.lm_head_params) * req.precision.compute_bytes
    blocks = max(term.bytes - model.embedding_params * req.precision.compute_bytes
                 - model.lm_head_params * req.precision.compute_bytes, 0)
    return Term("weights", int(blocks / gpus + edge), f"1/{gpus} of the blocks plus the embedding or head (sharded)")


# DeepSpeed ZeRO-3 (and FSDP full-shard) partition the parameters over the GPUs and gather one layer's at a
# time for its forward and backward, plus the next one prefetched; with `--offload params` the partitions
# live in CPU memory and only the gathered layers are on the GPU.
ZERO3_GATHERED_LAYERS = 2


def zero3_gathered_params(model: ModelSpec) -> int:
    """Parameters ZeRO-3 holds gathered at once: the largest layer (a block, the embedding or the head) for
    each of the ZERO3_GATHERED_LAYERS. The runtime caps DeepSpeed's live parameters at this number
    (runtime.distributed.deepspeed_config), so the estimate and the run agree."""
    return ZERO3_GATHERED_LAYERS * max(model.params_per_layer, model.embedding_params, model.lm_head_params)


def _zero3_weights(term: Term, req: EstimateRequest) -> Term:
    if req.parallel.zero != 3:
        return term
    model, gpus = req.model, req.parallel.gpus
    gathered = term.bytes * zero3_gathered_params(model) / model.params
    offloaded = req.parallel.offload is Offload.PARAMS
    resident = 0 if offloaded else term.bytes / gpus
    where = "partitions in CPU memory" if offloaded else f"1/{gpus} of the weights"
    return Term("weights", int(resident + gathered), f"ZeRO-3: {where} plus {ZERO3_GATHERED_LAYERS} gathered layers")


# ---- training state ------------------------------------------------------------------------------
def trainable_params(req: EstimateRequest) -> int:
    return req.model.params if req.method is Method.FULL else req.lora.params(req.model)


def adapter_bytes(req: EstimateRequest) -> Term:
    params = req.lora.params(req.model)
    return Term("lora adapters", params * FP32, f"{params / 1e6:.1f}M params x 4 bytes (PEFT keeps adapters fp32)")


def _grad_bytes_per_param(req: EstimateRequest) -> int:
    return req.precision.param_bytes if req.method is Method.FULL else FP32


def gradient_bytes(req: EstimateRequest) -> Term:
    params = trainable_params(req)
    per = _grad_bytes_per_param(req)
    shards = req.parallel.gpus if req.parallel.zero >= 2 else 1
    on_gpu = 0 if req.parallel.zero >= 2 and req.parallel.offload is not Offload.NONE else params * per // shards
    return Term("gradients", on_gpu, f"{params / 1e6:.1f}M trainable x {per} bytes" + (f" / {shards} GPUs (ZeRO-{req.parallel.zero})" if shards > 1 else ""))


def optimizer_bytes(req: EstimateRequest) -> Term:
    params = trainable_params(req)
    if req.parallel.zero:
        # DeepSpeed keeps an fp32 master copy plus fp32 Adam moments in its optimizer (ZeRO paper, 12 bytes/param).
        per, what = 12.0, "fp32 master + Adam m, v (DeepSpeed)"
    elif req.optimizer is Optimizer.ADAMW:
        per, what = 2.0 * _grad_bytes_per_param(req), "Adam m, v in the parameters' dtype (torch fused AdamW)"
    else:
        per, what = 2 * ADAM_8BIT_BYTES_PER_STATE, "Adam m, v in 8 bits with blockwise scales (bitsandbytes)"
    shards = req.parallel.gpus if req.parallel.zero >= 1 else 1
    if req.parallel.offload is not Offload.NONE:
        return Term("optimizer states", 0, f"{what}: offloaded to CPU memory")
    note = f"{params / 1e6:.1f}M trainable x {per:g} bytes: {what}" + (f" / {shards} GPUs" if shards > 1 else "")
    return Term("optimizer states", int(params * per / shards), note)


# ---- activations ---------------------------------------------------------------------------------
# Bytes per element of the eager attention matrices Gemma-2 saves per layer: soft-capped scores (bf16,
# saved by tanh), fp32 softmax output, its bf16 copy saved by the value matmul
# (transformers `eager_attention_forward`): 2 + 4 + 2.
EAGER_ATTENTION_BYTES = 8


def activation_bytes(req: EstimateRequest) -> int:
    """Bytes per element of the activations between layers: the compute dtype, QLoRA included (its norms
    stay 16-bit, and bitsandbytes' `Linear4bit` casts each output back to its input's dtype)."""
    return req.precision.compute_bytes


# Liger's RMSNorm saves its input as it is and one fp32 reciprocal RMS per row (liger_kernel/ops/rms_norm.py),
# where transformers' saves an fp32 copy of the input.
LIGER_RSTD_BYTES = FP32


def _norm_bytes_per_token(req: EstimateRequest) -> float:
    """Two RMSNorms per block (transformers `LlamaRMSNorm`). Each saves its input upcast to fp32; when
    the norm weight trains it also saves the normalised input of the weight multiply (16-bit, or fp32
    under autocast where the residual stream stays fp32). Liger's saves the input and the fp32 RMS."""
    h = req.model.hidden_size
    if req.fused_kernels:
        return 2 * (activation_bytes(req) * h + LIGER_RSTD_BYTES)
    if req.method is not Method.FULL:
        return 2 * FP32 * h
    normalised = FP32 if req.precision.is_mixed else req.precision.compute_bytes
    return 2 * (FP32 * h + normalised * h)


def _distinct_inputs(model: ModelSpec, names: set[str]) -> list[int]:
    """Widths of the distinct tensors the named linears read: q/k/v share one, gate/up share one."""
    attention_in = {"q_proj", "k_proj", "v_proj", "qkv_proj"}
    mlp_in = {"gate_proj", "up_proj", "gate_up_proj"}
    h = model.hidden_size
    widths = []
    if names & attention_in:
        widths.append(h)
    if "o_proj" in names:
        widths.append(model.q_dim)
    if names & mlp_in:
        widths.append(h)
    if "down_proj" in names:
        widths.append(model.intermediate_size * model.experts_per_token)
    return widths


# PEFT's LoRA dropout (`nn.Dropout`, p > 0) saves a mask of one byte per element of each targeted layer's
# input for its backward, beside the dropped-out fp32 copy that lora_A saves instead of the plain one.
LORA_DROPOUT_MASK_BYTES = 1


def _linear_input_bytes_per_token(req: EstimateRequest) -> float:
    """Inputs the linear layers keep for backward.

    Autograd saves a matmul's input only when the weight needs a gradient, so:
    - full, 16-bit: each distinct input once;
    - full under autocast: every linear casts its fp32 input to 16 bits itself and saves that copy;
    - LoRA and QLoRA: the frozen base saves nothing (bitsandbytes' 4-bit matmul keeps only the quantized
      weight for the input gradient), but PEFT casts the input of every targeted layer to the adapters'
      fp32 and lora_A saves that copy (plus lora_B's r-wide input), and with dropout its mask.
    """
    model, r = req.model, req.lora.r
    linears = model.block_linears()
    if req.method is Method.FULL:
        if req.precision.is_mixed:
            return BF16 * sum(fan_in for fan_in, _ in linears.values())
        return req.precision.compute_bytes * sum(_distinct_inputs(model, set(linears)))
    targets = req.lora.target_shapes(model)
    adapters_r = FP32 * r * len(targets)
    per_input = FP32 + (LORA_DROPOUT_MASK_BYTES if req.lora_dropout > 0 else 0)
    return per_input * sum(fan_in for fan_in, _ in targets.values()) + adapters_r


# PyTorch's fused SDPA kernels refuse fp32 grouped-query attention ("both fused kernels require query, key
# and value to have the same num_heads"), so QLoRA's fp32 activations on a GQA model fall back to the math
# kernel. It keeps the scaled q, the k and v expanded to every head (3 x q width, fp32) and the fp32 softmax
# (batch x heads x seq x seq). Checked on the H200 (benchmarks/sdpa_fp32_probe.py ->
# benchmarks/results/sdpa-fp32-h200.json): exact for Qwen2.5-1.5B and -3B shapes.
MATH_SDPA_SOFTMAX_BYTES = FP32


def _math_sdpa(req: EstimateRequest) -> bool:
    m = req.model
    return m.attention == "sdpa" and activation_bytes(req) == FP32 and m.num_kv_heads < m.num_heads


def _attention_bytes_per_token(req: EstimateRequest) -> float:
    """SDPA's fused kernels save q, k, v and the output (no score matrix); the math kernel saves the
    scaled q, k and v expanded to every head, and the softmax (heads x seq per token)."""
    m = req.model
    if _math_sdpa(req):
        return FP32 * 3 * m.q_dim + MATH_SDPA_SOFTMAX_BYTES * m.num_heads * req.seq_len
    return activation_bytes(req) * (2 * m.q_dim + 2 * m.kv_dim)


def _mlp_bytes_per_token(req: EstimateRequest) -> float:
    """The gated MLP saves the gate output (for the activation), the up output and the activation output
    (for their product); Liger's fused SwiGLU / GeGLU saves the gate and up outputs only and recomputes the
    activation in backward."""
    widths = 2 if req.fused_kernels else 3
    return activation_bytes(req) * widths * req.model.intermediate_size * req.model.experts_per_token


# A decoder layer through torch.compile (the recipe's regional compilation, LoRA on CUDA) saves less for backward:
# Inductor's partitioner recomputes cheap element-wise outputs (the norms', SwiGLU's) in backward instead of
# keeping them. Fitted on the one H200 run there is (benchmarks/results/long-context-compile-recipe-h200.jsonl,
# Llama-3-8B, LoRA r 16 all-linear, 2 x 2,048 tokens: 41.12 GiB compiled against 46.55 eager): 1.55 MLP-width
# 16-bit values per token and layer fewer.
COMPILED_LAYER_SAVED_MLP_WIDTHS = 1.55


def layer_bytes_per_token(req: EstimateRequest) -> float:
    """Activations one decoder layer saves for backward, per token."""
    saved = (
        _norm_bytes_per_token(req)
        + _linear_input_bytes_per_token(req)
        + _attention_bytes_per_token(req)
        + _mlp_bytes_per_token(req)
    )
    if req.compiled_layers:
        saved -= COMPILED_LAYER_SAVED_MLP_WIDTHS * req.model.intermediate_size * activation_bytes(req)
    return saved


def _eager_attention_bytes_per_layer(req: EstimateRequest) -> float:
    if req.model.attention != "eager":
        return 0.0
    return EAGER_ATTENTION_BYTES * req.micro_batch_size * req.model.num_heads * req.seq_len**2


# Backward through a LoRA-adapted linear briefly holds the gradient of its input twice: fp32 from lora_A
# (the adapters' dtype) and 16-bit from the frozen base, before they are summed. The widest input is the
# down projection's (the MLP width). It shows where no logits dominate: with checkpointing (the recomputed
# layer's backward) and under Liger's loss (the last layer's backward, every activation still alive).
# Fitted to issue 15's H200 runs.
def backward_transient_term(req: EstimateRequest) -> Term:
    if req.method is Method.FULL or not (req.gradient_checkpointing or req.fused_kernels):
        return Term("backward transients", 0, "none")
    widest = max(fan_in for fan_in, _ in req.lora.target_shapes(req.model).values())
    per_element = FP32 + activation_bytes(req)
    # Without Liger's SwiGLU (which writes them in place) the gate's and the up projection's output gradients
    # are two more 16-bit tensors of the MLP width.
    mlp = 0 if req.fused_kernels else 2 * activation_bytes(req) * req.model.intermediate_size * req.model.experts_per_token
    return Term("backward transients", int(req.tokens * (widest * per_element + mlp)),
                f"{req.tokens} tokens x {widest} (widest adapted input) x {per_element} bytes: input gradients"
                + ("" if req.fused_kernels else ", plus the gate and up gradients"))


# With activation offload (runtime.modeling.checkpoint_offloading_inputs) each checkpointed layer input is
# copied to pinned CPU memory as the forward saves it and copied back when backward recomputes its layer.
# What stays on the GPU is a few layer inputs' worth: the input being recomputed, its output gradient and the
# residual gradient beside it. Fitted to issue 15's two H200 runs with offload (Llama-3-8B shape, 8 layers,
# LoRA at 16k and QLoRA at 32k tokens, Liger's kernels): 3 layer inputs.
OFFLOADED_INPUTS_ON_GPU = 3


def checkpoint_bytes_per_layer(req: EstimateRequest) -> int:
    """One checkpointed layer input: tokens x hidden in the residual stream's dtype (fp32 under autocast)."""
    residual = FP32 if req.precision.is_mixed else activation_bytes(req)
    return req.tokens * req.model.hidden_size * residual


def _checkpoints_term(req: EstimateRequest) -> Term:
    m, per_layer = req.model, checkpoint_bytes_per_layer(req)
    if req.activation_offload:
        kept = min(OFFLOADED_INPUTS_ON_GPU, m.num_layers)
        return Term("checkpointed layer inputs", kept * per_layer,
                    f"offloaded to CPU memory; {kept} layer inputs' worth on the GPU while backward brings them back")
    return Term("checkpointed layer inputs", m.num_layers * per_layer,
                f"{m.num_layers} layers x {req.tokens} tokens x hidden x {per_layer // (req.tokens * m.hidden_size)} bytes")


def activation_terms(req: EstimateRequest) -> tuple[Term, ...]:
    m, tokens = req.model, req.tokens
    per_layer = layer_bytes_per_token(req) * tokens + _eager_attention_bytes_per_layer(req)
    if not req.gradient_checkpointing:
        return (Term("activations", int(per_layer * m.num_layers),
                     f"{m.num_layers} layers x {tokens} tokens x {layer_bytes_per_token(req) / 1024:.0f} KiB"),
                backward_transient_term(req))
    return (
        _checkpoints_term(req),
        Term("recomputed layer", int(per_layer), "one layer's activations, rebuilt during backward"),
        backward_transient_term(req),
    )


# ---- host memory (offload) -------------------------------------------------------------------------
# DeepSpeed's CPU offload keeps, per trainable parameter, the fp32 master, Adam's m and v and an fp32 gradient
# buffer in CPU memory (ZeRO-Offload, Ren et al. 2021: 16 bytes), each rank its 1/gpus partition.
OFFLOADED_OPTIMIZER_BYTES_PER_PARAM = 16


def host_terms(req: EstimateRequest) -> tuple[Term, ...]:
    """What one rank keeps in CPU memory: DeepSpeed's offloaded optimizer (and parameters), and the
    checkpointed layer inputs under activation offload."""
    terms = []
    gpus = req.parallel.gpus
    if req.parallel.offload is not Offload.NONE:
        trainable = trainable_params(req)
        terms.append(Term("offloaded optimizer", trainable * OFFLOADED_OPTIMIZER_BYTES_PER_PARAM // gpus,
                          f"{trainable / 1e6:.1f}M trainable x {OFFLOADED_OPTIMIZER_BYTES_PER_PARAM} bytes (fp32 master, "
                          f"Adam m, v, gradient)" + (f" / {gpus} ranks" if gpus > 1 else "")))
    if req.parallel.offload is Offload.PARAMS:
        weights = req.model.params * req.precision.compute_bytes
        terms.append(Term("offloaded parameters", weights // gpus, "16-bit weights, partitioned (ZeRO-3)"))
    if req.activation_offload:
        layers = req.model.num_layers
        terms.append(Term("offloaded layer inputs", layers * checkpoint_bytes_per_layer(req),
                          f"{layers} checkpointed layer inputs in pinned CPU memory"))
    return tuple(terms)


def liger_loss_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of logits Liger's fused linear cross-entropy materialises at once: about tokens x hidden / vocab,
    rounded up to a power of two (liger_kernel/ops/fused_linear_cross_entropy.py, chunk_mem_const 1)."""
    inc_factor = -(-vocab // hidden)
    rows = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())
    return min(rows, tokens)


def fused_loss_term(req: EstimateRequest) -> Term:
    """Liger's fused linear cross-entropy never holds the whole logits: it computes the loss and the gradient
    of the hidden states chunk by chunk in the forward pass, keeping that gradient (tokens x hidden), one
    chunk of logits and, when the head trains, its gradient accumulator (in the weights' dtype)."""
    m, width = req.model, activation_bytes(req)
    chunk = liger_loss_chunk_rows(req.tokens, m.vocab_size, m.hidden_size)
    total = req.tokens * m.hidden_size * width + chunk * m.vocab_size * width + req.tokens * FP32
    if req.method is Method.FULL:
        total += m.lm_head_params * req.precision.param_bytes if m.lm_head_params else m.embedding_params * req.precision.param_bytes
    return Term("fused loss", int(total), f"hidden-state gradient + {chunk} rows of logits at a time (Liger)")


def logits_term(req: EstimateRequest) -> Term:
    if req.fused_kernels:
        return fused_loss_term(req)
    m = req.model
    per_logit = LOSS_BYTES_PER_LOGIT + (SOFTCAP_BYTES_PER_LOGIT if m.model_type == "gemma2" else 0)
    logits = req.tokens * m.vocab_size
    return Term("logits and loss", int(logits * per_logit), f"{req.tokens} tokens x {m.vocab_size} vocab x {per_logit} bytes (fp32 loss)")


def tied_embedding_gradient_term(req: EstimateRequest) -> Term:
    """With tied embeddings the embedding's gradient (vocab x hidden) is computed apart and then added to
    the head's, so the end of a full fine-tune's backward holds one more copy (issue 15: Qwen2.5-1.5B)."""
    m = req.model
    if req.method is not Method.FULL or not m.tie_embeddings:
        return Term("tied embedding gradient", 0, "none")
    return Term("tied embedding gradient", m.embedding_params * req.precision.param_bytes,
                "the embedding's gradient before it is added to the tied head's")


def autocast_copies_term(req: EstimateRequest) -> Term:
    """Autocast caches a 16-bit copy of every linear weight for the forward pass; matmuls save them for
    backward unless checkpointing drops them."""
    if not (req.precision.is_mixed and req.method is Method.FULL) or req.gradient_checkpointing:
        return Term("autocast weight copies", 0, "none")
    copies = req.model.linear_params + req.model.lm_head_params + (req.model.embedding_params if req.model.tie_embeddings else 0)
    return Term("autocast weight copies", copies * BF16, "16-bit copies of the linear weights saved by autocast")


# ---- inference -------------------------------------------------------------------------------------
# Prefill (one forward over the whole prompt, no grad) keeps a few full-width tensors of one layer alive
# at once: the MLP's gate, up and activation outputs, and the residual stream, its fp32 norm input and
# q/k/v. Fitted to the H200 runs: 3 x intermediate + 10 x hidden bytes per token (bf16).
PREFILL_MLP_WIDTHS = 3
PREFILL_HIDDEN_WIDTHS = 10


def kv_cache_term(req: EstimateRequest, tokens_per_sequence: int) -> Term:
    m = req.model
    cached = tokens_per_sequence
    window_layers = m.num_layers // 2 if m.model_type == "gemma2" else (m.num_layers if m.sliding_window else 0)
    full_layers = m.num_layers - window_layers
    windowed = min(cached, m.sliding_window) if m.sliding_window else cached
    per_layer_token = 2 * m.kv_dim * req.precision.compute_bytes * req.micro_batch_size
    total = per_layer_token * (full_layers * cached + window_layers * windowed)
    total += KV_CONCAT_COPIES * per_layer_token * cached / 2  # one K or V being concatenated
    shards = req.parallel.gpus
    return Term("kv cache", int(total / shards), f"2 x {m.num_layers} layers x {m.kv_dim} (K,V width) x {cached} tokens x batch {req.micro_batch_size}"
                + (f" / {shards} GPUs" if shards > 1 else ""))


def prefill_term(req: EstimateRequest, tokens: int | None = None) -> Term:
    """One layer's temporaries over the prompt tokens one forward takes in (default: the whole batch's)."""
    m = req.model
    tokens = req.micro_batch_size * req.prompt_len if tokens is None else tokens
    per_token = req.precision.compute_bytes * (PREFILL_MLP_WIDTHS * m.intermediate_size + PREFILL_HIDDEN_WIDTHS * m.hidden_size / 2)
    eager = 0.0
    if m.attention == "eager":
        eager = EAGER_ATTENTION_BYTES * req.micro_batch_size * m.num_heads * req.prompt_len**2
    return Term("prefill activations", int(tokens * per_token + eager), f"one layer's temporaries over {tokens} prompt tokens")


# The fast engines (runtime.engine: on one GPU, 16-bit weights) allocate their whole KV cache up front (static
# or paged: the "last token" phase's cache, from the start) and a workspace: the fp32 logits of one continuous-
# batching step of up to FAST_ENGINE_STEP_TOKENS tokens (runtime.engine.PREFILL_TOKENS), in which the CUDA
# graphs' memory pools also fit (H200, 7B shape: the engines' peaks within 1.2% with this term; BENCHMARKS.md).
FAST_ENGINE_STEP_TOKENS = 2048


def engine_workspace_term(req: EstimateRequest) -> Term:
    size = FAST_ENGINE_STEP_TOKENS * req.model.vocab_size * FP32 if req.transformers_fast_engine else 0
    return Term("engine workspace", size, f"fp32 logits of a {FAST_ENGINE_STEP_TOKENS}-token continuous-batching step"
                " (CUDA graph pools fit inside)")


# The slots engine (runtime.infer.slots) allocates its static cache whole at the start: every slot's longest
# sequence, rounded up to SLOTS_CACHE_ALIGN positions. Its peak is a refill: the whole cache, plus the prefill's
# own dynamic cache of up to SLOTS_PREFILL_TOKENS padded prompt tokens (copied into the slots after the forward)
# and that forward's activations. Its CUDA graphs keep one step's logits each (in one pool).
def slots_cache_term(req: EstimateRequest) -> Term:
    m, positions = req.model, slots_cache_len(req.prompt_len, req.max_new_tokens)
    size = req.micro_batch_size * positions * m.kv_cache_bytes_per_token(req.precision.compute_bytes)
    return Term("kv cache (static slots)", int(size),
                f"2 x {m.num_layers} layers x {m.kv_dim} (K,V width) x {positions} positions x {req.micro_batch_size} slots")


def slots_prefill_tokens(req: EstimateRequest) -> int:
    return min(SLOTS_PREFILL_TOKENS, req.micro_batch_size * req.prompt_len)


def slots_prefill_cache_term(req: EstimateRequest) -> Term:
    tokens = slots_prefill_tokens(req)
    size = tokens * req.model.kv_cache_bytes_per_token(req.precision.compute_bytes)
    return Term("prefill cache", int(size), f"the refill's keys and values of {tokens} prompt tokens before they go into slots")


def slots_step_logits_term(req: EstimateRequest) -> Term:
    size = req.micro_batch_size * req.model.vocab_size * req.precision.compute_bytes
    return Term("decode step logits", int(size), f"one step's logits, {req.micro_batch_size} slots (CUDA graph pool)")


def generate_logits_term(req: EstimateRequest) -> Term:
    return Term("logits", int(req.micro_batch_size * req.model.vocab_size * GENERATE_LOGIT_BYTES), "last position only, copied to fp32")


# ---- allocator ---------------------------------------------------------------------------------------
# With expandable segments the reservation stays close to the peak allocation; what it adds comes mostly
# from the fp32 logits, a tensor of gigabytes that is freed and re-requested at other sizes in the loss
# backward. Measured on the H200 (reserved - allocated, 41 runs), per situation:
#   inference: under 0.2 GiB                          -> 64 MiB + 1% of the allocation
#   training, peak at the end of backward: ~1 GiB     -> 512 MiB + 1% of the allocation
#   QLoRA (logits are born fp32, no 16-bit copy): 0.3-0.6 GiB -> 400 MiB
#   LoRA / full without checkpointing: 0.2-0.7 x the fp32 logits -> 512 MiB + 0.4 x fp32 logits
#   LoRA / full with checkpointing: 1.0-1.3 x the fp32 logits     -> 100 MiB + 1.05 x fp32 logits
MiB = 2**20
SLACK_INFER = (64 * MiB, 0.01, 0.0)  # (fixed bytes, share of the allocation, share of the fp32 logits)
SLACK_END_OF_BACKWARD = (512 * MiB, 0.01, 0.0)
SLACK_NO_CHECKPOINTING = (512 * MiB, 0.0, 0.4)
SLACK_CHECKPOINTING = (100 * MiB, 0.0, 1.05)
# Issue 15's H200 runs (bf16 QLoRA, 2k-32k tokens): QLoRA with checkpointing keeps 0.59-0.76 x the fp32
# logits where the loss backward is the peak (where the recomputed layer is, as with small vocabularies, the
# rule of LoRA with checkpointing holds); under Liger's loss no logits-sized tensor comes and goes, and what stays follows the backward
# transients (share of that term) instead.
SLACK_QLORA_CHECKPOINTING = (100 * MiB, 0.0, 0.72)
SLACK_FUSED_LOSS = (256 * MiB, 0.0, 0.0)
FUSED_SLACK_SHARE_OF_TRANSIENTS = 0.7


def _slack_rule(req: EstimateRequest, phase: str) -> tuple[int, float, float]:
    if req.task is Task.INFER:
        return SLACK_INFER
    if phase == "end of backward":
        return SLACK_END_OF_BACKWARD
    if req.fused_kernels:
        return SLACK_FUSED_LOSS
    if req.gradient_checkpointing:
        qlora_loss = req.method is Method.QLORA and phase == "loss backward"
        return SLACK_QLORA_CHECKPOINTING if qlora_loss else SLACK_CHECKPOINTING
    return SLACK_NO_CHECKPOINTING


def allocator_slack(req: EstimateRequest, phase: str, allocated: int) -> Term:
    fixed, allocation_share, logits_share = _slack_rule(req, phase)
    fp32_logits = req.tokens * req.model.vocab_size * FP32 if req.task is Task.FINETUNE else 0
    slack = fixed + allocation_share * allocated + logits_share * fp32_logits
    if req.task is Task.FINETUNE and req.fused_kernels and phase != "end of backward":
        slack += FUSED_SLACK_SHARE_OF_TRANSIENTS * backward_transient_term(req).bytes
    return Term("allocator slack", int(slack), "reserved beyond allocated (expandable segments), measured on H200")


# ---- phases --------------------------------------------------------------------------------------------
def _finetune_phases(req: EstimateRequest) -> dict[str, tuple[Term, ...]]:
    resident = [_zero3_weights(weight_bytes(req), req), optimizer_bytes(req)]
    if req.method is not Method.FULL:
        resident.insert(1, adapter_bytes(req))
    grads = gradient_bytes(req)
    # DDP and ZeRO allocate gradient buffers once and keep them between steps.
    persistent_grads = req.parallel.gpus > 1 or req.parallel.zero > 0
    during_step = [grads] if persistent_grads else []
    activations = activation_terms(req)
    # Under Liger's loss no logits are alive when the layers' backward starts: its transients add instead.
    first_backward = activations[1:] if req.fused_kernels and not req.gradient_checkpointing else ()
    phases = {
        "loss backward": (*resident, *during_step, *activations[:1], logits_term(req), autocast_copies_term(req),
                          *first_backward),
        "end of backward": (*resident, grads, tied_embedding_gradient_term(req)),
    }
    if req.gradient_checkpointing:
        phases["recompute"] = (*resident, *during_step, *activations)
    return phases


def _infer_phases(req: EstimateRequest) -> dict[str, tuple[Term, ...]]:
    weights = _sharded_weights(weight_bytes(req), req)
    if req.slots_engine:
        cache = slots_cache_term(req)
        return {
            "refill": (weights, cache, slots_prefill_cache_term(req), prefill_term(req, slots_prefill_tokens(req)),
                       generate_logits_term(req), slots_step_logits_term(req)),
            "decode": (weights, cache, slots_step_logits_term(req), generate_logits_term(req)),
        }
    return {
        "prefill": (weights, kv_cache_term(req, req.prompt_len), prefill_term(req), generate_logits_term(req)),
        "last token": (weights, kv_cache_term(req, req.prompt_len + req.max_new_tokens), generate_logits_term(req),
                       engine_workspace_term(req)),
    }


def estimate(req: EstimateRequest) -> MemoryEstimate:
    """Itemised per-GPU memory at the peak of the run `req` describes."""
    phases = _infer_phases(req) if req.task is Task.INFER else _finetune_phases(req)
    phase, terms = max(phases.items(), key=lambda item: sum(term.bytes for term in item[1]))
    kept = tuple(term for term in terms if term.bytes > 0)
    allocated = sum(term.bytes for term in kept)
    host = host_terms(req) if req.task is Task.FINETUNE else ()
    return MemoryEstimate(request=req, terms=(*kept, allocator_slack(req, phase, allocated)), peak_phase=phase,
                          host_terms=host)
