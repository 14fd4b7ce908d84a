"""The `llmplan ...` command lines llmplan prints for the user to run (`llmplan fit`'s suggestions), built in
one place, with the placeholders the user replaces. tests/cli/test_printed_commands.py parses every one
with the real commands, so a suggested option that does not exist fails there.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

PROGRAM = "llmplan"
DATA_PLACEHOLDER = "PATH"  # the data set file
PROMPT_PLACEHOLDER = "PROMPT"  # a prompt to complete
WEIGHTS_PLACEHOLDER_PREFIX = "PATH/TO/"  # the local directory of a catalog model's weights


def weights_placeholder(model_name: str) -> str:
    """What to pass as --model for a catalog model llmplan cannot download: `PATH/TO/Llama-2-7B`."""
    return f"{WEIGHTS_PLACEHOLDER_PREFIX}{model_name}"


def plain(value: Any) -> Any:
    """2.0 -> 2: whole floats printed as integers (options such as --epochs read both)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def command_line(words: Sequence[str], arguments: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> str:
    """`llmplan WORDS... ARGUMENTS... --key value ...`: True is a flag, False its --no- form, None is left out,
    a list repeats its option; every value is quoted for the shell."""
    parts = [PROGRAM, *words, *(shlex.quote(str(argument)) for argument in arguments)]
    for key, value in (options or {}).items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            if item is True:
                parts.append(f"--{key}")
            elif item is False:
                parts.append(f"--no-{key}")
            else:
                parts.append(f"--{key} {shlex.quote(str(plain(item)))}")
    return " ".join(parts)
