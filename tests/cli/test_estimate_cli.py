from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmplan.cli.main import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["estimate", *args])


def test_json_has_the_documented_keys() -> None:
    result = run("8B", "--task", "infer", "--batch-size", "4", "--prompt-len", "1024", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "Llama-3.1-8B"
    assert data["params"] == 8_030_261_248
    assert data["peak_bytes"] == sum(data["breakdown"].values())
    assert data["device_bytes"] == data["peak_bytes"] + data["cuda_context_bytes"]
    # On CUDA a Llama runs on the slots engine: its whole static cache, 4 slots x (1024 + 256 new tokens, in
    # blocks of 64) x 128 KiB a position (8 KV heads), and a refill's own cache of the 4 x 1024 prompt tokens.
    assert data["peak_phase"] == "refill"
    assert data["breakdown"]["kv cache (static slots)"] == 4 * 1280 * 128 * 1024
    assert data["breakdown"]["prefill cache"] == 4 * 1024 * 128 * 1024


def test_table_names_the_resolved_model_and_the_total() -> None:
    result = run("7B", "--method", "qlora", "--gradient-checkpointing", "--batch-size", "4", "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    assert "Llama-2-7B" in result.output and "shorthand 7B" in result.output
    assert "peak reserved" in result.output and "device total" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-a-model"], "unknown model"),
        (["7B", "--batch-size", "0"], "--batch-size must be positive"),
        (["7B", "--seq-len", "-1"], "--seq-len must be positive"),
        (["7B", "--method", "full", "--lora-r", "16"], "LoRA options need --method lora or qlora"),
        (["7B", "--method", "full", "--quant", "nf4"], "use --method qlora"),
        (["7B", "--offload", "optimizer"], "--offload needs DeepSpeed"),
        (["7B", "--task", "infer", "--zero", "2"], "apply to fine-tuning"),
        (["7B", "--task", "infer", "--seq-len", "128"], "use --prompt-len"),
        (["7B", "--lora-targets", "q_proj,nonsense"], "no linear layer named nonsense"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
