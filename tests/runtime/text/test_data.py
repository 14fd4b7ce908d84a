"""Fine-tuning data: formats and their errors, templates and label masks (SmolLM2's tokenizer), truncation,
packing, split, batches, and the example data sets in examples/data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmplan.runtime.text.chat import Message, Role, format_chat, llama2_chat_prompt
from llmplan.runtime.text.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    TokenizedExample,
    alpaca_prompt,
    build_datasets,
    collate,
    model_inputs,
    pack,
    pad_token_id,
    segments,
    split,
    tokenize_example,
)
from llmplan.runtime.text.data_formats import DataError, Example, detect_format, load_examples
from llmplan.runtime.train.train_config import DataConfig

DATA = Path(__file__).resolve().parents[3] / "examples" / "data"

ALPACA = {"instruction": "Add 2 and 3.", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
TWO_TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Red."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.path))


def encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# ---- formats ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("record", "name"), [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages")])
def test_the_format_is_told_from_the_first_record(tmp_path: Path, record: dict, name: str) -> None:
    assert detect_format(write_jsonl(tmp_path / "d.jsonl", [record, record])) == name
    array = tmp_path / "d.json"
    array.write_text(json.dumps([record, record], indent=2), encoding="utf-8")
    assert detect_format(array) == name
    assert len(load_examples(array)) == 2


def test_each_format_loads_as_examples(tmp_path: Path) -> None:
    with_input = {"instruction": "Sort.", "input": "b, a", "output": "a, b"}
    assert load_examples(write_jsonl(tmp_path / "a.jsonl", [ALPACA, with_input])) == [
        Example.instruct("Add 2 and 3.", "5"), Example.instruct("Sort.", "a, b", input="b, a")]
    system = dict(SHAREGPT, system="Be brief.")
    sharegpt = load_examples(write_jsonl(tmp_path / "s.jsonl", [system]))[0]
    assert sharegpt.dialog == (Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Hi"),
                               Message(Role.ASSISTANT, "Hello!"))
    messages = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": TWO_TURNS}]))[0]
    assert [m.content for m in messages.dialog] == ["Name a colour.", "Blue.", "Another?", "Red."]


def test_a_first_record_of_no_known_format_says_which_keys_to_use(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d.jsonl:2: cannot tell the format .*keys: prompt, completion"):
        detect_format(write_jsonl(tmp_path / "d.jsonl", ["", {"prompt": "a", "completion": "b"}]))


GOOD = {"alpaca": ALPACA, "sharegpt": SHAREGPT, "messages": MESSAGES}
BAD_RECORDS = [
    # (format, line 7, field, what the message says)
    ("alpaca", '{"instruction": "x", "output": ', None, "not valid JSON"),
    ("alpaca", {"instruction": "x"}, "output", "missing"),
    ("alpaca", {"instruction": "x", "output": "  "}, "output", "is empty"),
    ("alpaca", {"instruction": "x", "output": 5}, "output", "must be text, got a number"),
    ("alpaca", {"instruction": ["x"], "output": "y"}, "instruction", "must be text, got a list"),
    ("alpaca", {"instruction": "x", "input": 3, "output": "y"}, "input", "must be text"),
    ("alpaca", {"output": "y"}, "instruction", "missing (the file's format is alpaca"),
    ("alpaca", ["x", "y"], None, "each record must be a JSON object (alpaca format), got a list"),
    ("messages", {"messages": "hi"}, "messages", "must be a list of messages"),
    ("messages", {"messages": []}, "messages", "is empty"),
    ("messages", {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "unknown role 'bot'"),
    ("messages", {"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0]", "unknown keys name"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "is empty"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "messages",
     "the last message is from the user: end a training dialog with the assistant's answer"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                               {"role": "assistant", "content": "c"}]},
     "messages", "message 2 is from the user, expected the assistant"),
    ("messages", {"messages": [{"role": "assistant", "content": "a"}]}, "messages",
     "only the assistant's answer: add the user message"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "unknown speaker"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]},
     "conversations[1].value", "missing"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "conversations", "human is the user, gpt the assistant"),
]


@pytest.mark.parametrize(("fmt", "bad", "field", "says"), BAD_RECORDS)
def test_a_malformed_record_is_named_by_file_line_and_field(tmp_path: Path, fmt, bad, field, says) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt]] * 5 + [""] + [bad] + [GOOD[fmt]] * 3)
    with pytest.raises(DataError) as caught:
        load_examples(path)
    problem = caught.value.first
    assert (problem.path, problem.line, problem.index, problem.field) == (str(path), 7, None, field)
    assert says in problem.message
    assert caught.value.count == 1
    assert str(caught.value).startswith(f"{path}:7: " + (f"field {field}: " if field else ""))


def test_a_json_array_names_the_index_and_line_of_the_bad_record(tmp_path: Path) -> None:
    records = [ALPACA, ALPACA, ALPACA, {"instruction": "x", "output": None}, ALPACA]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")  # each record spans 4 lines after "["
    with pytest.raises(DataError) as caught:
        load_examples(path)
    problem = caught.value.first
    assert (problem.line, problem.index, problem.field) == (2 + 3 * 4, 3, "output")
    assert str(caught.value) == f"{path}:14 (array index 3): field output: must be text, got null"


def test_a_json_array_with_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"data.json:3 \(array index 1\): not valid JSON \(Expecting ','"):
        load_examples(path)


def test_the_whole_file_is_checked_and_the_first_five_problems_reported(tmp_path: Path) -> None:
    bad = {"instruction": "x"}
    path = write_jsonl(tmp_path / "data.jsonl", ["{oops", bad, ALPACA] + [bad] * 7)
    with pytest.raises(DataError) as caught:
        load_examples(path)  # the format comes from the first record that is JSON (line 2)
    assert caught.value.count == 9
    assert [p.line for p in caught.value.problems] == [1, 2, 4, 5, 6]
    assert [p.field for p in caught.value.problems] == [None, "output", "output", "output", "output"]
    assert str(caught.value).splitlines()[-1] == "... and 4 more problems: fix these and run again"


def test_a_named_format_checks_every_record_against_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [MESSAGES])
    assert load_examples(path, "messages")[0].is_dialog
    with pytest.raises(DataError, match="field instruction: missing .the file's format is alpaca; this record has "
                                        "keys: messages"):
        load_examples(path, "alpaca")
    with pytest.raises(DataError, match="unknown format 'csv': use auto, alpaca, sharegpt, messages"):
        load_examples(path, "csv")


@pytest.mark.parametrize(("text", "says"), [(None, "no such file"), ("\n\n", "the file has no records"),
                                            ("[]", "the file has no records")])
def test_a_missing_or_empty_file_says_what_to_give(tmp_path: Path, text, says) -> None:
    path = tmp_path / "data.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=says):
        load_examples(path)


def test_loading_data_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys\nfrom llmplan.runtime.text.data_formats import load_examples, detect_format\n"
            f"assert len(load_examples({str(DATA / 'alpaca_llmplan.jsonl')!r})) >= 200\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- templates and labels -----------------------------------------------------------------------
def test_the_alpaca_prompt_is_stanford_alpacas_text() -> None:
    assert alpaca_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert alpaca_prompt("Sort these.", "b, a") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSort these.\n\n"
        "### Input:\nb, a\n\n### Response:\n"
    )
    assert ALPACA_PROMPT.count("{input}") == 1 and "{input}" not in ALPACA_PROMPT_NO_INPUT


def test_alpaca_labels_mask_the_prompt_and_learn_the_response_and_eos(tokenizer) -> None:
    example = Example.instruct("Sort these.", "a, b", input="b, a")
    tokenized = tokenize_example(example, tokenizer, "auto", seq_len=512)
    prompt = encode(tokenizer, alpaca_prompt("Sort these.", "b, a"), special=True)
    response = encode(tokenizer, "a, b") + [tokenizer.eos_token_id]
    assert tokenized.input_ids == (*prompt, *response)
    assert tokenized.labels == (*[IGNORE_INDEX] * len(prompt), *response)
    assert tokenizer.decode(tokenized.input_ids[len(prompt):]) == "a, b<|im_end|>"
    assert tokenized.response_tokens == len(response)
    everything = tokenize_example(example, tokenizer, "alpaca", seq_len=512, response_only=False)
    assert everything.labels == everything.input_ids == tokenized.input_ids


def test_chat_labels_learn_every_assistant_turn_and_mask_the_rest(tokenizer) -> None:
    example = Example.chat(TWO_TURNS)
    tokenized = tokenize_example(example, tokenizer, "auto", seq_len=512)
    rendered = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tokenized.input_ids == tuple(encode(tokenizer, rendered))  # the pieces add up to the whole dialog
    learned = [tokenizer.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels)
                                 if label != IGNORE_INDEX])]
    assert learned == ["Blue.<|im_end|>\nRed.<|im_end|>\n"]
    pieces = segments(example, tokenizer, "chat")
    assert [p.learned for p in pieces] == [False, True, False, True]
    assert [tokenizer.decode(p.ids) for p in pieces[1:]] == [
        "Blue.<|im_end|>\n", "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n", "Red.<|im_end|>\n"]
    # The first prompt is what inference sends for the first question (chat.format_chat).
    assert pieces[0].ids == tuple(encode(tokenizer, format_chat(tokenizer, TWO_TURNS[:1])))
    masked = [label for label, piece in zip(tokenized.labels, [p for p in pieces for _ in p.ids]) if not piece.learned]
    assert set(masked) == {IGNORE_INDEX}


def test_instruction_data_with_the_chat_template_becomes_one_user_turn(tokenizer) -> None:
    pieces = segments(Example.instruct("Sort these.", "a, b", input="b, a"), tokenizer, "chat")
    assert tokenizer.decode(pieces[0].ids).endswith(
        "<|im_start|>user\nSort these.\n\nb, a<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(pieces[1].ids) == "a, b<|im_end|>\n"


def test_without_a_chat_template_dialogs_use_llama2s_format(smollm2) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(smollm2.path))
    plain.chat_template = None
    tokenized = tokenize_example(Example.chat(TWO_TURNS), plain, "chat", seq_len=512)
    text = llama2_chat_prompt(TWO_TURNS[:3], bos=plain.bos_token, eos=plain.eos_token) + " Red. " + plain.eos_token
    assert plain.decode(tokenized.input_ids) == text
    learned = plain.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX])
    assert learned == " Blue. <|im_end|> Red. <|im_end|>"


def test_a_chat_template_that_refuses_a_dialog_names_the_record(smollm2, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(str(smollm2.path))
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, *TWO_TURNS]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer's chat template refuses this dialog: System role"):
        build_datasets(DataConfig(str(path), val_fraction=0.0), strict, seq_len=64, seed=0)


def test_the_alpaca_template_refuses_dialogs(tokenizer) -> None:
    with pytest.raises(DataError, match="the alpaca template needs instruction data.*use template chat"):
        tokenize_example(Example.chat(TWO_TURNS), tokenizer, "alpaca", seq_len=512)


# ---- truncation ---------------------------------------------------------------------------------
def test_a_long_prompt_loses_its_start_and_keeps_the_whole_response(tokenizer) -> None:
    example = Example.instruct("Repeat: " + "word " * 300, "Done.")
    full = tokenize_example(example, tokenizer, "alpaca", seq_len=4096)
    cut = tokenize_example(example, tokenizer, "alpaca", seq_len=64)
    assert len(cut) == 64
    assert cut.input_ids == full.input_ids[-64:] and cut.labels == full.labels[-64:]
    assert cut.response_tokens == full.response_tokens and cut.input_ids[-1] == tokenizer.eos_token_id


def test_a_long_response_keeps_half_a_sequence_of_prompt_and_loses_its_end(tokenizer) -> None:
    example = Example.instruct("Count.", " ".join(str(i) for i in range(400)))
    full = tokenize_example(example, tokenizer, "alpaca", seq_len=4096)
    prompt = full.labels.count(IGNORE_INDEX)
    assert prompt > 24
    cut = tokenize_example(example, tokenizer, "alpaca", seq_len=48)
    start = prompt - 24
    assert cut.input_ids == full.input_ids[start:start + 48]
    assert cut.labels.count(IGNORE_INDEX) == 24 and cut.response_tokens == 24
    assert cut.input_ids[-1] != tokenizer.eos_token_id


# ---- packing, split, batches --------------------------------------------------------------------
def test_packing_fills_sequences_and_keeps_every_label(tokenizer) -> None:
    examples = [tokenize_example(e, tokenizer, "auto", 512) for e in load_examples(DATA / "alpaca_llmplan.jsonl")[:40]]
    packed = pack(examples, 128)
    assert all(len(sequence) == 128 for sequence in packed[:-1]) and 0 < len(packed[-1]) <= 128
    assert sum(s.response_tokens for s in packed) == sum(e.response_tokens for e in examples)
    assert [t for s in packed for t in s.labels] == [t for e in examples for t in e.labels]
    assert [t for s in packed for t in s.input_ids] == [t for e in examples for t in e.input_ids]
    assert [p for s in packed for p in s.positions] == [p for e in examples for p in range(len(e))]
    assert packed[0].positions[:len(examples[0]) + 1] == (*range(len(examples[0])), 0)  # the next one starts at 0


def test_split_is_deterministic_and_a_partition() -> None:
    items = list(range(100))
    train, val = split(items, 0.1, seed=3)
    assert (train, val) == split(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert split(items, 0.1, seed=4)[1] != val
    assert split(items, 0.0, seed=3) == (items, [])
    assert len(split(items[:5], 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    assert split(items[:1], 0.5, seed=0) == ([0], [])  # and never everything


def test_collate_pads_on_the_right_with_masked_labels() -> None:
    batch = collate([TokenizedExample((5, 6, 7), (-100, 6, 7)), TokenizedExample((8,), (8,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert {str(t.dtype) for t in batch.values()} == {"torch.int64"}
    assert collate([TokenizedExample((1,), (1,))], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)
    assert "position_ids" not in batch


def test_packed_rows_carry_their_positions_and_go_to_the_model_without_a_mask() -> None:
    rows = [TokenizedExample((5, 6, 7, 8), (5, 6, 7, 8), (2, 0, 1, 2)), TokenizedExample((9, 4), (9, 4), (0, 1))]
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[2, 0, 1, 2], [0, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # still counts the tokens
    assert set(model_inputs(batch, torch.device("cpu"))) == {"input_ids", "labels", "position_ids", "use_cache"}
    unpacked = collate([TokenizedExample((1, 2), (1, 2))], pad_id=0)
    assert set(model_inputs(unpacked, torch.device("cpu"))) == {"input_ids", "labels", "attention_mask"}


def test_build_datasets_splits_tokenizes_packs_and_counts(tokenizer) -> None:
    config = DataConfig(str(DATA / "alpaca_llmplan.jsonl"), val_fraction=0.1, packing=True)
    train, val, stats = build_datasets(config, tokenizer, seq_len=256, seed=0)
    assert (stats.format, stats.template, stats.packed) == ("alpaca", "alpaca", True)
    assert stats.train_examples + stats.val_examples + stats.dropped == stats.examples
    assert stats.val_examples == round(stats.examples * 0.1) and len(val) == stats.val_examples
    assert len(train) == stats.train_sequences < stats.train_examples
    assert train.tokens == stats.tokens and train.response_tokens == stats.response_tokens
    assert all(len(s) == 256 for s in train.sequences[:-1])
    again = build_datasets(config, tokenizer, seq_len=256, seed=0)
    assert again[0] == train and again[2] == stats
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id


def test_build_datasets_counts_truncated_examples(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}] * 3)
    train, val, stats = build_datasets(DataConfig(str(path), val_fraction=0.0), tokenizer, seq_len=16, seed=0)
    assert (stats.truncated, stats.dropped, len(train), len(val)) == (3, 0, 3, 0)
    assert all(len(s) == 16 and s.response_tokens > 0 for s in train.sequences)


# ---- the example data sets ----------------------------------------------------------------------
def test_the_example_alpaca_data_set_is_clean_and_reproducible() -> None:
    path = DATA / "alpaca_llmplan.jsonl"
    examples = load_examples(path)
    assert detect_format(path) == "alpaca" and len(examples) >= 200
    instructions = [e.instruction for e in examples]
    assert len(set(instructions)) == len(instructions)
    assert sum(bool(e.input) for e in examples) >= 20
    spec = importlib.util.spec_from_file_location("make_alpaca_llmplan", DATA / "make_alpaca_llmplan.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert [Example.instruct(r["instruction"], r["output"], r["input"]) for r in maker.build()] == examples


def test_the_example_chat_data_set_loads(tokenizer) -> None:
    examples = load_examples(DATA / "chat_llmplan.jsonl")
    assert detect_format(DATA / "chat_llmplan.jsonl") == "messages" and len(examples) >= 30
    assert any(e.dialog[0].role is Role.SYSTEM for e in examples)
    assert any(len(e.dialog) >= 4 for e in examples)
