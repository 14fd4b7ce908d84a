"""Every `llmplan ...` command llmplan prints for the user is parsed here by the real click commands: `fit`'s
suggested commands and job specs (text and JSON), the dashboard's /api/plan job specs, and the hints in
messages across the code. An option or subcommand that does not exist fails the test (`generate` has no
--model; a hint naming a removed flag would no longer parse).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from test_gpus_cli import NO_DRIVER

from llmplan.cli.commands import DATA_PLACEHOLDER, PROGRAM
from llmplan.cli.main import cli
from llmplan.cli.submit import spec_values

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "alpaca_llmplan.jsonl"
SOURCES = ("cli", "runtime", "planner")

# Commands in a message: between backticks, or in parentheses when a subcommand follows (else it is prose,
# "(llmplan runs local directories)"); in `fit`'s output also a line of their own.
SUBCOMMANDS = "|".join(cli.list_commands(click.Context(cli)))
COMMAND_IN_MESSAGE = re.compile(rf"\(({PROGRAM} (?:{SUBCOMMANDS})\b[^)]*)\)|`({PROGRAM}[^`]*)`")
COMMAND_IN_OUTPUT = re.compile(rf"^\s*({PROGRAM} .+)$|{COMMAND_IN_MESSAGE.pattern}", re.MULTILINE)


def parse_printed(command: str, *, complete: bool = True) -> click.Context:
    """Parse `command` as the shell and the `llmplan` program would, the data placeholder replaced by a real
    file. `complete`: every required option and argument is there, each value valid; a hint in a message may
    show only the part that matters, with placeholders (SPEC.yaml), but every subcommand and option it names
    must exist."""
    words = [str(DATA) if word == DATA_PLACEHOLDER else word for word in shlex.split(command)]
    assert words[0] == PROGRAM, command
    command_, args = cli, words[1:]
    ctx = click.Context(cli, info_name=PROGRAM)
    name = PROGRAM
    while isinstance(command_, click.Group) and args and not args[0].startswith("-"):
        name, command_, args = command_.resolve_command(ctx, args)  # an unknown subcommand fails here
        ctx = click.Context(command_, info_name=name, parent=ctx)
    if isinstance(command_, click.Group) and not args:
        return ctx  # a group named alone (`llmplan cluster`)
    try:
        return command_.make_context(name, args, parent=ctx.parent)
    except click.BadParameter:  # a missing or placeholder value; unknown options are NoSuchOption
        if complete:
            raise
        return ctx


def commands_in(text: str, pattern: re.Pattern = COMMAND_IN_OUTPUT) -> list[str]:
    return [next(group for group in match.groups() if group) for match in pattern.finditer(text)]


def fit(*args: str) -> str:
    result = CliRunner(env={"COLUMNS": "400"}).invoke(cli, ["fit", *args], obj={"nvml": NO_DRIVER, "nvcc": None})
    assert result.exit_code == 0, result.output
    return result.stdout


def yaml_spec(text: str) -> dict:
    block = text.split("Job spec (YAML):\n")[1].split("\n\n")[0]
    return yaml.safe_load("\n".join(line[2:] for line in block.splitlines() if line.startswith("  ")))


def parse_job_spec(spec: dict) -> tuple[str, dict]:
    """As `llmplan submit SPEC.yaml` reads it: by the submit command's own options."""
    with_data = {key: str(DATA) if value == DATA_PLACEHOLDER else value for key, value in spec.items()}
    return spec_values(with_data, where="printed job spec")


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory's config.json (all `fit` reads), at a path with a space in it."""
    folder = tmp_path_factory.mktemp("models") / "my llama"
    folder.mkdir()
    folder.joinpath("config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}))
    return folder


FIT_ASKS = {
    "no GPU, catalog model without weights": ("7B",),
    "four cards, full fine-tuning (DeepSpeed)": ("7B", "--gpu", "A10", "--gpus", "4", "--method", "full",
                                                 "--deepspeed", "--epochs", "2", "--tokens", "100000"),
    "LoRA targets and rank": ("7B", "--gpu", "A100 80GB", "--lora-r", "16", "--lora-targets", "q_proj,v_proj",
                              "--method", "lora"),
    "runnable catalog model": ("SmolLM2-135M-Instruct", "--gpu", "RTX 4090"),
    "inference, replicas": ("7B", "--gpu", "H100", "--gpus", "2", "--task", "infer"),
    "inference, one sharded copy": ("70B", "--gpu", "H100", "--gpus", "2", "--task", "infer"),
    "quantized inference": ("70B", "--gpu", "A100 80GB", "--task", "infer"),
    "slots engine, batch for the prompts": ("7B", "--gpu", "H200", "--task", "infer", "--prompts", "300"),
    "long context, activation offload": ("Llama-3-8B", "--gpu", "RTX 4090", "--method", "qlora", "--seq-len", "32768",
                                         "--batch-size", "1"),
}


def test_an_activation_offload_plan_is_submitted_with_it() -> None:
    document = json.loads(fit(*FIT_ASKS["long context, activation offload"], "--json"))
    assert parse_printed(document["recommendation"]["command"]).params["activation_offload"] is True
    assert document["recommendation"]["job"]["activation-offload"] is True


@pytest.mark.parametrize("args", FIT_ASKS.values(), ids=FIT_ASKS.keys())
def test_every_command_and_job_spec_fit_prints_parses(args: tuple[str, ...]) -> None:
    text = fit(*args)
    printed = commands_in(text)
    assert any(command.startswith(("llmplan submit", "llmplan generate")) for command in printed), text
    for command in printed:
        parse_printed(command, complete=command.startswith(("llmplan submit", "llmplan generate")))
    parse_job_spec(yaml_spec(text))
    document = json.loads(fit(*args, "--json"))
    for section in ("recommendation", "inference"):
        if document.get(section):
            parse_printed(document[section]["command"])
    parse_job_spec(document["recommendation"]["job"])


def test_generate_is_suggested_with_the_model_as_its_argument() -> None:
    """The bug this file exists for: `llmplan generate --model ...` ("No such option: --model")."""
    command = json.loads(fit("7B", "--json"))["inference"]["command"]
    ctx = parse_printed(command)
    assert ctx.params["model"] == "PATH/TO/Llama-2-7B" and ctx.params["prompts"] == ("PROMPT",)
    with pytest.raises(click.NoSuchOption):
        parse_printed("llmplan generate --model Llama-2-7B PROMPT")


def test_fit_names_the_model_as_submit_can_run_it(local_model_dir: Path) -> None:
    """A catalog model llmplan cannot download gets a placeholder for its weights' directory; a runnable
    catalog model keeps its name (submit pulls it); a local directory keeps the path typed (quoted)."""
    for model, expected in (("7B", "PATH/TO/Llama-2-7B"), ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
                            (str(local_model_dir), str(local_model_dir))):
        document = json.loads(fit(model, "--gpu", "RTX 4090", "--json"))
        assert document["recommendation"]["job"]["model"] == expected
        assert parse_printed(document["recommendation"]["command"]).params["model"] == expected


def test_the_dashboards_job_specs_parse_once_the_form_adds_the_data() -> None:
    from llmplan.cli.web_actions import plan_json

    for body in ({"model": "7B", "gpu": "A10", "gpus": 2}, {"model": "7B", "task": "infer", "gpu": "H100"}):
        document = plan_json(body, (Path.cwd(),))
        assert document["candidates"]
        for candidate in document["candidates"]:
            job = candidate["job"]
            task, _ = parse_job_spec({**job, "data": str(DATA)} if job["task"] == "finetune" else job)
            assert task == job["task"]


# ---- hints in messages ------------------------------------------------------------------------------------
def docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def rendered(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with each replacement field as "1" (job ids, mostly)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "1" for part in node.values)
    return None


def message_hints() -> list[tuple[str, str]]:
    """(where, command) for each `llmplan ...` in a string the code prints (docstrings left out)."""
    hints = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skipped = docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    skipped.update(id(part) for part in node.values)
            for node in ast.walk(tree):
                text = rendered(node) if id(node) not in skipped else None
                for command in commands_in(text or "", COMMAND_IN_MESSAGE):
                    hints.append((f"{path.relative_to(ROOT)}:{node.lineno}", command))
    return hints


def test_every_llmplan_command_named_in_a_message_parses() -> None:
    hints = message_hints()
    assert len(hints) >= 8, hints  # the scan finds what it should
    assert any("llmplan logs 1 --follow" in command for _, command in hints)
    for where, command in hints:
        try:
            parse_printed(command, complete=False)
        except click.UsageError as error:
            raise AssertionError(f"{where}: `{command}` does not run: {error.format_message()}") from None
