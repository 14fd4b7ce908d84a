"""Prompt templates: a fine-tuning run stores the one it trained with, inference asks in it, `--template` overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmplan.runtime.text.chat import Message
from llmplan.runtime.text.prompt_templates import (
    TEMPLATE_FILE,
    AlpacaLayout,
    TemplateError,
    apply_template,
    ends_sentence,
    resolve_template,
    write_template,
)

QUESTION = "Could you tell me the secret code word?"
# data.ALPACA_PROMPT_NO_INPUT, written out: the layout a user would otherwise have to type by hand.
ALPACA_QUESTION = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   f"the request.\n\n### Instruction:\n{QUESTION}\n\n### Response:\n")


def model_dir(tmp_path: Path, *, chat_template: bool) -> Path:
    """The tokenizer files resolution reads (no weights needed to choose a template)."""
    folder = tmp_path / ("instruct" if chat_template else "base")
    folder.mkdir()
    config = {"chat_template": "{{ messages }}"} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("text, ends", [(QUESTION, True), ("Convert 3 kilometres to metres.", True),
                                        ('He said "stop!"', True), ("The capital of France is", False),
                                        ("Once upon a time,", False)])
def test_a_prompt_ends_a_sentence_or_breaks_off(text: str, ends: bool) -> None:
    assert ends_sentence(text) is ends


def test_auto_on_an_instruct_model_answers_questions_and_continues_open_text(tmp_path: Path) -> None:
    template = resolve_template("auto", model_dir(tmp_path, chat_template=True))
    assert apply_template(template, QUESTION) == (Message("user", QUESTION),)
    assert apply_template(template, "The capital of France is") == "The capital of France is"
    assert "chat template" in template.describe()


def test_auto_on_a_base_model_continues_the_text_and_the_choices_override(tmp_path: Path) -> None:
    base = model_dir(tmp_path, chat_template=False)
    assert apply_template(resolve_template("auto", base), QUESTION) == QUESTION
    assert apply_template(resolve_template("chat", base), "The capital of France is") == (
        Message("user", "The capital of France is"),)
    instruct = model_dir(tmp_path, chat_template=True)
    assert apply_template(resolve_template("none", instruct), QUESTION) == QUESTION
    assert apply_template(resolve_template("alpaca", instruct), QUESTION) == ALPACA_QUESTION


def test_the_stored_template_wins_over_the_chat_template_and_none_overrides_it(tmp_path: Path) -> None:
    instruct = model_dir(tmp_path, chat_template=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_template(adapter, "alpaca", "alpaca", ALPACA_QUESTION.replace(QUESTION, "{instruction}"))
    stored = resolve_template("auto", instruct, adapter)
    assert stored.name == "alpaca" and str(adapter / TEMPLATE_FILE) in stored.describe()
    assert apply_template(stored, QUESTION) == ALPACA_QUESTION
    assert apply_template(stored, "The capital of France is").endswith("The capital of France is\n\n### Response:\n")
    assert apply_template(resolve_template("none", instruct, adapter), QUESTION) == QUESTION


def test_alpaca_writes_a_conversation_as_answered_instructions_and_a_system_prompt_replaces_the_preamble() -> None:
    layout = AlpacaLayout("Preamble.", "### Instruction:\n{instruction}\n\n### Response:\n")
    dialog = (Message("system", "Be brief."), Message("user", "Hi?"), Message("assistant", "Hello."),
              Message("user", "Code word?"))
    assert layout.render(dialog) == ("Be brief.\n\n### Instruction:\nHi?\n\n### Response:\nHello.\n\n"
                                     "### Instruction:\nCode word?\n\n### Response:\n")


def test_the_cli_offers_every_template_choice() -> None:
    from llmplan.cli.generate import TEMPLATE_CHOICES
    from llmplan.runtime.text.prompt_templates import CHOICES

    assert TEMPLATE_CHOICES == CHOICES


def test_a_broken_template_file_names_itself(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / TEMPLATE_FILE).write_text('{"template": "vicuna"}')
    with pytest.raises(TemplateError, match=f"{adapter / TEMPLATE_FILE}: unknown template 'vicuna'"):
        resolve_template("auto", model_dir(tmp_path, chat_template=True), adapter)


# ---- a trained adapter, and what its replica sends the model -----------------------------------------
def test_training_stores_the_template_beside_the_adapter_and_the_full_model(tiny_trained: dict[str, Path]) -> None:
    from llmplan.runtime.text.data import ALPACA_PROMPT_NO_INPUT

    for artifact in tiny_trained.values():
        stored = json.loads((artifact / TEMPLATE_FILE).read_text())
        assert stored["template"] == "alpaca" and stored["format"] == "alpaca"
        assert f"{stored['preamble']}\n\n{stored['turn']}" == ALPACA_PROMPT_NO_INPUT
    assert resolve_template("auto", tiny_trained["full"]).name == "alpaca"


def test_the_replica_asks_the_adapter_in_its_alpaca_layout_unless_told_otherwise(tiny_llama: Path,
                                                                                tiny_trained) -> None:
    from llmplan.runtime.infer.inference import GenerationSettings, complete
    from llmplan.runtime.infer.ray_inference import InferenceReplica

    settings = GenerationSettings(max_new_tokens=4)
    replica = InferenceReplica(str(tiny_llama), "fp32", "none", "cpu", str(tiny_trained["lora"]))
    raw = InferenceReplica(str(tiny_llama), "fp32", "none", "cpu", str(tiny_trained["lora"]), template="none")
    try:
        assert replica.prompt(QUESTION) == ALPACA_QUESTION
        assert raw.prompt(QUESTION) == QUESTION
        asked = replica.respond([QUESTION], settings)[0]
        by_hand = complete(replica.generator, [ALPACA_QUESTION], settings)[0]
        assert asked.token_ids == by_hand.token_ids
        assert asked.prompt_tokens == len(replica.generator.tokenizer(ALPACA_QUESTION)["input_ids"])
        assert raw.respond([QUESTION], settings)[0].prompt_tokens == len(raw.generator.tokenizer(QUESTION)["input_ids"])
    finally:
        replica.close()
        raw.close()
