"""What the model store and the Meta checkpoint converter share: the store's error, the provenance file a
conversion leaves, building a directory atomically, progress lines, and Llama-2-chat's template.
Light: stdlib only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

# Bump when the files a conversion writes change, so older cached conversions are made again.
CONVERTER_VERSION = 1
PROVENANCE_FILE = "llmplan-source.json"


class ModelStoreError(ValueError):
    """A model llmplan cannot make local; the message says what to do instead."""


# Llama-2-chat's prompt format ([INST], <<SYS>>), as in meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


# ---- building directories atomically ---------------------------------------------------------------
@contextlib.contextmanager
def building(dst: Path) -> Iterator[Path]:
    """A temporary sibling of `dst` that becomes `dst` only when the block completes.

    A crash or an exception removes the temporary directory (a killed process leaves a hidden
    `.NAME.partial-*` sibling, never a half `dst`). Raises FileExistsError when another process
    finished `dst` first.
    """
    require_new_directory(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        try:
            os.rename(tmp, dst)
        except OSError as error:
            if dst.is_dir() and any(dst.iterdir()):
                raise FileExistsError(str(dst)) from error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def require_new_directory(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelStoreError(f"{dst} already exists and is not empty: choose a new directory or delete it")


def write_provenance(folder: Path, **fields: Any) -> None:
    record = {"converter": CONVERTER_VERSION, "created_at": datetime.now(timezone.utc).isoformat(), **fields}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_provenance(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- progress ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Steps:
    """Say what a long conversion is doing, on stderr (or `stream`), when progress is on; stay silent otherwise."""

    progress: bool
    stream: TextIO | None = None  # e.g. the terminal while the libraries' output goes to a log (`llmplan merge`)

    @contextlib.contextmanager
    def step(self, text: str, *, spinner: bool = True, expect: str = "") -> Iterator[None]:
        """One step: a spinner while it runs on a terminal, else (and for steps that draw their own bars) a
        line as it starts; a line with its time when it ends."""
        if not self.progress:
            yield
            return
        from rich.console import Console

        # soft_wrap: a long path stays on its line where stderr is a log, not the terminal's 80 columns
        console = Console(file=self.stream, stderr=self.stream is None, soft_wrap=True)
        start = time.monotonic()
        running = f"{text} ({expect}) ..." if expect else f"{text} ..."
        if spinner and console.is_terminal:
            with _spinner(console, running, keep_library_output_out=self.stream is not None):
                yield
        else:
            console.print(running)
            yield
        console.print(f"[green]done[/green] {text} ({time.monotonic() - start:.1f} s)")


def _spinner(console: Any, text: str, *, keep_library_output_out: bool) -> Any:
    """A spinner with `text` until the block ends (rich's `Console.status`). Rich shows what the block prints to
    sys.stdout/stderr above its spinner, on its console: with `keep_library_output_out`, it leaves them alone, so that
    the libraries' output stays where `library_output_to` sends it and only the step lines reach `console`."""
    from rich.live import Live
    from rich.spinner import Spinner

    redirect = not keep_library_output_out
    return Live(Spinner("dots", text=text, style="status.spinner"), console=console, refresh_per_second=12.5,
                transient=True, redirect_stdout=redirect, redirect_stderr=redirect)


def gist(error: Exception, limit: int = 240) -> str:
    """The first two lines of a library's (often long) error, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = " ".join(lines[:2])
    return text if len(text) <= limit else text[: limit - 3] + "..."
