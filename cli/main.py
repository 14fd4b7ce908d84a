"""The `llmplan` command.

Subcommands are imported only when they run, so `llmplan estimate` and `llmplan fit` never pay for
(or import) the job store, Ray or the heavy runtime stack; `llmplan --help` imports none of them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import click

# command name -> "module:attribute" under llmplan.cli
COMMANDS: dict[str, str] = {
    "estimate": "estimate:estimate",
    "fit": "fit:fit",
    "generate": "generate:generate",
    "gpus": "gpus:gpus",
    "jobs": "jobs:jobs",
    "logs": "logs:logs",
    "chat": "chat:chat",
    "show": "jobs:show",
    "submit": "submit:submit",
    "models": "models:models",
    "convert": "convert:convert",
    "merge": "merge:merge",
    "cancel": "cancel:cancel",
    "cluster": "cluster:cluster",
    "ui": "ui:ui",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._module_exists(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not self._module_exists(cmd_name):
            return None
        module_name, attribute = target.split(":")
        module = importlib.import_module(f"llmplan.cli.{module_name}")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's docstring read from its source, not imported (that costs seconds)."""
        listed = [(name, click.Command(name, help=command_docstring(name))) for name in self.list_commands(ctx)]
        if not listed:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in listed)
        with formatter.section("Commands"):
            formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in listed])

    @staticmethod
    def _module_exists(cmd_name: str) -> bool:
        module_name = COMMANDS[cmd_name].split(":")[0]
        return importlib.util.find_spec(f"llmplan.cli.{module_name}") is not None


def command_docstring(cmd_name: str) -> str | None:
    """The docstring of the function behind a subcommand (click's help text for it), from its module's source."""
    module_name, attribute = COMMANDS[cmd_name].split(":")
    spec = importlib.util.find_spec(f"llmplan.cli.{module_name}")
    tree = ast.parse(Path(spec.origin).read_text())
    return next((ast.get_docstring(node) for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == attribute), None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmplan")
def cli() -> None:
    """Plan, run and record LLM fine-tuning and inference on the GPUs you have."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
