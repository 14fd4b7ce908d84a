"""The same option has the same name in every command (`--data`, `--output`); the former spellings
(`fit --dataset`, `convert/merge --out`) still work for scripts, hidden from the help."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner
from test_gpus_cli import NO_DRIVER

from llmplan.cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"
FORMER = {"--dataset": "--data", "--out": "--output"}


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    ctx = click.Context(group)
    found = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found |= commands(command, (*path, name))
        else:
            found[(*path, name)] = command
    return found


def shown_options(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option) and not param.hidden
            for name in (*param.opts, *param.secondary_opts)}


def test_no_command_shows_a_former_spelling() -> None:
    shown = {path: shown_options(command) for path, command in commands().items()}
    assert {path for path, options in shown.items() if options & set(FORMER)} == set()
    assert "--data" in shown[("fit",)] and "--data" in shown[("submit", "finetune")]
    assert "--output" in shown[("merge",)] and "--output" in shown[("convert",)]


def test_fit_reads_the_data_by_either_spelling() -> None:
    runs = [CliRunner().invoke(cli, ["fit", "7B", "--gpu", "A100-80GB", option, str(DATA), "--json"],
                               obj={"nvml": NO_DRIVER, "nvcc": None}) for option in ("--data", "--dataset")]
    assert [run.exit_code for run in runs] == [0, 0], [run.output for run in runs]
    documents = [json.loads(run.stdout) for run in runs]
    assert documents[0] == documents[1] and str(DATA) in json.dumps(documents[0])


def test_merge_takes_its_output_by_either_spelling() -> None:
    merge = commands()[("merge",)]
    for option in ("--output", "--out"):
        assert merge.make_context("merge", ["BASE", "ADAPTER", option, "/tmp/x"]).params["output"] == Path("/tmp/x")
