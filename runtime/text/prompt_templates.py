"""Which prompt layout a model is asked in: the one it was fine-tuned with, its chat template, or raw text.

Light on purpose (stdlib only), so the CLI can say which template a prompt will be sent in before a model loads.

A fine-tuning run writes `llmplan_template.json` beside its adapter (or full model): the template it
trained with (`alpaca` or `chat`), the data format, and for Alpaca the layout itself (the preamble and
the turn with `{instruction}`), so the text inference sends is the text training showed the model.

`resolve_template(choice, model_dir, adapter_dir)` turns `--template` into a `PromptTemplate`:
- `auto`: the stored template of the adapter, else of the model directory (a full fine-tune); else, for a
  model with a chat template (an instruct model), the chat template for a prompt that ends a sentence
  ("What is ...?", "Convert 3 km to metres.": a message to answer, which such a model answers with nothing
  when it comes as raw text) and the text as written for one that does not ("The capital of France is": a
  text to continue, which a chat template turns into noise); else the text as written (a base model);
- `alpaca`, `chat`: that layout (Alpaca's stored one when there is one);
- `none`: the text as written, a plain completion.
`apply_template` writes a prompt (or a dialog) in it; dialogs always go through a chat layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplan.runtime.text.chat import Dialog, Message, PromptItem, Role, validate_dialog

TEMPLATE_FILE = "llmplan_template.json"
CHOICES = ("auto", "alpaca", "chat", "none")
# The files a tokenizer keeps its chat template in (transformers 5 writes chat_template.jinja).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class TemplateError(ValueError):
    """A template that cannot be used as asked; the message names the file or option at fault."""


@dataclass(frozen=True)
class AlpacaLayout:
    """Stanford Alpaca's prompt as a preamble and a turn: `preamble + "\\n\\n" + turn` is the whole prompt."""

    preamble: str  # "Below is an instruction that describes a task. ..." (a system prompt replaces it)
    turn: str  # "### Instruction:\n{instruction}\n\n### Response:\n"

    @classmethod
    def from_prompt(cls, prompt: str) -> AlpacaLayout:
        """Split a whole one-instruction prompt (data.ALPACA_PROMPT_NO_INPUT) at its first blank line."""
        preamble, turn = prompt.split("\n\n", 1)
        return cls(preamble, turn)

    def render(self, dialog: Dialog) -> str:
        """The dialog as Alpaca text: earlier turns as answered instructions, the last one awaiting its response."""
        preamble = dialog[0].content if dialog[0].role is Role.SYSTEM else self.preamble
        turns = [m.content for m in dialog if m.role is not Role.SYSTEM]
        answered = "".join(self.turn.format(instruction=user) + f"{answer}\n\n"
                           for user, answer in zip(turns[:-1:2], turns[1::2]))
        return f"{preamble}\n\n{answered}{self.turn.format(instruction=turns[-1])}"


SENTENCE_ENDS = (".", "!", "?")
CLOSING = "\"')]*_`»”’"  # what may follow the end of a sentence


def ends_sentence(text: str) -> bool:
    """Whether the text ends a sentence (a message to answer) rather than breaking off (a text to continue)."""
    return text.rstrip().rstrip(CLOSING).endswith(SENTENCE_ENDS)


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # alpaca | chat | none
    reason: str  # where the choice came from, for the user
    alpaca: AlpacaLayout | None = None  # the layout, for alpaca
    open_text_as_written: bool = False  # auto on an instruct model: text that does not end a sentence is continued

    def describe(self) -> str:
        if self.open_text_as_written:
            return f"template: {self.reason}"
        return f"template: {self.name} ({self.reason})"

    def for_item(self, item: PromptItem) -> PromptTemplate:
        """The template this prompt is sent in (auto on an instruct model decides per prompt)."""
        if self.open_text_as_written and isinstance(item, str) and not ends_sentence(item):
            return PromptTemplate("none", "the prompt does not end a sentence: continued as written")
        return self


# ---- the file a fine-tuning run writes --------------------------------------------------------------
def write_template(directory: str | Path, name: str, data_format: str, alpaca_prompt: str) -> Path:
    """`llmplan_template.json` in `directory`: the template `name` trained with, and its layout."""
    record: dict[str, Any] = {"template": name, "format": data_format}
    if name == "alpaca":
        layout = AlpacaLayout.from_prompt(alpaca_prompt)
        record |= {"preamble": layout.preamble, "turn": layout.turn}
    else:
        record["layout"] = "the tokenizer's chat template (saved beside this file)"
    path = Path(directory) / TEMPLATE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def stored_template(directory: str | Path | None) -> PromptTemplate | None:
    """The template a fine-tuning run stored in `directory`; None when there is none."""
    if directory is None or not (Path(directory) / TEMPLATE_FILE).is_file():
        return None
    path = Path(directory) / TEMPLATE_FILE
    try:
        record = json.loads(path.read_text())
        name = record["template"]
        layout = AlpacaLayout(record["preamble"], record["turn"]) if name == "alpaca" else None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TemplateError(f"{path}: not a template llmplan wrote ({error}): delete it, or pass --template") from None
    if name not in ("alpaca", "chat"):
        raise TemplateError(f"{path}: unknown template {name!r}: use alpaca or chat, or pass --template")
    return PromptTemplate(name, f"trained with it, {path}", layout)


def carry_template(source: str | Path, target: str | Path) -> Path | None:
    """Copy the stored template of an adapter to what it was merged into; None when it has none."""
    path = Path(source) / TEMPLATE_FILE
    if not path.is_file():
        return None
    copied = Path(target) / TEMPLATE_FILE
    copied.write_text(path.read_text())
    return copied


# ---- choosing ----------------------------------------------------------------------------------------
def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the model's tokenizer files hold a chat template (an instruct or chat model)."""
    model_dir = Path(model_dir)
    if any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except json.JSONDecodeError:
        return False


def resolve_template(choice: str, model_dir: str | Path, adapter_dir: str | Path | None = None) -> PromptTemplate:
    """The template `--template choice` means for this model and adapter (see the module's rules)."""
    if choice not in CHOICES:
        raise TemplateError(f"unknown --template {choice!r}: use {', '.join(CHOICES)}")
    stored = stored_template(adapter_dir) or stored_template(model_dir)
    if choice == "none":
        return PromptTemplate("none", "--template none: the text as written")
    if choice == "alpaca":
        layout = stored.alpaca if stored and stored.alpaca else _default_alpaca()
        return PromptTemplate("alpaca", "--template alpaca", layout)
    if choice == "chat":
        return PromptTemplate("chat", "--template chat")
    if stored is not None:
        return stored
    if has_chat_template(model_dir):
        return PromptTemplate("chat", "the model's chat template for a prompt that ends a sentence (. ! ?), the "
                              "text as written for one that does not (--template chat or none to choose)",
                              open_text_as_written=True)
    return PromptTemplate("none", "no chat template: the text is continued as written")


def _default_alpaca() -> AlpacaLayout:
    from llmplan.runtime.text.data import ALPACA_PROMPT_NO_INPUT  # the training side's text (imports torch: only when asked for)

    return AlpacaLayout.from_prompt(ALPACA_PROMPT_NO_INPUT)


# ---- applying ----------------------------------------------------------------------------------------
def apply_template(template: PromptTemplate, item: PromptItem) -> PromptItem:
    """The prompt as the model is asked it: text is completed as it comes, a dialog answered in a chat layout."""
    template = template.for_item(item)
    if template.name == "none":
        return item
    dialog = (Message(Role.USER, item),) if isinstance(item, str) else validate_dialog(item)
    if template.name == "alpaca":
        return (template.alpaca or _default_alpaca()).render(dialog)
    return dialog
