"""Planning never imports the heavy stack: `import llmplan.planner`, `llmplan estimate`, `llmplan fit`."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "ray", "peft", "bitsandbytes", "deepspeed", "fastapi", "uvicorn")

PROBE = """
import sys
{body}
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def heavy_modules_after(body: str) -> list[str]:
    code = PROBE.format(body=body, heavy=HEAVY)
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
    body = (
        "from llmplan.cli.main import cli\n"
        f"try:\n    cli.main(args={args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    )
    assert heavy_modules_after(body) == []
