"""Hugging Face configs from llmplan's `ModelSpec`: the bridge from the catalog to real models.

Pure data mapping (no torch import): `hf_config_dict(spec)` returns the keyword arguments of
`transformers.AutoConfig.for_model(model_type, ...)`, so random-initialised models can be built from
any catalog entry for tests and GPU measurements.
"""

from __future__ import annotations

from typing import Any

from llmplan.planner.models import ModelSpec

# Architecture-specific keys that the catalog does not vary but the HF configs need, with the values of
# the published config.json files (Gemma-2: google/gemma-2-9b; Phi-3: microsoft/Phi-3-mini-4k-instruct).
_EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "query_pre_attn_scalar": 256,
    },
    "phi3": {"original_max_position_embeddings": 4096},
}


def hf_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """Keyword arguments for `AutoConfig.for_model(spec.model_type, **kwargs)`."""
    config: dict[str, Any] = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
    }
    if spec.is_moe:
        config["num_local_experts"] = spec.num_experts
        config["num_experts_per_tok"] = spec.experts_per_token
    if spec.sliding_window:
        config["sliding_window"] = spec.sliding_window
    if spec.model_type == "qwen2":
        config["use_sliding_window"] = False
    config.update(_EXTRA_KEYS.get(spec.model_type, {}))
    return config
