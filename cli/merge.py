"""`llmplan merge BASE ADAPTER --output DIR`: fold a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path

import click

from llmplan.runtime.models.model_store import ModelStoreError

from .options import UserError, former_spelling, user_errors


@click.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), required=True, help="A new directory for the merged model.")
@former_spelling("--out", "output", type=click.Path(path_type=Path))
@user_errors(ModelStoreError)
def merge(base: str, adapter: Path, output: Path) -> None:
    """Merge the PEFT LoRA adapter in ADAPTER into BASE and save a plain Hugging Face directory at --output.

    BASE is what the adapter was trained on: a Hugging Face directory, a Meta checkpoint directory or
    smollm2-135m-instruct. The merged model loads without PEFT and runs at the base model's speed, and
    keeps the prompt template the adapter was trained with. Each step (loading, applying the adapter,
    merging, saving) is reported on stderr with its time; what the libraries print goes to a log file
    (~/.llmplan/logs/merge.log), not the terminal.
    """
    click.echo(merge_keeping_template(base, adapter, output))


def merge_keeping_template(base: str, adapter: Path, out: Path, *, progress: bool = True) -> Path:
    """Merge `adapter` into `base` at `out` (the libraries' output in the merge log, the steps on stderr when
    `progress`), with the adapter's prompt template: what `llmplan merge` and the dashboard's Merge run."""
    from llmplan.runtime.jobs.library_output import command_log, library_output_to, terminal_stderr
    from llmplan.runtime.models.model_files import Steps
    from llmplan.runtime.models.model_store import check_merge_paths, ensure_model, merge_adapter
    from llmplan.runtime.text.prompt_templates import carry_template

    if not adapter.expanduser().is_dir():
        raise UserError(f"no such directory: {adapter} (give the directory a PEFT adapter was saved to)")
    check_merge_paths(adapter, out)
    ensure_model(base, progress=progress)  # a catalog base not pulled yet: pulled here, with its own progress
    with terminal_stderr() as terminal, library_output_to(command_log("merge")):
        path = merge_adapter(base, adapter, out, steps=Steps(progress, terminal))
    carry_template(adapter.expanduser(), path)
    return path
