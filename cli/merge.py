"""`llmplan merge BASE ADAPTER --out DIR`: fold a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path

import click

from llmplan.runtime.model_store import ModelStoreError, merge_adapter

from .options import UserError, user_errors


@click.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A new directory for the merged model.")
@user_errors(ModelStoreError)
def merge(base: str, adapter: Path, out: Path) -> None:
    """Merge the PEFT LoRA adapter in ADAPTER into BASE and save a plain Hugging Face directory at --out.

    BASE is what the adapter was trained on: a Hugging Face directory, a Meta checkpoint directory or
    smollm2-135m-instruct. The merged model loads without PEFT and runs at the base model's speed.
    """
    if not adapter.expanduser().is_dir():
        raise UserError(f"no such directory: {adapter} (give the directory a PEFT adapter was saved to)")
    path = merge_adapter(base, adapter, out)
    click.echo(path)
