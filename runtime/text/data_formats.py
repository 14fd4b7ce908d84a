"""Fine-tuning data files: formats, detection, loading and validation (no torch, no transformers).

Light on purpose, like `chat.py`: the CLI checks a data file before it submits a job, so a typo on line
4,812 is reported in a second instead of after the model has loaded on a GPU.

Three record formats, in a JSON array (a `.json` file holding one list) or in JSONL (one object a line);
which of the two is told from the first character of the file, not its name:

- `alpaca`: `{"instruction": ..., "input": ... (optional), "output": ...}` (Stanford Alpaca's fields).
- `sharegpt`: `{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...], "system": ...
  (optional)}`.
- `messages`: `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (OpenAI's
  fine-tuning format).

`detect_format` reads the first record; `load_examples` validates the whole file before it returns, and a
`DataError` lists the first problems (file, line, JSON array index, field) and how many there are in all.
A training dialog follows `chat.validate_dialog`'s role rules (optional system prompt, then user and
assistant alternating) except that it ends with the assistant's answer, the text the model learns.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from llmplan.runtime.text.chat import Dialog, DialogError, Message, Role, as_message, validate_dialog

FORMATS = ("alpaca", "sharegpt", "messages")
# The key of a record that tells its format, checked in this order.
FORMAT_KEYS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"))
SHAREGPT_ROLES = {"human": Role.USER, "gpt": Role.ASSISTANT, "system": Role.SYSTEM}
MAX_REPORTED = 5  # problems listed in one DataError (the total is always given)
MAX_LINE_BYTES = 16 * 2**20  # one JSONL record
MAX_ARRAY_BYTES = 256 * 2**20  # a JSON array is parsed whole; larger data sets go in JSONL
MAX_DATA_BYTES = 64 * 2**30
TOO_LONG_NUMBER = "a number too long to read"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file, located as precisely as the file allows."""

    path: str
    message: str
    line: int | None = None  # 1-based line of the record (or of the JSON syntax error)
    index: int | None = None  # 0-based position in a JSON array (None for JSONL)
    field: str | None = None  # "output", "messages[2].content", ...

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.index is not None:
            where += f" (array index {self.index})"
        what = f"field {self.field}: " if self.field else ""
        return f"{where}: {what}{self.message}"


class DataError(ValueError):
    """A data file that cannot be trained on. `problems` holds the first few; `count` how many in all."""

    def __init__(self, problems: Sequence[Problem], count: int | None = None) -> None:
        self.problems = tuple(problems)
        self.count = len(self.problems) if count is None else count
        lines = [str(problem) for problem in self.problems]
        if self.count > len(self.problems):
            lines.append(f"... and {self.count - len(self.problems)} more problems: fix these and run again")
        super().__init__("\n".join(lines))

    @property
    def first(self) -> Problem:
        return self.problems[0]


@dataclass(frozen=True)
class Example:
    """One training example: an instruction triple (Alpaca) or a dialog ending with the assistant's answer.

    Build it with `Example.instruct` or `Example.chat`; `where` ("file:line") only locates it in messages.
    """

    instruction: str | None = None
    input: str = ""
    output: str | None = None
    dialog: Dialog | None = None
    where: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        triple = self.instruction is not None and self.output is not None
        if triple == (self.dialog is not None):
            raise ValueError("an Example holds either instruction and output, or a dialog")
        if triple and not (self.instruction.strip() and self.output.strip()):
            raise ValueError("an instruction example needs a non-empty instruction and output")
        if self.dialog is not None:
            object.__setattr__(self, "dialog", validate_training_dialog(self.dialog))

    @classmethod
    def instruct(cls, instruction: str, output: str, input: str = "", where: str = "") -> "Example":
        return cls(instruction=instruction, input=input, output=output, where=where)

    @classmethod
    def chat(cls, messages: Sequence[Message | Mapping[str, Any]], where: str = "") -> "Example":
        return cls(dialog=tuple(messages), where=where)

    @property
    def is_dialog(self) -> bool:
        return self.dialog is not None

    def as_dialog(self) -> Dialog:
        """The example as a dialog: an instruction becomes the user's message (its input after a blank line)."""
        if self.dialog is not None:
            return self.dialog
        question = f"{self.instruction}\n\n{self.input}" if self.input else self.instruction
        return (Message(Role.USER, question), Message(Role.ASSISTANT, self.output))


def validate_training_dialog(messages: Sequence[Message | Mapping[str, Any]]) -> Dialog:
    """A dialog to train on: `chat.validate_dialog`'s rules, ending with the assistant's answer.

    Every message needs text; the answer is what the model learns, so the dialog minus that answer must be
    a dialog `validate_dialog` accepts (optional system prompt, user and assistant alternating, ending with
    the user's turn).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise DialogError("a training dialog is a non-empty list of messages ending with the assistant's answer")
    *head, last = messages
    answer = _one_message(len(messages), last)
    if answer.role is not Role.ASSISTANT:
        raise DialogError(
            f"the last message is from the {answer.role.value}: end a training dialog with the assistant's answer"
        )
    if not head:
        raise DialogError("the dialog has only the assistant's answer: add the user message it answers")
    dialog = (*validate_dialog(head), answer)
    for number, message in enumerate(dialog, start=1):
        if not message.content.strip():
            raise DialogError(f"message {number} ({message.role.value}) is empty: give it text or remove the record")
    return dialog


def _one_message(number: int, value: Any) -> Message:
    try:
        return as_message(value)
    except DialogError as error:
        raise DialogError(f"message {number}: {error}") from None


# ---- reading records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One raw record of a data file and where it is."""

    path: str
    line: int
    index: int | None  # position in a JSON array; None in JSONL
    value: Any

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def problem(self, message: str, field: str | None = None) -> Problem:
        return Problem(self.path, message, self.line, self.index, field)


def detect_format(path: str | Path) -> str:
    """The format of the file's first record: `messages`, `sharegpt` or `alpaca` (`DataError` if none fits).

    Lines that are not JSON are skipped here (`load_examples` reports them with the rest of the file).
    """
    path = Path(path)
    first_problem = None
    for item in _read(path):
        if isinstance(item, Record):
            return _record_format(item)
        first_problem = first_problem or item
    if first_problem is not None:
        raise DataError([first_problem])
    raise DataError([Problem(str(path), "the file has no records: write one JSON object per line (JSONL)")])


def _record_format(record: Record) -> str:
    if isinstance(record.value, Mapping):
        for key, name in FORMAT_KEYS:
            if key in record.value:
                return name
        keys = _keys(record.value)
    else:
        keys = f"a {type(record.value).__name__}, not an object"
    raise DataError([record.problem(
        f"cannot tell the format of the first record (keys: {keys}): alpaca records have instruction and output, "
        "sharegpt records conversations, messages records messages; or name the format"
    )])


def load_examples(path: str | Path, format: str = "auto") -> list[Example]:
    """Every example of the file, or `DataError` listing the first problems of the whole file.

    `format` is `auto` (detected from the first record) or one of `FORMATS`.
    """
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataError([Problem(str(path), f"unknown format {format!r}: use auto, {', '.join(FORMATS)}")])
    chosen = detect_format(path) if format == "auto" else format
    parse = PARSERS[chosen]
    examples: list[Example] = []
    problems: list[Problem] = []
    count = 0
    for item in _read(path):
        problem = item if isinstance(item, Problem) else None
        if problem is None:
            try:
                examples.append(parse(item))
            except _RecordError as error:
                problem = error.problem
        if problem is not None:
            count += 1
            if len(problems) < MAX_REPORTED:
                problems.append(problem)
    if problems:
        raise DataError(problems, count)
    if not examples:
        raise DataError([Problem(str(path), "the file has no records: write one JSON object per line (JSONL)")])
    return examples


def _read(path: Path) -> Iterator[Record | Problem]:
    """The file's records (or the problem with each unreadable one), JSON array or JSONL.

    Only regular files are read (a device such as /dev/zero never ends), JSONL line by line with each line
    bounded by MAX_LINE_BYTES, a JSON array whole up to MAX_ARRAY_BYTES."""
    size = _regular_file_size(path)
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip()
    if start.startswith(b"["):
        if size > MAX_ARRAY_BYTES:
            raise DataError([Problem(str(path), f"a JSON array of {size:,} bytes is over {MAX_ARRAY_BYTES // 2**20} "
                                                "MiB: write it as JSON Lines (one record a line)")])
        return _array_records(path, _decoded(path, path.read_bytes()))
    return _jsonl_records(path)


def _regular_file_size(path: Path) -> int:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError([Problem(str(path), "no such file: give a JSON or JSONL data file")]) from None
    except OSError as error:
        raise DataError([Problem(str(path), f"cannot be read ({error.strerror})")]) from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError([Problem(str(path), "is a folder: give a JSON or JSONL data file")])
    if not stat.S_ISREG(info.st_mode):
        raise DataError([Problem(str(path), "is not a regular file (a device or pipe): give a JSON or JSONL data file")])
    if info.st_size > MAX_DATA_BYTES:
        raise DataError([Problem(str(path), f"is {info.st_size:,} bytes, over the {MAX_DATA_BYTES // 2**30} GiB a "
                                            "data file may hold: split it or sample it")])
    return info.st_size


def _decoded(path: Path, data: bytes, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _NotText(Problem(str(path), f"not UTF-8 text ({error.reason} at byte {error.start})", line)) from None


class _NotText(DataError):
    def __init__(self, problem: Problem) -> None:
        super().__init__([problem])


def _json_value(text: str) -> Any:
    """`json.loads`, with every way it can refuse a text as one ValueError whose message says why."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON here (nested too deeply)") from None
    except ValueError:  # the only other refusal: an integer of thousands of digits
        raise ValueError(f"not valid JSON here ({TOO_LONG_NUMBER})") from None


def _jsonl_records(path: Path) -> Iterator[Record | Problem]:
    with path.open("rb") as handle:
        for number, raw in enumerate(_bounded_lines(handle), start=1):
            if raw is None:
                yield Problem(str(path), f"the line is longer than {MAX_LINE_BYTES // 2**20} MiB: one record a line", number)
                continue
            try:
                line = _decoded(path, raw, number)
            except _NotText as error:
                yield error.first
                continue
            if not line.strip():
                continue
            try:
                yield Record(str(path), number, None, _json_value(line))
            except ValueError as error:
                yield Problem(str(path), str(error), number)


def _bounded_lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """The file's lines, or None for each line longer than MAX_LINE_BYTES (read past, never held)."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
            pass
        yield None


def _array_records(path: Path, text: str) -> Iterator[Record | Problem]:
    """The items of a JSON array with the line each starts on; a syntax error ends the file."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, text.index("[") + 1)
    index = 0
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            yield Problem(str(path), f"not valid JSON ({error.msg} at column {error.colno})", error.lineno, index)
            return
        except (RecursionError, ValueError) as error:
            what = "nested too deeply" if isinstance(error, RecursionError) else TOO_LONG_NUMBER
            yield Problem(str(path), f"not valid JSON here ({what})", text.count("\n", 0, position) + 1, index)
            return
        yield Record(str(path), text.count("\n", 0, position) + 1, index, value)
        position = _skip_space(text, end)
        index += 1
        separator = text[position] if position < len(text) else ""
        if separator == "]":
            if text[position + 1:].strip():
                yield _syntax_problem(path, text, position + 1, "text after the closing ]", index)
            return
        if separator != ",":
            yield _syntax_problem(path, text, position, "expected , or ] after an item", index)
            return
        position = _skip_space(text, position + 1)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _syntax_problem(path: Path, text: str, position: int, what: str, index: int) -> Problem:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return Problem(str(path), f"not valid JSON ({what} at column {column})", line, index)


# ---- parsing records ------------------------------------------------------------------------------
class _RecordError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _fail(record: Record, message: str, field: str | None = None) -> _RecordError:
    return _RecordError(record.problem(message, field))


def _object(record: Record, fmt: str, key: str) -> Mapping[str, Any]:
    if not isinstance(record.value, Mapping):
        raise _fail(record, f"each record must be a JSON object ({fmt} format), got {_type(record.value)}")
    if key not in record.value:
        found = _keys(record.value)
        raise _fail(record, f"missing (the file's format is {fmt}; this record has keys: {found})", key)
    return record.value


def _text_field(record: Record, value: Any, field: str, *, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(record, f"must be text, got {_type(value)}", field)
    if not optional and not value.strip():
        raise _fail(record, "is empty: give it text or remove the record", field)
    return value


def _keys(keys: Any, most: int = 8) -> str:
    """An object's keys for a message: each on one line and short, the first few."""
    names = [key if isinstance(key, str) and key.isprintable() and len(key) <= 40 else _shown(key)
             for key in list(keys)[: most + 1]]
    listed = ", ".join(names[:most]) + (", ..." if len(names) > most else "")
    return listed or "none"


def _shown(value: Any) -> str:
    """A value on one line and short (a message never echoes a whole record)."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (bool, float)) or value is None:
        text = json.dumps(value)
    else:
        text = _type(value)  # a list, an object, or an integer that may have thousands of digits
    return text if len(text) <= 40 else f"{text[:37]}..."


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_alpaca(record: Record) -> Example:
    data = _object(record, "alpaca", "instruction")
    if "output" not in data:
        raise _fail(record, "missing: an alpaca record needs the answer to learn", "output")
    return Example.instruct(
        instruction=_text_field(record, data["instruction"], "instruction"),
        input=_text_field(record, data.get("input"), "input", optional=True),
        output=_text_field(record, data["output"], "output"),
        where=record.where,
    )


def _require_turn(record: Record, item: Any, keys: tuple[str, str], where: str) -> None:
    """One turn of a dialog: an object holding both `keys` (messages: role and content; ShareGPT: from and value)."""
    if not isinstance(item, Mapping):
        raise _fail(record, f"must be an object with {keys[0]} and {keys[1]}, got {_type(item)}", where)
    for key in keys:
        if key not in item:
            raise _fail(record, "missing", f"{where}.{key}")


def parse_messages(record: Record) -> Example:
    data = _object(record, "messages", "messages")
    items = _list_field(record, data["messages"], "messages")
    messages = []
    for i, item in enumerate(items):
        _require_turn(record, item, ("role", "content"), f"messages[{i}]")
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise _fail(record, f"unknown keys {_keys(extra)}: a message has role and content", f"messages[{i}]")
        if not isinstance(item["role"], str) or item["role"] not in {role.value for role in Role}:
            raise _fail(record, f"unknown role {_shown(item['role'])}: use system, user, assistant", f"messages[{i}].role")
        content = _text_field(record, item["content"], f"messages[{i}].content")
        messages.append(Message(item["role"], content))
    return _dialog_example(record, messages, "messages")


def parse_sharegpt(record: Record) -> Example:
    data = _object(record, "sharegpt", "conversations")
    items = _list_field(record, data["conversations"], "conversations")
    messages = []
    if data.get("system") is not None:
        messages.append(Message(Role.SYSTEM, _text_field(record, data["system"], "system")))
    for i, item in enumerate(items):
        _require_turn(record, item, ("from", "value"), f"conversations[{i}]")
        if not isinstance(item["from"], str) or item["from"] not in SHAREGPT_ROLES:
            raise _fail(record, f"unknown speaker {_shown(item['from'])}: use human, gpt, system", f"conversations[{i}].from")
        content = _text_field(record, item["value"], f"conversations[{i}].value")
        messages.append(Message(SHAREGPT_ROLES[item["from"]], content))
    return _dialog_example(record, messages, "conversations", hint=" (human is the user, gpt the assistant)")


def _list_field(record: Record, value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(record, f"must be a list of messages, got {_type(value)}", field)
    if not value:
        raise _fail(record, "is empty: give at least a user message and the assistant's answer", field)
    return value


def _dialog_example(record: Record, messages: list[Message], field: str, hint: str = "") -> Example:
    try:
        return Example.chat(messages, where=record.where)
    except DialogError as error:
        raise _fail(record, f"{error}{hint}", field) from None


PARSERS = {"alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "messages": parse_messages}
