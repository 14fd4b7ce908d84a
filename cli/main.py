"""The `llmplan` command.

Subcommands are imported only when they run, so `llmplan estimate` and `llmplan fit` never pay for
(or import) the job store, Ray or the heavy runtime stack.
"""

from __future__ import annotations

import importlib
import importlib.util

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

    @staticmethod
    def _module_exists(cmd_name: str) -> bool:
        module_name = COMMANDS[cmd_name].split(":")[0]
        return importlib.util.find_spec(f"llmplan.cli.{module_name}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmplan")
def cli() -> None:
    """Plan, run and record LLM fine-tuning and inference on the GPUs you have."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
