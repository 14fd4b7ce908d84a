"""The model catalog against the parameter counts its models are published with.

`ModelSpec.params` is derived from the config.json numbers in the catalog, so a count that misses
the published one means a catalog number (or the derivation) is wrong.
"""

from __future__ import annotations

import pytest

from llmplan.planner.model_catalog import MODELS, SIZE_SHORTHANDS
from llmplan.planner.models import ModelSpec

BY_NAME: dict[str, ModelSpec] = {m.name: m for m in MODELS}

# Published parameter counts (model cards / Hugging Face safetensors totals).
PUBLISHED_PARAMS: dict[str, float] = {
    "Llama-2-7B": 6.74e9,
    "Llama-2-13B": 13.0e9,
    "Llama-2-70B": 68.98e9,
    "Llama-3-8B": 8.03e9,
    "Llama-3-70B": 70.55e9,
    "Llama-3.1-8B": 8.03e9,
    "Llama-3.1-70B": 70.55e9,
    "Llama-3.1-405B": 405.9e9,
    "Llama-3.2-1B": 1.24e9,
    "Llama-3.2-3B": 3.21e9,
    "Mistral-7B": 7.24e9,
    "Mistral-7B-v0.3": 7.25e9,
    "Mixtral-8x7B": 46.7e9,
    "Qwen2.5-0.5B": 0.494e9,
    "Qwen2.5-1.5B": 1.54e9,
    "Qwen2.5-3B": 3.09e9,
    "Qwen2.5-7B": 7.62e9,
    "Qwen2.5-14B": 14.77e9,
    "Qwen2.5-32B": 32.76e9,
    "Qwen2.5-72B": 72.7e9,
    "Gemma-2B": 2.51e9,
    "Gemma-7B": 8.54e9,
    "Gemma-2-2B": 2.61e9,
    "Gemma-2-9B": 9.24e9,
    "Gemma-2-27B": 27.2e9,
    "Phi-3-mini": 3.82e9,
    "Phi-3-medium": 13.96e9,
    "SmolLM2-135M": 134.5e6,
    "SmolLM2-135M-Instruct": 134.5e6,
    "SmolLM2-360M": 361.8e6,
    "SmolLM2-1.7B": 1.71e9,
    "TinyLlama-1.1B": 1.10e9,
}

# Exact totals of the published checkpoints, where they are known to the parameter.
EXACT_PARAMS: dict[str, int] = {
    "Llama-2-7B": 6_738_415_616,
    "Llama-3.1-8B": 8_030_261_248,
    "Mistral-7B": 7_241_732_096,
    "Mixtral-8x7B": 46_702_792_704,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "Phi-3-mini": 3_821_079_552,
    "TinyLlama-1.1B": 1_100_048_384,
    "SmolLM2-135M": 134_515_008,
}


def test_every_model_has_a_published_count() -> None:
    assert set(PUBLISHED_PARAMS) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_params_match_published_count(name: str) -> None:
    published = PUBLISHED_PARAMS[name]
    params = BY_NAME[name].params
    assert abs(params - published) / published < 0.005, f"{name}: {params:,} vs published {published:,.0f}"


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_params_match_checkpoint_exactly(name: str) -> None:
    assert BY_NAME[name].params == EXACT_PARAMS[name]


def test_mixtral_active_params() -> None:
    # Mixtral-8x7B routes each token through 2 of 8 experts: 12.9B active parameters.
    mixtral = BY_NAME["Mixtral-8x7B"]
    assert mixtral.is_moe
    assert abs(mixtral.active_params - 12.9e9) / 12.9e9 < 0.005


def test_size_shorthands_name_catalog_entries() -> None:
    for shorthand, name in SIZE_SHORTHANDS.items():
        assert shorthand == shorthand.lower(), shorthand
        assert name in BY_NAME, f"{shorthand!r} -> {name!r} is not in the catalog"


def test_names_and_aliases_unique_case_insensitively() -> None:
    seen: dict[str, str] = {}
    for model in MODELS:
        for key in (model.name, *model.aliases):
            lowered = key.lower()
            assert lowered not in seen, f"{key!r} of {model.name} is also {seen[lowered]}"
            seen[lowered] = model.name
    clashes = set(seen) & set(SIZE_SHORTHANDS)
    assert not clashes, f"size shorthands that are also model names or aliases: {clashes}"


def test_hf_repo_last_component_is_a_name_or_alias() -> None:
    for model in MODELS:
        assert model.hf_repo.count("/") == 1, model.hf_repo
        last = model.hf_repo.split("/")[-1].lower()
        assert last in {model.name.lower(), *model.aliases}, f"{model.name}: {last!r} is not an alias"


def test_aliases_are_lowercase() -> None:
    for model in MODELS:
        for alias in model.aliases:
            assert alias == alias.lower(), f"{model.name}: alias {alias!r}"


def test_explicit_head_dims() -> None:
    assert {m.name: m.head_dim for m in MODELS if m.model_type in ("gemma", "gemma2")} == {
        "Gemma-2B": 256,
        "Gemma-7B": 256,
        "Gemma-2-2B": 256,
        "Gemma-2-9B": 256,
        "Gemma-2-27B": 128,
    }
    # Everyone else: head_dim = hidden_size / num_heads.
    for m in MODELS:
        if m.model_type not in ("gemma", "gemma2"):
            assert m.head_dim * m.num_heads == m.hidden_size, m.name


def test_config_details() -> None:
    # Qwen2.5: config.json vocab_size is the padded embedding, 151936 up to 3B, 152064 from 7B.
    assert {m.name: m.vocab_size for m in MODELS if m.model_type == "qwen2"} == {
        "Qwen2.5-0.5B": 151936,
        "Qwen2.5-1.5B": 151936,
        "Qwen2.5-3B": 151936,
        "Qwen2.5-7B": 152064,
        "Qwen2.5-14B": 152064,
        "Qwen2.5-32B": 152064,
        "Qwen2.5-72B": 152064,
    }
    assert all(m.attention_bias == (m.model_type == "qwen2") for m in MODELS)
    tied = {m.name for m in MODELS if m.tie_embeddings}
    assert {"Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Llama-3.2-1B", "Llama-3.2-3B"} <= tied
    assert "Qwen2.5-7B" not in tied and "Phi-3-mini" not in tied and "TinyLlama-1.1B" not in tied
    windows = {m.name: m.sliding_window for m in MODELS if m.sliding_window}
    assert windows == {
        "Mistral-7B": 4096,
        "Gemma-2-2B": 4096,
        "Gemma-2-9B": 4096,
        "Gemma-2-27B": 4096,
        "Phi-3-mini": 2047,
        "Phi-3-medium": 2047,
    }
    assert BY_NAME["Mistral-7B-v0.3"].vocab_size == 32768
    assert (BY_NAME["Mixtral-8x7B"].num_experts, BY_NAME["Mixtral-8x7B"].experts_per_token) == (8, 2)


def test_instruct_twin_matches_base() -> None:
    base, chat = BY_NAME["SmolLM2-135M"], BY_NAME["SmolLM2-135M-Instruct"]
    fields = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "vocab_size", "head_dim", "tie_embeddings", "max_position_embeddings")
    assert {f: getattr(base, f) for f in fields} == {f: getattr(chat, f) for f in fields}
