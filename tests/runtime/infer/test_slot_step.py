"""The slots engine's written-out decode step (runtime.infer.slot_step) against transformers' own forward, on CPU:
each family it runs (Llama with GQA, Mistral, Qwen2's q/k/v biases, Qwen3's q/k norms) gives `generate`'s greedy
tokens; fusing the projections leaves the model computing what it did, in the same memory; adapters keep
transformers' forward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmplan.runtime.infer import slot_step, slots  # noqa: E402
from llmplan.runtime.infer.generation import GenerationSettings  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=24)),
}
# Two prompts long enough that 12 new tokens take them past the first block of 64 cache positions.
PROMPTS = [[5, 17, 33, 2], [(7 * i) % 90 + 3 for i in range(58)], [60, 3, 8, 12, 70, 1, 44], [22],
           [(11 * i) % 85 + 5 for i in range(61)]]


def build(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if family == "qwen2":  # transformers initialises biases to zero: give them values the step must add
        with torch.no_grad():
            for layer in model.model.layers:
                for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    linear.bias.normal_(0, 0.5)
    return model


def generate_one_by_one(model, new: int) -> list[list[int]]:
    """Each prompt alone, to `new` tokens (no stop token: the slots below stop at none either)."""
    model.generation_config.eos_token_id = None
    out = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(prompt):].tolist())
    return out


def through_slots(model, new: int, slot_count: int) -> tuple[list[list[int]], str]:
    """Every prompt's greedy tokens from the slots engine, and the kind of step its decoder ran."""
    settings = GenerationSettings(max_new_tokens=new, batch_size=slot_count, engine="slots")
    decoders = slots.Decoders()
    with torch.inference_mode():
        finished = slots.generate(model, PROMPTS, settings, stop_ids=[], decoders=decoders)
        tokens = [list(done.token_ids) for done in sorted(finished, key=lambda done: done.index)]
    return tokens, decoders.current.step_kind


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_decodes_generates_greedy_tokens_with_the_fused_step(family: str) -> None:
    """Two slots for five prompts (refills); attention crosses a block of 64 positions on the long prompts."""
    model = build(family)
    got, step = through_slots(model, 12, 2)
    assert step == "fused"
    assert got == generate_one_by_one(model, 12)
    assert len({tuple(ids) for ids in got}) == len(PROMPTS)


def test_fusing_keeps_the_models_outputs_and_memory_and_a_second_fusion_reuses_the_first() -> None:
    model = build("qwen2")
    ids = torch.tensor([PROMPTS[2]])
    before = model(ids).logits
    parameters_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fused = slot_step.fuse_projections(model)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.untyped_storage().data_ptr() == fused.layers[0].qkv.untyped_storage().data_ptr()
    assert fused.layers[0].qkv.shape == (64 + 2 * 32, 64)
    assert torch.equal(model(ids).logits, before)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == parameters_bytes
    again = slot_step.fuse_projections(model)
    assert all(a.qkv.data_ptr() == b.qkv.data_ptr() and a.gate_up.data_ptr() == b.gate_up.data_ptr()
               and torch.equal(a.qkv_bias, b.qkv_bias) for a, b in zip(fused.layers, again.layers))


def test_a_model_with_a_lora_adapter_keeps_transformers_forward_and_its_tokens() -> None:
    from peft import LoraConfig, get_peft_model

    model = build("llama")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    assert "adapter" in slot_step.supports(peft_model.get_base_model())
    got, step = through_slots(peft_model, 12, 3)
    assert step == "transformers"
    assert got == generate_one_by_one(peft_model, 12)


def test_the_written_out_step_and_transformers_forward_give_the_same_logits() -> None:
    model = build("qwen3")
    logits = {}
    with torch.inference_mode():
        for kind in ("transformers", "fused"):
            decoder = slots._Decoder(model, slots=3, length=64, step=kind)
            decoder.prefill([0, 1, 2], PROMPTS[:3], None)
            decoder.step(decoder.visible(max(len(p) for p in PROMPTS[:3])))
            logits[kind] = decoder.logits.clone()
    torch.testing.assert_close(logits["fused"], logits["transformers"], rtol=1e-5, atol=1e-5)
