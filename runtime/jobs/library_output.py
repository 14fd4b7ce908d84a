"""Third-party output kept out of the terminal: what torch, transformers, peft, bitsandbytes and DeepSpeed
print while llmplan works (warnings, log lines, progress bars, C-level messages) goes to a log file.

    with terminal_stderr() as terminal, library_output_to(command_log("merge")):
        ...                              # anything written to file descriptors 1 and 2 lands in the log,
        print("saving ...", file=terminal)  # llmplan's own progress lines reach the terminal
    click.echo(result)                   # llmplan's own lines reach the terminal as before

The redirection is at the file-descriptor level, so it catches what libraries write from C too and
what loggers bound to the original streams write; Python's sys.stdout / sys.stderr are flushed at both ends
so nothing is reordered. Stdlib only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from llmplan.runtime.jobs.paths import jobs_dir

STDOUT, STDERR = 1, 2


def command_log(command: str) -> Path:
    """Where a command that runs no job (e.g. `llmplan merge`) keeps its libraries' output: beside the jobs
    folder, in logs/COMMAND.log."""
    return jobs_dir().parent / "logs" / f"{command}.log"


@contextmanager
def library_output_to(log: Path, descriptors: tuple[int, ...] = (STDOUT, STDERR)) -> Iterator[Path]:
    """Send everything written to `descriptors` inside the block to `log` (appended), then restore them."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _flush()
    saved = {fd: os.dup(fd) for fd in descriptors}
    with log.open("ab") as sink:
        try:
            for fd in descriptors:
                os.dup2(sink.fileno(), fd)
            yield log
        finally:
            _flush()
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or detached stream has nothing to flush
            pass


@contextmanager
def terminal_stderr() -> Iterator[TextIO]:
    """A stream on stderr as it is now (the terminal), which keeps reaching it while `library_output_to` sends file
    descriptor 2 to a log: where llmplan's own progress lines go inside that block."""
    stream = os.fdopen(os.dup(STDERR), "w", buffering=1)
    try:
        yield stream
    finally:
        stream.close()
