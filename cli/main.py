"""The `llmplan` command.

Subcommands are imported only when they run, so `llmplan estimate` and `llmplan fit` never pay for
(or import) the job store, Ray or the heavy runtime stack; `llmplan --help` imports none of them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path

import click

# Set to see the traceback of an unexpected error instead of its one-line report.
DEBUG_VARIABLE = "LLMPLAN_DEBUG"
EXIT_SYSTEM_FAILED = 1

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
    "serve": "serve:serve",
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

    def invoke(self, ctx: click.Context):
        """Run the subcommand; whatever goes wrong ends as one line on stderr (see `OneLineError`)."""
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # click's own parsing errors, without the usage dump
            where = error.ctx.command_path if error.ctx is not None else ctx.command_path
            raise OneLineError(f"{error.format_message()} (see `{where} --help`)", error.exit_code) from None
        except click.ClickException as error:
            raise OneLineError(error.format_message(), error.exit_code) from None
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt, EOFError, SystemExit):
            raise
        except MemoryError:
            raise OneLineError("out of memory", EXIT_SYSTEM_FAILED) from None
        except Exception as error:  # a bug: the last resort, so that the user never gets a traceback
            if os.environ.get(DEBUG_VARIABLE):
                raise
            raise OneLineError(f"internal error, {type(error).__name__}: {error} (a bug in llmplan; "
                               f"{DEBUG_VARIABLE}=1 shows the traceback)", EXIT_SYSTEM_FAILED) from None

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


class OneLineError(click.ClickException):
    """An error printed as exactly one line ("Error: ..."): the rule every command keeps."""

    def __init__(self, message: str, exit_code: int) -> None:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__("; ".join(lines) or "failed")
        self.exit_code = exit_code


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
