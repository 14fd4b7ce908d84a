"""Fine-tuning data as token ids: templates, response-only labels, truncation, packing, split and batches.

The recipe (`runtime/train/train.py`) calls `build_datasets(config.data, tokenizer, config.seq_len, config.seed)`
and feeds `collate` to its DataLoader; loading and validation live in `data_formats.py` (no torch), which
the CLI uses to check a file before it submits a job.

Templates:
- `alpaca`: Stanford Alpaca's prompt (`ALPACA_PROMPT`, `ALPACA_PROMPT_NO_INPUT`), the text of
  tatsu-lab/stanford_alpaca `train.py` with a newline after "### Response:", as alpaca-lora
  (`templates/alpaca.json`), lit-gpt and LLaMA-Factory write it; the response is the output + EOS.
  The prompt is tokenized with the tokenizer's special tokens (BOS), as `inference.complete` does.
- `chat`: the tokenizer's chat template through `chat.format_chat` (Llama-2's format when the tokenizer has
  none), so a fine-tuned model sees at training time exactly the prompt it is later asked with. Every
  assistant turn is learned (loss on each answer, everything else masked): turn k's prompt is the template
  applied to the messages before it with the generation prompt, its response the text the template adds
  for the answer (content and end-of-turn marker). A template that renders earlier turns differently from
  how it renders the last one (e.g. one that drops reasoning from history) cannot be split that way; for
  such a template only the last answer is learned.
- `auto`: alpaca for instruction data, chat for dialogs. With `chat`, an instruction becomes the user's
  message (`Example.as_dialog`).

Each piece (prompt, response) is tokenized on its own and the ids concatenated, as LLaMA-Factory does, so
the prompt's ids are those inference produces for it. A sequence longer than `seq_len` loses the start of
its prompt first (the prompt being everything before the last answer); when the answer alone needs more than
half of `seq_len`, half a sequence of prompt is kept before it and the answer is cut on the right (it then
ends without EOS). An example left with no response token is dropped and counted.

Packing (`pack`): all examples concatenated in order and cut into `seq_len` pieces (lit-gpt's and
LLaMA-Factory's packing), labels keeping their masks, and each token's position within its own example kept
as `positions`. `collate` passes those as `position_ids` and leaves `attention_mask` out, from which
transformers builds a block-diagonal causal mask (a position that does not follow the one before starts a
new sequence): an example attends only to itself and its positions start at 0, as they do at inference,
which is what LLaMA-Factory calls neat packing. An example cut at the end of a row continues in the next
row at the position it reached. The validation set is never packed: its loss is measured per example.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from llmplan.runtime.text.chat import Dialog, DialogError, Role, format_chat
from llmplan.runtime.text.data_formats import DataError, Example, Problem, detect_format, load_examples
from llmplan.runtime.train.train_config import DataConfig

IGNORE_INDEX = -100  # the label torch's cross entropy (and every HF causal LM's loss) skips
TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

T = TypeVar("T")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt for one instruction (the version with an input when `input` is not empty)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one sequence; a label is the id to learn or `IGNORE_INDEX` (no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positions: tuple[int, ...] | None = None  # packed rows: each token's position within its own example

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids", tuple(self.input_ids))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(self.positions))
            if len(self.positions) != len(self.input_ids):
                raise ValueError(f"{len(self.input_ids)} input ids but {len(self.positions)} positions")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text as ids: learned (an answer) or not (a prompt)."""

    ids: tuple[int, ...]
    learned: bool


# ---- templates ------------------------------------------------------------------------------------
def resolve_template(template: str, example: Example) -> str:
    """`alpaca` or `chat` for this example (`auto`: alpaca for instructions, chat for dialogs)."""
    if template == "auto":
        return "chat" if example.is_dialog else "alpaca"
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: use auto, {', '.join(TEMPLATES)}")
    if template == "alpaca" and example.is_dialog:
        raise DataError([Problem(example.where or "data", "the alpaca template needs instruction data, this "
                                 "example is a dialog: use template chat (or auto)")])
    return template


def segments(example: Example, tokenizer: Any, template: str) -> list[Segment]:
    """The example as prompt and response pieces of token ids, in order; the last piece is a response."""
    if resolve_template(template, example) == "alpaca":
        return _alpaca_segments(example, tokenizer)
    return _chat_segments(example.as_dialog(), tokenizer, example.where)


def _alpaca_segments(example: Example, tokenizer: Any) -> list[Segment]:
    prompt = _encode(tokenizer, alpaca_prompt(example.instruction, example.input), special=True)
    response = _encode(tokenizer, example.output, special=False) + [_eos_id(tokenizer)]
    return [Segment(tuple(prompt), False), Segment(tuple(response), True)]


def _chat_segments(dialog: Dialog, tokenizer: Any, where: str) -> list[Segment]:
    texts = _chat_texts(dialog, tokenizer, where)
    pieces = [Segment(tuple(_encode(tokenizer, text, special=False)), learned) for text, learned in texts]
    eos = _eos_id(tokenizer)
    if eos not in pieces[-1].ids:  # a template whose end-of-turn is not EOS: end the sequence with EOS anyway
        pieces[-1] = Segment((*pieces[-1].ids, eos), True)
    return pieces


def _chat_texts(dialog: Dialog, tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """(text, learned) pieces: every answer when the template allows it, the last answer otherwise."""
    answers = [i for i, message in enumerate(dialog) if message.role is Role.ASSISTANT]
    texts: list[tuple[str, bool]] = []
    done = ""
    for i in answers:
        prompt, full = _prompt_and_answered(dialog[: i + 1], tokenizer, where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            break
        texts += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    else:
        return texts
    prompt, full = _prompt_and_answered(dialog, tokenizer, where)
    if not full.startswith(prompt):
        raise DataError([Problem(where or "data", "the tokenizer's chat template does not write the answer after "
                                 "its generation prompt, so the answer cannot be told from the prompt: use "
                                 "template alpaca")])
    return [(prompt, False), (full[len(prompt):], True)]


def _prompt_and_answered(dialog: Dialog, tokenizer: Any, where: str) -> tuple[str, str]:
    """The prompt for the dialog's last answer (with the generation prompt) and the dialog with the answer."""
    from jinja2.exceptions import TemplateError  # what a chat template raises (e.g. "System role not supported")

    *head, answer = dialog
    try:
        prompt = format_chat(tokenizer, head)
        if not getattr(tokenizer, "chat_template", None):  # Llama-2's format: "[/INST] {answer} {eos}"
            return prompt, f"{prompt} {answer.content.strip()} {tokenizer.eos_token or ''}"
        full = tokenizer.apply_chat_template([m.to_dict() for m in dialog], tokenize=False,
                                             add_generation_prompt=False)
    except (DialogError, TemplateError) as error:
        problem = Problem(where or "data", f"the tokenizer's chat template refuses this dialog: {error}")
        raise DataError([problem]) from None
    return prompt, full


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError([Problem("tokenizer", "the tokenizer has no EOS token: a fine-tuned model would never "
                                 "learn to stop; set tokenizer.eos_token")])
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, or its EOS (padding never carries loss)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError([Problem("tokenizer", "the tokenizer has neither a pad nor an EOS token: add one")])
    return int(pad)


# ---- one example ----------------------------------------------------------------------------------
def tokenize_example(
    example: Example, tokenizer: Any, template: str, seq_len: int, response_only: bool = True
) -> TokenizedExample | None:
    """The example as at most `seq_len` ids and labels; None when truncation leaves no response token.

    With `response_only`, labels are `IGNORE_INDEX` over every prompt token and equal the ids over every
    response (each answer and its end-of-turn / EOS); without, every token is learned.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    return _from_segments(segments(example, tokenizer, template), seq_len, response_only)


def _truncate(ids: list[int], labels: list[int], answer_start: int, seq_len: int) -> tuple[list[int], list[int]]:
    """Cut to `seq_len`: the prompt (everything before the last answer) loses its start first; an answer
    longer than seq_len - seq_len // 2 keeps half a sequence of prompt before it and is cut on the right."""
    if len(ids) <= seq_len:
        return ids, labels
    answer = len(ids) - answer_start
    keep_prompt = max(seq_len - answer, min(answer_start, seq_len // 2))
    start = answer_start - keep_prompt
    end = start + seq_len
    return ids[start:end], labels[start:end]


# ---- many examples --------------------------------------------------------------------------------
def pack(examples: Sequence[TokenizedExample], seq_len: int) -> list[TokenizedExample]:
    """The examples concatenated in order and cut into sequences of `seq_len` (the last may be shorter), with
    each token's position within its own example (the packed rows' `position_ids`).

    No token or label is lost or changed; an example may span two sequences.
    """
    ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    positions = [position for example in examples for position in range(len(example))]
    return [TokenizedExample(ids[i:i + seq_len], labels[i:i + seq_len], positions[i:i + seq_len])
            for i in range(0, len(ids), seq_len)]


def split(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation), both in the original order; which items are held out depends only on the seed.

    The validation set is round(len * val_fraction) items, at least one when val_fraction > 0, and never
    all of them.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(items)
    held = round(count * val_fraction)
    if val_fraction > 0:
        held = max(held, 1)
    held = min(held, count - 1) if count else 0
    chosen = set(random.Random(seed).sample(range(count), held))
    train = [item for i, item in enumerate(items) if i not in chosen]
    val = [item for i, item in enumerate(items) if i in chosen]
    return train, val


@dataclass(frozen=True)
class TrainingData:
    """Tokenized sequences; a map-style dataset (`len`, indexing) for torch's DataLoader with `collate`."""

    sequences: tuple[TokenizedExample, ...]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.sequences[index]

    @property
    def tokens(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)

    @property
    def response_tokens(self) -> int:
        return sum(sequence.response_tokens for sequence in self.sequences)


@dataclass(frozen=True)
class DataStats:
    """What `build_datasets` made of the file: record it with the job."""

    path: str
    format: str  # alpaca | sharegpt | messages (as detected or named)
    template: str  # alpaca | chat (as resolved)
    examples: int  # records in the file
    train_examples: int  # kept for training (after dropping)
    val_examples: int  # kept for validation
    dropped: int  # examples left with no response token after truncation (train and validation)
    truncated: int  # examples longer than seq_len (train and validation; includes the dropped)
    tokens: int  # training tokens (after truncation)
    response_tokens: int  # training tokens that carry loss
    train_sequences: int  # training sequences (fewer than train_examples when packed)
    val_tokens: int
    packed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_datasets(
    config: DataConfig, tokenizer: Any, seq_len: int, seed: int
) -> tuple[TrainingData, TrainingData, DataStats]:
    """(train, validation, stats) from the data file: loaded and validated, split by `seed`, tokenized
    with the config's template, truncated to `seq_len`, and the training set packed when configured."""
    fmt = detect_format(config.path) if config.format == "auto" else config.format
    examples = load_examples(config.path, fmt)
    template = resolve_template(config.template, examples[0])
    train_examples, val_examples = split(examples, config.val_fraction, seed)
    train, train_dropped, train_cut = _tokenize_all(train_examples, tokenizer, template, seq_len, config)
    val, val_dropped, val_cut = _tokenize_all(val_examples, tokenizer, template, seq_len, config)
    if not train:
        raise DataError([Problem(config.path, f"every training example was dropped: none keeps a response "
                                 f"token within seq_len {seq_len}; raise seq_len")])
    sequences = pack(train, seq_len) if config.packing else train
    stats = DataStats(
        path=str(config.path), format=fmt, template=template, examples=len(examples),
        train_examples=len(train), val_examples=len(val), dropped=train_dropped + val_dropped,
        truncated=train_cut + val_cut, tokens=sum(map(len, train)),
        response_tokens=sum(example.response_tokens for example in train), train_sequences=len(sequences),
        val_tokens=sum(map(len, val)), packed=config.packing,
    )
    return TrainingData(tuple(sequences)), TrainingData(tuple(val)), stats


def _tokenize_all(
    examples: Sequence[Example], tokenizer: Any, template: str, seq_len: int, config: DataConfig
) -> tuple[list[TokenizedExample], int, int]:
    """(tokenized examples, how many were dropped, how many were truncated)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    kept: list[TokenizedExample] = []
    dropped = truncated = 0
    for example in examples:
        pieces = segments(example, tokenizer, template)
        total = sum(len(piece.ids) for piece in pieces)
        truncated += total > seq_len
        tokenized = _from_segments(pieces, seq_len, config.response_only)
        if tokenized is None:
            dropped += 1
        else:
            kept.append(tokenized)
    return kept, dropped, truncated


def _from_segments(pieces: list[Segment], seq_len: int, response_only: bool) -> TokenizedExample | None:
    ids = [token for piece in pieces for token in piece.ids]
    labels = [token if piece.learned or not response_only else IGNORE_INDEX
              for piece in pieces for token in piece.ids]
    ids, labels = _truncate(ids, labels, len(ids) - len(pieces[-1].ids), seq_len)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(tuple(ids), tuple(labels))


# ---- batches --------------------------------------------------------------------------------------
def collate(batch: Sequence[TokenizedExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch: `input_ids` (pad_id), `labels` (IGNORE_INDEX) and `attention_mask` (1 on tokens,
    0 on padding), all int64 of shape (len(batch), longest rounded up to `pad_to_multiple_of`); packed rows
    add `position_ids` (each token's position in its own example, 0 on padding).

    Use with a DataLoader: `collate_fn=functools.partial(collate, pad_id=pad_token_id(tokenizer))`.
    """
    if not batch:
        raise ValueError("an empty batch")
    longest = max(len(example) for example in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        size = len(example)
        input_ids[row, :size] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :size] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :size] = 1
    batched = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(example.positions is not None for example in batch):
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            position_ids[row, :len(example)] = torch.tensor(example.positions or range(len(example)), dtype=torch.long)
        batched["position_ids"] = position_ids
    return batched


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch, on `device`. Packed rows go without their
    attention_mask and without a KV cache: only then does transformers read the examples' boundaries from
    position_ids (a block-diagonal causal mask). Right padding needs no mask in a causal model (no token
    attends to a later one)."""
    if "position_ids" not in batch:
        return {name: tensor.to(device) for name, tensor in batch.items()}
    inputs: dict[str, Any] = {name: tensor.to(device) for name, tensor in batch.items() if name != "attention_mask"}
    inputs["use_cache"] = False
    return inputs
