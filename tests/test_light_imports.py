"""Planning never imports the heavy stack: `import llmplan.planner`, `llmplan estimate`, `llmplan fit`; `llmplan
--help` and `estimate` not even the job store (sqlmodel, sqlalchemy: half a second)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "ray", "peft", "bitsandbytes", "deepspeed", "fastapi", "uvicorn")
STORE = ("sqlmodel", "sqlalchemy")

PROBE = """
import sys
{body}
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def heavy_modules_after(body: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    code = PROBE.format(body=body, heavy=heavy)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("HEAVY:"))
    return [name for name in line[len("HEAVY:"):].split(",") if name]


def test_importing_the_planner_imports_nothing_heavy() -> None:
    body = "import llmplan.planner, llmplan.planner.estimator, llmplan.planner.resolve, llmplan.planner.gpus"
    assert heavy_modules_after(body) == []


def test_the_heavy_stack_is_installed_so_the_check_means_something() -> None:
    assert heavy_modules_after("import torch, transformers") == ["torch", "transformers"]


@pytest.mark.parametrize("args", [["estimate", "7B", "--json"], ["fit", "7B", "--gpus", "1", "--json"]])
def test_planning_commands_import_nothing_heavy(args: list[str]) -> None:
    assert heavy_modules_after(running(args)) == []


@pytest.mark.parametrize("args", [["--help"], ["estimate", "7B"], ["estimate", "7B", "--json"]])
def test_help_and_estimate_import_no_job_store(args: list[str]) -> None:
    assert heavy_modules_after(running(args), STORE + HEAVY) == []


def test_help_lists_each_command_with_its_own_short_help() -> None:
    """`--help` reads the docstrings from source: the list is what click shows from the imported commands."""
    from click.testing import CliRunner

    from llmplan.cli.main import cli

    listed = CliRunner().invoke(cli, ["--help"], terminal_width=200).output.split("Commands:\n")[1].splitlines()
    context = cli.make_context("llmplan", [], resilient_parsing=True)
    names = cli.list_commands(context)
    limit = 200 - 6 - max(map(len, names))
    expected = [f"  {name:<{max(map(len, names))}}  {cli.get_command(context, name).get_short_help_str(limit)}"
                for name in names]
    assert [line.rstrip() for line in listed if line.strip()] == [line.rstrip() for line in expected]


def test_the_command_side_of_generate_and_chat_imports_no_model_stack() -> None:
    """`generate` and `chat` hand the prompts to a Ray actor, which loads the model: the command itself never imports
    torch or transformers (7 s of a repeated `generate` on a loaded 2-CPU machine, whose model is already warm)."""
    body = ("import llmplan.cli.generate, llmplan.cli.chat, llmplan.runtime.infer.inference_job, "
            "llmplan.runtime.infer.ray_inference, llmplan.runtime.infer.generation")
    assert heavy_modules_after(body, ("torch", "transformers", "peft", "bitsandbytes")) == []


def running(args: list[str]) -> str:
    return ("from llmplan.cli.main import cli\n"
            f"try:\n    cli.main(args={args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n")


MIGRATIONS_AND_OTHER_DIALECTS = ("alembic", "sqlalchemy.dialects.postgresql")


@pytest.mark.parametrize("args", [["jobs"], ["show", "1"]])
def test_jobs_and_show_on_a_current_store_import_no_migrations_nor_postgresql(args: list[str], tmp_path) -> None:
    """On a store whose schema is current, reading it needs neither alembic nor SQLAlchemy's PostgreSQL dialects
    (a tenth of the start-up of `jobs` and `show`, which users run often)."""
    from llmplan.runtime.store.opening import open_store
    from llmplan.runtime.store.repository import JobKind, JobSpec, create_job

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = open_store(url)
    create_job(engine, JobSpec(name="light", kind=JobKind.FINETUNE, model="m", submitter="s", request={}))
    engine.dispose()
    assert heavy_modules_after(running([*args, "--db", url]), MIGRATIONS_AND_OTHER_DIALECTS + HEAVY) == []


# What reading the store does not need: SQLModel and its stack, the store's model classes, the planner's plans (0.1 s)
NOT_FOR_READING = ("sqlmodel", "pydantic", "sqlalchemy.orm", "llmplan.runtime.store.models", "llmplan.planner.plan")


@pytest.mark.parametrize("args", [["jobs"], ["jobs", "--json"], ["show", "1"], ["show", "1", "--json"]])
def test_jobs_and_show_read_the_store_without_sqlmodel_nor_the_orm(args: list[str], tmp_path) -> None:
    """`jobs` and `show` read rows through SQLAlchemy Core (`runtime.store.reading`): SQLModel, pydantic and the ORM
    are 0.3 s of CPU of their start-up, which users pay on every call (target: 0.6 s in all)."""
    from llmplan.runtime.store.opening import open_store
    from llmplan.runtime.store.repository import JobKind, JobSpec, create_job

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = open_store(url)
    create_job(engine, JobSpec(name="light", kind=JobKind.SERVE, model="m", submitter="s", request={}))
    engine.dispose()
    assert heavy_modules_after(running([*args, "--db", url]), NOT_FOR_READING + HEAVY) == []
