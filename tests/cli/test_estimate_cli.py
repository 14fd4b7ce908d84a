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
    # measured on an H200 for this configuration: 16.00 GiB reserved (inf-llama31-8b-b4) on the plain generate
    # path; the plan also holds the fast engines' workspace (fp32 logits of a 2,048-token step), in case they run
    assert data["breakdown"]["engine workspace"] == 2048 * 128_256 * 4
    assert abs((data["peak_bytes"] - data["breakdown"]["engine workspace"]) / 2**30 - 16.00) < 0.05 * 16.00


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
