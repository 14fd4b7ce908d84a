"""The catalog's arithmetic against real transformers / PEFT models built from the same specs."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from llmplan.planner.model_catalog import MODELS  # noqa: E402
from llmplan.planner.request import LoraSpec  # noqa: E402
from llmplan.runtime.models.modeling import LoraSettings, apply_lora, build_random_model, make_optimizer  # noqa: E402


def tiny(model_type: str):
    """The first catalog model of this type, shrunk: same architecture, small sizes."""
    spec = next(m for m in MODELS if m.model_type == model_type)
    return dataclasses.replace(
        spec, name=f"tiny-{model_type}", hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=min(spec.num_kv_heads, 2), head_dim=16, vocab_size=spec.vocab_size if model_type == "phi3" else 512,
        num_experts=min(spec.num_experts, 4),
    )


MODEL_TYPES = sorted({m.model_type for m in MODELS})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_random_model_has_the_parameter_count_the_planner_computes(model_type: str) -> None:
    spec = tiny(model_type)
    model = build_random_model(spec, "fp32", "cpu")
    assert sum(p.numel() for p in model.parameters()) == spec.params
    assert model.config._attn_implementation == spec.attention


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gemma2"])
def test_lora_trains_the_parameters_the_planner_counts_in_fp32(model_type: str) -> None:
    spec = tiny(model_type)
    model = apply_lora(build_random_model(spec, "bf16", "cpu"), LoraSettings(r=4, alpha=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == LoraSpec(r=4).params(spec)
    assert {p.dtype for p in trainable} == {torch.float32}
    optimizer = make_optimizer(model, "adamw")
    ids = torch.randint(0, spec.vocab_size, (2, 16))
    before = [p.detach().clone() for p in trainable]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
