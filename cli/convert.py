"""`llmplan convert META_DIR [--output DIR]`: a Meta Llama checkpoint as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import click

from llmplan.runtime.models.model_store import ModelStoreError, convert_meta_checkpoint, ensure_model

from .options import UserError, former_spelling, user_errors


@click.command("convert")
@click.argument("meta_dir", metavar="META_DIR", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the Hugging Face directory here (a new directory) instead of into llmplan's cache.")
@former_spelling("--out", "output", type=click.Path(path_type=Path))
@user_errors(ModelStoreError)
def convert(meta_dir: Path, output: Path | None) -> None:
    """Convert a Meta checkpoint (params.json, consolidated.NN.pth, tokenizer.model) for transformers.

    Without --output the result goes into llmplan's cache, where every command that takes MODEL finds it
    again: giving META_DIR to them converts it once on its own, so this command is only needed to
    convert ahead of time or to write the directory somewhere else.
    """
    meta_dir = meta_dir.expanduser()
    if not meta_dir.is_dir():
        raise UserError(f"no such directory: {meta_dir} (give the folder holding params.json and consolidated.00.pth)")
    if (meta_dir / "config.json").exists():
        raise UserError(f"{meta_dir} is already a Hugging Face directory (it has config.json): use it as it is")
    if not (meta_dir / "params.json").exists():
        raise UserError(f"{meta_dir} has no params.json: it is not a Meta checkpoint directory")
    if output is None:
        local = ensure_model(str(meta_dir), progress=True)
        click.echo(local.path)
        click.echo(local.note)
        return
    path = convert_meta_checkpoint(meta_dir, output.expanduser(), progress=True)
    click.echo(path)
