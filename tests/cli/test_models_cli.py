"""`llmplan models list|pull`, `llmplan convert`, `llmplan merge`: listing and bad input (no model loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmplan.cli.main import cli


def run(args: list[str], cache: Path):
    return CliRunner().invoke(cli, args, env={"LLMPLAN_CACHE": str(cache)})


def fake_conversion(cache: Path) -> Path:
    """A finished Meta conversion as the cache holds it (its provenance record and 1000 bytes of weights)."""
    folder = cache / "converted" / "llama-2-7b-chat-0123456789ab"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "llmplan-source.json").write_text(json.dumps(
        {"converter": 1, "name": "llama-2-7b-chat", "source": "meta checkpoint", "origin": "/data/llama-2-7b-chat"}))
    (cache / "converted" / ".llama-2-13b.partial-x1y2").mkdir()  # an interrupted run: not listed
    return folder


def test_list_shows_the_runnable_model_and_how_to_pull_it(tmp_path: Path) -> None:
    result = run(["models", "list"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "SmolLM2-135M-Instruct" in result.output
    assert "llmplan models pull smollm2-135m-instruct" in result.output
    assert "The cache is empty." in result.output


def test_list_json_reports_the_cache_with_sizes(tmp_path: Path) -> None:
    folder = fake_conversion(tmp_path)
    result = run(["models", "list", "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cache"] == str(tmp_path)
    assert [(m["name"], m["pulled"]) for m in data["runnable"]] == [("SmolLM2-135M-Instruct", False)]
    [item] = data["cached"]
    assert item == {"kind": "converted", "name": "llama-2-7b-chat", "path": str(folder),
                    "size_bytes": folder.joinpath("model.safetensors").stat().st_size
                    + folder.joinpath("llmplan-source.json").stat().st_size,
                    "origin": "/data/llama-2-7b-chat"}


def test_list_table_shows_cached_conversions(tmp_path: Path) -> None:
    fake_conversion(tmp_path)
    result = run(["models", "list"], tmp_path)
    assert "llama-2-7b-chat" in result.output and "/data/llama-2-7b-chat" in result.output
    assert "partial" not in result.output


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["models", "pull", "Llama-2-7B"], ("hub downloads are not available", "llmplan models pull smollm2-135m-instruct")),
    (["models", "pull", "gpt-17"], ("unknown model 'gpt-17'",)),
    (["convert", "/no/such/llama"], ("no such directory: /no/such/llama",)),
    (["merge", "/no/such/base", "/no/such/adapter", "--out", "/tmp/x"], ("no such directory: /no/such/adapter",)),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragments: tuple[str, ...]) -> None:
    one_line_error(run(args, tmp_path), *fragments)


def test_convert_refuses_directories_that_are_not_meta_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    one_line_error(run(["convert", str(tmp_path / "hf")], tmp_path), "already a Hugging Face directory")
    one_line_error(run(["convert", str(tmp_path)], tmp_path / "cache"), "has no params.json")


def test_merge_refuses_a_directory_without_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    result = run(["merge", "smollm2-135m-instruct", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")], tmp_path)
    one_line_error(result, "no adapter_config.json")


def test_models_list_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom llmplan.cli.main import cli\n"
        "try:\n    cli.main(args=['models', 'list', '--json'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('HEAVY:' + ','.join(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"LLMPLAN_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:"
