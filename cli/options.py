"""Options and error handling shared by several commands, defined once.

Every number a command reads goes through one of the click types below: an option's value is refused with
one line naming the option (exit 2) before any work starts, so no command meets an overflowing, NaN,
infinite, negative or non-ASCII number later on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click

EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 1

# The largest id a job store hands out (SQLite's and PostgreSQL's 64-bit signed integers).
MAX_JOB_ID = 2**63 - 1
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LONGEST_NUMBER = 40  # characters: enough for any bound below, far below int()'s digit limit


class UserError(click.ClickException):
    """Bad input: one line on stderr ("Error: ..."), exit code 2, no usage dump, no traceback. `param`: the
    parameter at fault, when the error is about one (what a job spec's reader names as its field)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, param: click.Parameter | None = None) -> None:
        super().__init__(message)
        self.param = param


def user_errors(*error_types: type[Exception]) -> Callable:
    """Turn the planner's own exceptions into one-line `UserError`s."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except error_types as error:
                raise UserError(str(error).strip("'\"")) from error

        return wrapper

    return decorate


def parameter_name(param: click.Parameter | None) -> str:
    """How the user spells a parameter: `--seq-len` for an option, `JOB` for an argument."""
    if param is None:
        return "value"
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.human_readable_name


def shown(value: Any) -> str:
    """A value as the user typed it, on one line and short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


class BoundedInt(click.ParamType):
    """A whole number written in ASCII digits, between `low` and `high` inclusive."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = _whole_number(value, param)
        if number < self.low:
            least = {0: "0 or more", 1: "positive"}.get(self.low, f"at least {self.low:,}")
            raise UserError(f"{parameter_name(param)} must be {least}, got {number}", param)
        if number > self.high:
            raise UserError(f"{parameter_name(param)} must be at most {self.high:,}, got {number}", param)
        return number

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "INTEGER"


class FiniteFloat(click.ParamType):
    """A finite decimal number in [low, high] (or (low, high] with `low_open`)."""

    name = "float"

    def __init__(self, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = _decimal(value, param)
        above = number > self.low if self.low_open else number >= self.low
        below = number < self.high if self.high_open else number <= self.high
        if not (above and below):
            raise UserError(f"{parameter_name(param)} must be {self.describe()}, got {number:g}", param)
        return number

    def describe(self) -> str:
        if self.low == 0 and self.low_open and math.isinf(self.high):
            return "a positive number"
        if self.low == 0 and math.isinf(self.high):
            return "0 or more"
        low = f"{'above' if self.low_open else 'at least'} {self.low:g}"
        high = f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return f"{low} and {high}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "NUMBER"


class JobIdType(click.ParamType):
    """A job id as `llmplan jobs` lists them: 1, 2, ... (a leading # is allowed)."""

    name = "job"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_job_id(value, parameter_name(param) if param is not None else "JOB")
        except UserError as error:
            raise UserError(error.message, param) from None


class SizeType(click.ParamType):
    """A byte size with its unit, as `planner.units.parse_size` reads it (24GiB, 80G, 16000MiB)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from llmplan.planner.units import parse_size

        try:
            return parse_size(value)
        except ValueError as error:
            raise UserError(f"{parameter_name(param)}: {error}", param) from None


class OutputDirType(click.Path):
    """A directory a job may write into: an existing writable folder, or a new one under a writable folder.

    Checked at submission, so that a path under a file or an unwritable folder is the user's error now
    rather than a failed job later. Nothing is created here. A `click.Path`, so that whoever confines
    paths (the dashboard) finds it among the path options."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        name = parameter_name(param)
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str) or not text.strip() or "\x00" in text:
            raise UserError(f"{name}: give a directory path, got {shown(value)}", param)
        path = Path(text).expanduser().absolute()
        existing = next(folder for folder in (path, *path.parents) if folder.exists() or folder == folder.parent)
        if not existing.is_dir():
            where = "is a file" if existing == path else f"lies under the file {existing}"
            raise UserError(f"{name}: {text} {where}: give a directory", param)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{name}: {existing} is not writable: give a directory you can write to", param)
        return text


def lora_needs_lora(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of --method and the --lora-* options: LoRA options with --method full are refused.

    Whichever of them click reads second sees the other in `ctx.params`, so one check covers any order."""
    lora_names = ("lora_r", "lora_targets")
    method = value if param.name == "method" else ctx.params.get("method")
    given = [f"--{name.replace('_', '-')}" for name in lora_names
             if (name == param.name or name in ctx.params) and _given(ctx, name)]
    if method == "full" and given:
        raise UserError(f"{', '.join(given)}: LoRA options need --method lora, qlora or auto, not full fine-tuning",
                        param)
    return value


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def parse_job_id(text: Any, name: str = "JOB") -> int:
    """The job id in `text` (`12`, `#12`), or a `UserError` naming `name`."""
    cleaned = text.strip().lstrip("#") if isinstance(text, str) else str(text)
    if not (_is_whole_number(cleaned) and cleaned[0] not in "+-" and 1 <= int(cleaned) <= MAX_JOB_ID):
        raise UserError(f"{name} must be a job id (a number from 1, as `llmplan jobs` lists them), got {shown(text)}")
    return int(cleaned)


def _is_whole_number(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= _LONGEST_NUMBER and _WHOLE_NUMBER.fullmatch(text) is not None


def _whole_number(value: Any, param: click.Parameter | None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else value
    if not _is_whole_number(text):
        raise UserError(f"{parameter_name(param)}: {shown(value)} is not a whole number", param)
    return int(text)


def _decimal(value: Any, param: click.Parameter | None) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = value.strip() if isinstance(value, str) else value
        if not (isinstance(text, str) and len(text) <= _LONGEST_NUMBER and _DECIMAL.fullmatch(text)):
            raise UserError(f"{parameter_name(param)} must be a number such as 0.5 or 2e-4, got {shown(value)}", param)
        number = float(text)
    if not math.isfinite(number):
        raise UserError(f"{parameter_name(param)} must be a finite number, got {shown(value)}", param)
    return number


# ---- the types commands declare ---------------------------------------------------------------------
INFINITY = math.inf
MAX_TOKENS = 2**24  # a sequence, prompt or generation length (16M tokens: far beyond any model's context)
MAX_BATCH = 2**20
MAX_GPUS = 4096
MAX_STEPS = 10**9

TOKENS = BoundedInt(1, MAX_TOKENS)
BATCH = BoundedInt(1, MAX_BATCH)
GPUS = BoundedInt(1, MAX_GPUS)
WORKERS = BoundedInt(1, 1024)
LORA_RANK = BoundedInt(1, 2**16)
STEPS = BoundedInt(1, MAX_STEPS)
STEPS_OR_ZERO = BoundedInt(0, MAX_STEPS)
DATA_TOKENS = BoundedInt(1, 10**15)
ROWS = BoundedInt(1, 10**6)
SEED = BoundedInt(0, 2**32 - 1)
PRIORITY = BoundedInt(-10**6, 10**6)
EPOCHS = FiniteFloat(0, 10**6, low_open=True)
LEARNING_RATE = FiniteFloat(0, 10, low_open=True)
FRACTION = FiniteFloat(0, 1, high_open=True)  # a share held out or left free: 0 <= x < 1
TEMPERATURE = FiniteFloat(0, 100)
TOP_P = FiniteFloat(0, 1, low_open=True)
JOB_ID = JobIdType()
SIZE = SizeType()
OUTPUT_DIR = OutputDirType()


def former_spelling(old: str, name: str, **attributes: Any) -> Callable:
    """The option's former spelling (`--dataset` for `--data`), hidden and deprecated, kept for the scripts that
    use it: it sets the same value as the option named `name` (the later of the two on a command line wins)."""
    return click.option(old, name, hidden=True, default=None, **attributes)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
model_argument = click.argument("model", metavar="MODEL")


def positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise UserError(f"--{param.name.replace('_', '-')} must be positive, got {value}", param)
    return value


def choice_of(enum: type) -> click.Choice:
    return click.Choice([member.value for member in enum], case_sensitive=False)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
