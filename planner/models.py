"""Model architectures as typed data (the litgpt `config.py` pattern).

A `ModelSpec` holds exactly the numbers of a model's published config.json; everything else
(parameter counts, linear-layer shapes for LoRA, KV width) is derived in `__post_init__` or in small
properties, so a new model is a data entry in `model_catalog.py`, never new code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Names of the linear layers inside one decoder block, per Hugging Face implementation. Phi-3 fuses
# q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (transformers `modeling_phi3.py`).
SPLIT_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SPLIT_MLP = ("gate_proj", "up_proj", "down_proj")
FUSED_ATTENTION = ("qkv_proj", "o_proj")
FUSED_MLP = ("gate_up_proj", "down_proj")
FUSED_MODEL_TYPES = frozenset({"phi3"})
MOE_MODEL_TYPES = frozenset({"mixtral"})
# transformers runs these with eager attention: Gemma-2's logit soft-capping has no SDPA path
# (transformers raises "Gemma2ForCausalLM does not support ... scaled_dot_product_attention").
EAGER_ATTENTION_MODEL_TYPES = frozenset({"gemma2"})


def attention_implementation(model_type: str) -> str:
    """The attention kernel llmplan's runtime uses (and its estimator assumes) for a model type."""
    return "eager" if model_type in EAGER_ATTENTION_MODEL_TYPES else "sdpa"


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only transformer, as its config.json describes it."""

    name: str
    model_type: str  # config.json `model_type`: llama, mistral, mixtral, qwen2, gemma, gemma2, phi3
    hidden_size: int
    intermediate_size: int  # per expert for mixture-of-experts models
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads, as config.json leaves it out
    tie_embeddings: bool = False
    num_experts: int = 1  # Mixtral `num_local_experts`
    experts_per_token: int = 1  # Mixtral `num_experts_per_tok`
    attention_bias: bool = False  # Qwen2 has biases on q, k, v
    max_position_embeddings: int = 4096
    sliding_window: int = 0  # 0: full attention on every layer
    hf_repo: str = ""  # where the config.json these numbers come from is published
    aliases: tuple[str, ...] = ()
    notes: str = ""
    params_override: int = 0  # only for specs read from checkpoints whose shapes we cannot derive
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for attr in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{self.name}: {attr} must be positive, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: grouped-query attention shrinks it by heads/kv_heads."""
        return self.num_kv_heads * self.head_dim

    @property
    def attention(self) -> str:
        return attention_implementation(self.model_type)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def fused_projections(self) -> bool:
        return self.model_type in FUSED_MODEL_TYPES

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each attention linear in one block."""
        h = self.hidden_size
        if self.fused_projections:
            return {"qkv_proj": (h, self.q_dim + 2 * self.kv_dim), "o_proj": (self.q_dim, h)}
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
        }

    def mlp_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each MLP linear of one expert (the only one for dense models)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.fused_projections:
            return {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_linears(self) -> dict[str, tuple[int, int]]:
        return {**self.attention_linears(), **self.mlp_linears()}

    # ---- parameter counts ---------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when the output projection shares the embedding matrix."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def attention_params_per_layer(self) -> int:
        weights = sum(i * o for i, o in self.attention_linears().values())
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return weights + bias

    @property
    def mlp_params_per_layer(self) -> int:
        """All experts' MLPs plus the router for mixture-of-experts models."""
        expert = sum(i * o for i, o in self.mlp_linears().values())
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        return expert * self.num_experts + router

    @property
    def norm_params_per_layer(self) -> int:
        # Llama, Mistral, Qwen2, Phi-3 and Gemma have two RMSNorms per block; Gemma-2 has four.
        return (4 if self.model_type == "gemma2" else 2) * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers: what bitsandbytes quantizes."""
        per_layer = sum(i * o for i, o in self.attention_linears().values()) + (
            sum(i * o for i, o in self.mlp_linears().values()) * self.num_experts
        )
        return per_layer * self.num_layers

    @property
    def params(self) -> int:
        if self.params_override:
            return self.params_override
        final_norm = self.hidden_size
        return self.embedding_params + self.lm_head_params + self.num_layers * self.params_per_layer + final_norm

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (mixture-of-experts routes each token to k experts)."""
        if not self.is_moe:
            return self.params
        expert = sum(i * o for i, o in self.mlp_linears().values())
        unused = (self.num_experts - self.experts_per_token) * expert * self.num_layers
        return self.params - unused

    def kv_cache_bytes_per_token(self, bytes_per_element: float) -> float:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.kv_dim * bytes_per_element
