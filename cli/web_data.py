"""The dashboard's data-set preview (POST /api/data/preview): what a training file holds before it is submitted,
read with the same loader a fine-tuning job uses (runtime/text/data_formats.py), so a file it refuses is refused
here with the same file:line."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .web_actions import checked_model, inside_roots
from .web_errors import ApiError

PREVIEW_ROWS = 5
SHOWN_CHARS = 400  # of each message in a previewed row
CHARS_PER_TOKEN = 4  # the approximation when no local tokenizer is given (English text, BPE tokenizers)


@dataclass(frozen=True)
class TokenLengths:
    min: int
    median: float
    max: int
    counted_by: str  # the tokenizer's folder, or how they were approximated


def preview_json(body: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, Any]:
    """{"path", "format", "records", "rows": [[{"role", "content"}]], "tokens": {min, median, max, counted_by}}
    for the data file `body["path"]` (inside the roots); 400 naming file:line for a file that cannot be trained on."""
    from llmplan.runtime.text.data_formats import DataError, detect_format, load_examples

    path = inside_roots("data", str(body.get("path") or ""), roots, must_exist=True)
    if not path.is_file():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"data: {body.get('path')} is not a file", "data")
    try:
        data_format = detect_format(path)
        examples = load_examples(path)
    except DataError as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(error.first), "data") from None
    texts = ["\n".join(message.content for message in example.as_dialog()) for example in examples]
    model = body.get("model")
    return {"path": str(path), "format": data_format, "records": len(examples),
            "rows": [[{"role": message.role.value, "content": message.content[:SHOWN_CHARS]}
                      for message in example.as_dialog()] for example in examples[:PREVIEW_ROWS]],
            "tokens": asdict(token_lengths(texts, checked_model(str(model), roots) if model else None))}


def token_lengths(texts: list[str], model: str | None) -> TokenLengths:
    """The texts' lengths in tokens: by the tokenizer of `model` when it is a local folder, else approximated."""
    if model is not None and Path(model).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        counted_by = f"the tokenizer of {model}"
    else:
        counts = [max(1, round(len(text) / CHARS_PER_TOKEN)) for text in texts]
        counted_by = f"approximated as characters / {CHARS_PER_TOKEN} (give a local model for its tokenizer)"
    return TokenLengths(min=min(counts), median=statistics.median(counts), max=max(counts), counted_by=counted_by)
