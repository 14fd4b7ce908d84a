"""Options and error handling shared by several commands, defined once."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 1


class UserError(click.ClickException):
    """Bad input: one line on stderr ("Error: ..."), exit code 2, no usage dump, no traceback."""

    exit_code = EXIT_BAD_INPUT


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


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
model_argument = click.argument("model", metavar="MODEL")


def positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise UserError(f"--{param.name.replace('_', '-')} must be positive, got {value}")
    return value


def choice_of(enum: type) -> click.Choice:
    return click.Choice([member.value for member in enum], case_sensitive=False)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
