"""Chat dialogs: typed messages, validation, prompt formats and JSONL prompt files.

Light on purpose (stdlib only; no torch or transformers at import), so the CLI and the Ray driver can
read and check prompt files before any model is loaded.

- `Message(role, content)`, roles system / user / assistant; a dialog is a sequence of messages.
- `validate_dialog` accepts what Meta's Llama-2 `chat_completion` accepts: an optional system prompt
  first, then user and assistant alternating, ending with the user's turn for the model to answer.
- `llama2_chat_prompt` writes Meta's Llama-2 chat format as text (`llama/generation.py`,
  `chat_completion`); `format_chat` prefers the tokenizer's own chat template.
- `load_dialogs` / `load_prompts` read JSONL files; an error names the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union


class DialogError(ValueError):
    """A dialog (or a prompt file) that cannot be sent to a model; the message says what to fix."""


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


ROLES = ", ".join(role.value for role in Role)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise DialogError(f"unknown role {self.role!r}: use {ROLES}") from None
        if not isinstance(self.content, str):
            raise DialogError(f"a {self.role.value} message's content must be text, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role.value, "content": self.content}


Dialog = tuple[Message, ...]
# One line of a prompt file: a text prompt to complete, or a dialog to answer.
PromptItem = Union[str, Dialog]


def as_message(value: Message | Mapping[str, Any]) -> Message:
    """A `Message`, or a mapping with exactly the keys role and content (the OpenAI / Meta shape)."""
    if isinstance(value, Message):
        return value
    if not isinstance(value, Mapping):
        raise DialogError(f"a message must be an object with role and content, got {type(value).__name__}")
    if set(value) != {"role", "content"}:
        keys = ", ".join(map(str, value)) or "none"
        raise DialogError(f"a message has exactly the keys role and content, got {keys}")
    return Message(value["role"], value["content"])


def validate_dialog(messages: Sequence[Message | Mapping[str, Any]]) -> Dialog:
    """The dialog as typed messages, or `DialogError` saying what is wrong with it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DialogError(f"a dialog is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DialogError("the dialog is empty: give at least one user message")
    dialog = tuple(_numbered(i, as_message, m) for i, m in enumerate(messages, start=1))
    turns = dialog[1:] if dialog[0].role is Role.SYSTEM else dialog
    offset = len(dialog) - len(turns)
    if not turns:
        raise DialogError("the dialog has only a system prompt: add a user message after it")
    for i, message in enumerate(turns):
        expected = Role.USER if i % 2 == 0 else Role.ASSISTANT
        if message.role is Role.SYSTEM:
            raise DialogError(
                f"message {i + offset + 1} is a system message: only the first message may be the system prompt"
            )
        if message.role is not expected:
            raise DialogError(
                f"message {i + offset + 1} is from the {message.role.value}, expected the {expected.value}: after the "
                "optional system prompt, messages alternate user, assistant, user, ..."
            )
    if turns[-1].role is not Role.USER:
        raise DialogError("the last message is from the assistant: end the dialog with a user message to answer")
    return dialog


def _numbered(index: int, parse, value):
    try:
        return parse(value)
    except DialogError as error:
        raise DialogError(f"message {index}: {error}") from None


# ---- Meta's Llama-2 chat format -------------------------------------------------------------------
# llama/generation.py (meta-llama/llama): every user/assistant pair is encoded as
# BOS + "[INST] {user} [/INST] {answer} " + EOS, the last user message as BOS + "[INST] {user} [/INST]",
# and the system prompt is folded into the first user message between <<SYS>> tags. Contents are
# stripped after the system prompt is folded in (so the system prompt's own whitespace is kept).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def llama2_chat_prompt(messages: Sequence[Message | Mapping[str, Any]], bos: str = "<s>", eos: str = "</s>") -> str:
    """The dialog in Meta's Llama-2 chat format, with BOS / EOS written as text (`<s>`, `</s>`).

    Tokenize the result with `add_special_tokens=False`: the text already holds every BOS. Meta answers a
    dialog that contains the format's own tags with an error instead of the model's reply; here it is
    refused up front.
    """
    dialog = validate_dialog(messages)
    tagged = [m for m in dialog if any(tag in m.content for tag in SPECIAL_TAGS)]
    if tagged:
        raise DialogError(
            f"a {tagged[0].role.value} message contains a Llama-2 control tag ({', '.join(SPECIAL_TAGS)}): "
            "remove it from the text"
        )
    turns = [m.content for m in dialog]
    if dialog[0].role is Role.SYSTEM:
        turns = [B_SYS + turns[0] + E_SYS + turns[1], *turns[2:]]
    pairs = zip(turns[:-1:2], turns[1::2])
    answered = "".join(f"{bos}{B_INST} {user.strip()} {E_INST} {answer.strip()} {eos}" for user, answer in pairs)
    return f"{answered}{bos}{B_INST} {turns[-1].strip()} {E_INST}"


def format_chat(tokenizer: Any, messages: Sequence[Message | Mapping[str, Any]]) -> str:
    """The prompt text for a chat model: the tokenizer's chat template (with the generation prompt) when it
    has one, Meta's Llama-2 format otherwise. Tokenize it with `add_special_tokens=False`."""
    dialog = validate_dialog(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [m.to_dict() for m in dialog], tokenize=False, add_generation_prompt=True
        )
    return llama2_chat_prompt(dialog, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")


# ---- prompt files ---------------------------------------------------------------------------------
def load_dialogs(path: str | Path) -> list[Dialog]:
    """A JSONL file of dialogs: each line a list of messages, or an object {"messages": [...]}."""
    return [_line_dialog(record) for record in _records(path)]


def load_prompts(path: str | Path) -> list[PromptItem]:
    """A JSONL file of requests: each line {"prompt": "text"} (completion) or {"messages": [...]} (chat)."""
    return [_line_prompt(record) for record in _records(path)]


@dataclass(frozen=True)
class _Record:
    where: str  # "path:line"
    value: Any


def _records(path: str | Path) -> list[_Record]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DialogError(f"{path}: no such file: give a JSONL file, one request per line") from None
    except UnicodeDecodeError as error:
        raise DialogError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            records.append(_Record(where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DialogError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not records:
        raise DialogError(f"{path}: the file has no requests: write one JSON object per line")
    return records


def _line_dialog(record: _Record) -> Dialog:
    value = record.value
    if isinstance(value, Mapping):
        if set(value) != {"messages"}:
            raise DialogError(f'{record.where}: a dialog line is a list of messages or {{"messages": [...]}}')
        value = value["messages"]
    try:
        return validate_dialog(value)
    except DialogError as error:
        raise DialogError(f"{record.where}: {error}") from None


def _line_prompt(record: _Record) -> PromptItem:
    value = record.value
    if isinstance(value, Mapping) and set(value) == {"prompt"}:
        if not isinstance(value["prompt"], str) or not value["prompt"]:
            raise DialogError(f'{record.where}: "prompt" must be non-empty text')
        return value["prompt"]
    if isinstance(value, Mapping) and set(value) == {"messages"}:
        return _line_dialog(record)
    raise DialogError(
        f'{record.where}: each line is {{"prompt": "text"}} or {{"messages": [{{"role": ..., "content": ...}}]}}'
    )
