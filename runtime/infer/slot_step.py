"""The slots engine's decode step written out for the Llama family, with one GEMM for q, k, v and one for gate, up.

transformers' forward of one new token per slot launches some 35 kernels a layer: three projections where one
would do, RMSNorm as six kernels, RoPE as ten, the cache write and mask as several more. At 8 slots of a 7B model
those small kernels cost as much as reading the weights (benchmarks/results/slots-probe-h200.jsonl). This step is
the same arithmetic as transformers' Llama, Mistral, Qwen2 and Qwen3 layers (`supports` says which models), in
fewer kernels:

- the q, k, v weights of a layer are one tensor, and so are gate and up: `fuse_projections` concatenates them
  once and makes the modules' own weights views into the result, so the model keeps working as before (prefill
  runs transformers' forward) and holds no second copy;
- on CUDA each layer's step can run compiled (`torch.compile`, Inductor: RMSNorm, RoPE, the cache write, SiLU x up
  and the residual adds become a few fused kernels; the GEMMs stay cuBLAS). All layers share one compiled graph
  (their weights are its inputs), so compiling costs one layer's time. The slots engine then captures the whole
  step as one CUDA graph either way.

Grouped-query attention packs each KV head's query heads as rows of one query (transformers' `pack_gqa`), so a
step reads each cached key once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

STEP_ACTIVATIONS = frozenset({"silu"})


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights as the step reads them (q/k norms: Qwen3; biases: Qwen2's q, k, v)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class StepShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class FusedModel:
    """What the written-out step needs of a model: its layers' fused weights and the pieces around them."""

    layers: list[LayerWeights]
    shape: StepShape
    embed: torch.nn.Module
    rotary: torch.nn.Module
    final_norm: torch.Tensor
    lm_head: torch.nn.Module


def step_shape(config: Any) -> StepShape:
    """Heads, KV heads and head size of a (text) config, as its attention and its KV cache have them."""
    heads = config.num_attention_heads
    return StepShape(heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                     head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                     eps=config.rms_norm_eps)


def supports(base: Any) -> str | None:
    """None when this step can run the (unwrapped) model; otherwise why not, and transformers' forward runs."""
    config = base.config.get_text_config()
    if getattr(config, "hidden_act", "silu") not in STEP_ACTIVATIONS:
        return f"activation {config.hidden_act!r}"
    for layer in _decoder_layers(base):
        attention, mlp = layer.self_attn, layer.mlp
        linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj]
        if any(type(linear) is not torch.nn.Linear for linear in linears):
            return "adapter or quantized layers"
    return None


def fuse_projections(base: Any) -> FusedModel:
    """Concatenate each layer's q, k, v and gate, up weights once; the modules' weights become views into them."""
    shape = step_shape(base.config.get_text_config())
    with torch.no_grad():
        layers = [_fuse_layer(layer) for layer in _decoder_layers(base)]
    decoder = base.get_decoder()
    return FusedModel(layers=layers, shape=shape, embed=decoder.embed_tokens, rotary=decoder.rotary_emb,
                      final_norm=decoder.norm.weight, lm_head=base.get_output_embeddings())


def _decoder_layers(base: Any) -> list[Any]:
    return list(base.get_decoder().layers)


def _fuse_layer(layer: Any) -> LayerWeights:
    attention, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
    gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    return LayerWeights(input_norm=layer.input_layernorm.weight, qkv=qkv, qkv_bias=qkv_bias,
                        q_norm=None if q_norm is None else q_norm.weight,
                        k_norm=None if k_norm is None else k_norm.weight,
                        o=attention.o_proj.weight, o_bias=attention.o_proj.bias,
                        post_norm=layer.post_attention_layernorm.weight, gate_up=gate_up, gate_up_bias=gate_up_bias,
                        down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears of one input; each linear's weight becomes a view of its rows.
    Fusing again (the same model, a later decoder) finds the views and returns their common tensor."""
    weight = _common_base([linear.weight for linear in linears])
    if weight is None:
        weight = torch.cat([linear.weight for linear in linears])
        _rebind(linears, "weight", weight)
    if all(linear.bias is None for linear in linears):
        return weight, None
    bias = _common_base([linear.bias for linear in linears])
    if bias is None:
        bias = torch.cat([_bias_or_zeros(linear) for linear in linears])
        _rebind(linears, "bias", bias)
    return weight, bias


def _bias_or_zeros(linear: torch.nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


def _rebind(linears: list[torch.nn.Linear], name: str, fused: torch.Tensor) -> None:
    start = 0
    for linear in linears:
        rows = linear.out_features
        setattr(linear, name, torch.nn.Parameter(fused[start: start + rows], requires_grad=False))
        start += rows


def _common_base(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor these row views were cut from by `_rebind`, if they were: one storage, consecutive rows."""
    first = tensors[0]
    if any(t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or not t.is_contiguous()
           for t in tensors):
        return None
    offset = first.storage_offset()
    for tensor in tensors:
        if tensor.storage_offset() != offset:
            return None
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                            (rows, *first.shape[1:]))


# ---- the step ---------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in fp32, cast back, then scaled."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_inputs(x: torch.Tensor, w: LayerWeights, shape: StepShape, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                     write_at: torch.Tensor) -> torch.Tensor:
    """Norm, q/k/v, RoPE; the new key and value written at each slot's position. x: (slots, hidden); keys/values:
    (slots, kv heads, length, head dim); cos/sin: (slots, 1, head dim). Returns q as (slots, kv heads, group,
    head dim): each KV head's query heads as the rows of one query."""
    slots = x.shape[0]
    h = rms_norm(x, w.input_norm, shape.eps)
    q, k, v = F.linear(h, w.qkv, w.qkv_bias).split([shape.q_size, shape.kv_size, shape.kv_size], dim=-1)
    q = q.reshape(slots, shape.heads, shape.head_dim)
    k = k.reshape(slots, shape.kv_heads, shape.head_dim)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, shape.eps)
        k = rms_norm(k, w.k_norm, shape.eps)
    keys[rows, :, write_at] = _rotate(k, cos, sin)
    values[rows, :, write_at] = v.reshape(slots, shape.kv_heads, shape.head_dim)
    return _rotate(q, cos, sin).view(slots, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, visible: int,
           shape: StepShape) -> torch.Tensor:
    """Attention over the first `visible` positions; mask: (slots, 1, 1, visible), True where a slot may attend.
    Eager in every kind of step: its length changes as sequences grow, the rest of the step's shapes do not."""
    return F.scaled_dot_product_attention(q, keys[:, :, :visible], values[:, :, :visible], attn_mask=mask,
                                          scale=shape.head_dim ** -0.5)


def layer_output(x: torch.Tensor, attended: torch.Tensor, w: LayerWeights, shape: StepShape) -> torch.Tensor:
    """o projection and residual, norm, SwiGLU MLP and residual."""
    x = x + F.linear(attended.reshape(x.shape[0], shape.q_size), w.o, w.o_bias)
    h = rms_norm(x, w.post_norm, shape.eps)
    gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down, w.down_bias)


@dataclass(frozen=True)
class StepKernels:
    """How the parts of a layer's step run: eagerly, compiled, or on Liger's Triton kernels."""

    attention_inputs: Callable[..., torch.Tensor]
    layer_output: Callable[..., torch.Tensor]


EAGER = StepKernels(attention_inputs=attention_inputs, layer_output=layer_output)


def compiled_kernels() -> StepKernels:
    """Both parts through Inductor at fixed shapes (one compile per slot count: every layer and every step of a
    decoder has the same shapes; attention, whose length grows, stays outside). No CUDA graphs of Inductor's own:
    the engine captures the whole step."""
    return StepKernels(attention_inputs=torch.compile(attention_inputs, dynamic=False),
                       layer_output=torch.compile(layer_output, dynamic=False))


def liger_kernels() -> StepKernels:
    """The parts on Liger's Triton kernels (RMSNorm, RoPE, residual add + RMSNorm, SiLU x up on the fused
    gate/up output): no compiler, a few kernels a layer."""
    from liger_kernel.ops.fused_add_rms_norm import fused_add_rms_norm_forward
    from liger_kernel.ops.rms_norm import rms_norm_forward
    from liger_kernel.ops.rope import rope_forward
    from liger_kernel.ops.swiglu import swiglu_fused_gate_up_forward

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_forward(x, weight, eps, 0.0, "llama", False)[0]

    def liger_attention_inputs(x: torch.Tensor, w: LayerWeights, shape: StepShape, cos: torch.Tensor,
                               sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                               write_at: torch.Tensor) -> torch.Tensor:
        slots = x.shape[0]
        q, k, v = F.linear(norm(x, w.input_norm, shape.eps), w.qkv, w.qkv_bias).split(
            [shape.q_size, shape.kv_size, shape.kv_size], dim=-1)
        q = q.reshape(slots, 1, shape.heads, shape.head_dim)
        k = k.reshape(slots, 1, shape.kv_heads, shape.head_dim)
        if w.q_norm is not None:
            q, k = norm(q, w.q_norm, shape.eps), norm(k, w.k_norm, shape.eps)
        q, k, _, _ = rope_forward(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys[rows, :, write_at] = k[:, :, 0]
        values[rows, :, write_at] = v.reshape(slots, shape.kv_heads, shape.head_dim)
        return q.reshape(slots, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim)

    def liger_layer_output(x: torch.Tensor, attended: torch.Tensor, w: LayerWeights,
                           shape: StepShape) -> torch.Tensor:
        projected = F.linear(attended.reshape(x.shape[0], shape.q_size), w.o, w.o_bias)
        h, x, *_ = fused_add_rms_norm_forward(projected, x, w.post_norm, shape.eps, 0.0, "llama")
        _, activated = swiglu_fused_gate_up_forward(F.linear(h, w.gate_up, w.gate_up_bias))
        return x + F.linear(activated, w.down, w.down_bias)

    return StepKernels(attention_inputs=liger_attention_inputs, layer_output=liger_layer_output)


def logits_step(fused: FusedModel, kernels: StepKernels, tokens: torch.Tensor,
                caches: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, write_at: torch.Tensor,
                mask: torch.Tensor, visible: int) -> torch.Tensor:
    """The next-token logits of every slot: (slots, vocab)."""
    x = fused.embed(tokens)
    cos, sin = fused.rotary(x, write_at[:, None])
    for w, (keys, values) in zip(fused.layers, caches):
        q = kernels.attention_inputs(x, w, fused.shape, cos, sin, keys, values, rows, write_at)
        x = kernels.layer_output(x, attend(q, keys, values, mask, visible, fused.shape), w, fused.shape)
    return fused.lm_head(rms_norm(x, fused.final_norm, fused.shape.eps))
