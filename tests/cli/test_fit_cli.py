"""`llmplan fit` through click's CliRunner, with a fake pynvml (and nvcc) passed in the context object."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_gpus_cli import NO_DRIVER, fake_pynvml

from llmplan.cli.main import cli
from llmplan.planner.gpus import default_planning_notice
from llmplan.planner.units import GiB, MiB

NVCC = "/usr/local/cuda/bin/nvcc"


def h100(bus: str, used_mib: int = 600) -> dict:
    return {"name": "NVIDIA H100 80GB HBM3", "bus": bus, "total_mib": 81559, "used_mib": used_mib, "cc": (9, 0),
            "links": None, "procs": []}


def run(*args: str, nvml=NO_DRIVER, nvcc: str | None = NVCC):
    runner = CliRunner(env={"COLUMNS": "200"})
    return runner.invoke(cli, ["fit", *args], obj={"nvml": nvml, "nvcc": nvcc})


def run_json(*args: str, **kwargs) -> tuple[int, dict]:
    result = run(*args, "--json", **kwargs)
    return result.exit_code, json.loads(result.stdout)


# ---- the default question ----------------------------------------------------------------------------
def test_default_plans_for_the_default_card_and_says_so_first() -> None:
    result = run("7B", "--gpus", "1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == default_planning_notice()
    out = result.output
    for text in ("Llama-2-7B", "Recommended: lora", "Memory per GPU", "Run it:", "llmplan submit finetune",
                 "Job spec (YAML):", "Inference on the same hardware:", "llmplan generate", "tokens/s"):
        assert text in out, text


def test_json_recommendation_has_command_job_and_breakdown() -> None:
    code, data = run_json("7B", "--gpus", "1")
    assert code == 0 and data["feasible"] is True
    assert data["notice"] == default_planning_notice()
    best = data["recommendation"]
    assert best == {**data["candidates"][0], "command": best["command"], "job": best["job"]}
    assert best["memory_bytes"] <= data["budget_bytes"] == int(data["hardware"]["memory_bytes"] * 0.9)
    assert sum(term["bytes"] for term in best["breakdown"]) + best["cuda_context_bytes"] == best["memory_bytes"]
    assert best["command"].startswith("llmplan submit finetune --model PATH/TO/Llama-2-7B --method lora")
    assert data["inference"]["quant"] == "none" and data["inference"]["command"].startswith("llmplan generate")


def test_job_spec_keys_mirror_the_command_options() -> None:
    result = run("7B", "--gpu", "A10", "--gpus", "4", "--batch-size", "32", "--seq-len", "2048", "--method", "full")
    assert result.exit_code == 0, result.output
    out = result.output
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("llmplan submit"))
    block = out.split("Job spec (YAML):\n")[1].split("\n\n")[0]
    spec = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    assert spec.pop("task") == "finetune"
    words = shlex.split(command)
    for key, value in spec.items():
        assert f"--{key}" in words
        if value is not True:
            assert words[words.index(f"--{key}") + 1] == str(value)
    assert {"zero"} <= set(spec) and spec["gpus"] == 4 and spec["micro-batch"] * spec["grad-accum"] * 4 == 32


# ---- NVML --------------------------------------------------------------------------------------------------
def test_nvml_gpus_are_planned_with_their_free_memory() -> None:
    code, data = run_json("7B", nvml=fake_pynvml([h100("00000000:18:00.0", used_mib=20000), h100("00000000:2A:00.0")]))
    assert code == 0
    hardware = data["hardware"]
    assert (hardware["gpu"], hardware["count"], hardware["source"]) == ("H100 SXM", 2, "nvml")
    assert hardware["memory_bytes"] == (81559 - 20000) * MiB
    assert data["notice"] is None
    assert any("in use by other processes" in note for note in data["notes"])


def test_a_named_gpu_is_planned_even_when_nvml_finds_another() -> None:
    code, data = run_json("7B", "--gpu", "A100 80GB", nvml=fake_pynvml([h100("00000000:18:00.0")]))
    assert code == 0 and data["hardware"]["gpu"] == "A100 80GB" and data["hardware"]["source"] == "catalog"


def test_gpu_mem_plans_for_any_card() -> None:
    code, data = run_json("7B", "--gpu-mem", "12GiB")
    assert code == 0 and data["hardware"]["memory_bytes"] == 12 * GiB
    assert data["recommendation"]["method"] == "qlora"


# ---- DeepSpeed preflight ----------------------------------------------------------------------------------------
EIGHT_T4 = ("7B", "--gpu", "T4", "--gpus", "8", "--method", "lora", "--seq-len", "2048")


def test_eight_gpus_with_nvcc_plan_deepspeed() -> None:
    code, data = run_json(*EIGHT_T4)
    assert code == 0 and data["deepspeed"]["deepspeed"] is True
    assert "--zero 3" in data["recommendation"]["command"]


def test_eight_gpus_without_nvcc_plan_fsdp_and_say_why() -> None:
    code, data = run_json(*EIGHT_T4, nvcc=None)
    assert code == 0 and data["deepspeed"]["deepspeed"] is False
    command = data["recommendation"]["command"]
    assert "--zero" not in command and "--fsdp full-shard" in command
    assert any("nvcc" in note for note in data["notes"])


def test_no_deepspeed_overrides_a_present_nvcc() -> None:
    code, data = run_json(*EIGHT_T4, "--no-deepspeed")
    assert code == 0 and not any(c["parallelism"]["backend"] == "deepspeed" for c in data["candidates"])


# ---- nothing fits ------------------------------------------------------------------------------------------------
def test_nothing_fits_exits_1_and_says_what_would() -> None:
    result = run("70B", "--gpu", "RTX 4090", "--no-deepspeed")
    assert result.exit_code == 1
    out = result.output
    assert "Nothing fits." in out and "Nearest:" in out and "What would fit:" in out and "--gpus 2" in out


def test_nothing_fits_json_has_feasible_false_and_reasons() -> None:
    code, data = run_json("70B", "--gpu", "RTX 4090", "--no-deepspeed")
    assert code == 1 and data["feasible"] is False
    assert data["reasons"] and data["nearest"]["method"] == "qlora"
    assert {s["change"] for s in data["suggestions"]} >= {"gpus", "memory"}
    assert "recommendation" not in data


# ---- inference, P40, data -------------------------------------------------------------------------------------------
def test_task_infer_shards_70b_over_two_80gb_cards() -> None:
    code, data = run_json("70B", "--gpu", "H100", "--gpus", "2", "--task", "infer")
    assert code == 0
    best = data["recommendation"]
    assert best["quant"] == "none" and best["parallelism"]["shard"] == 2
    assert best["command"].startswith("llmplan generate") and "--gpus 2" in best["command"]
    assert "inference" not in data


def test_task_infer_picks_the_slots_engines_fastest_batch_for_the_prompts() -> None:
    """No --batch-size: the slots engine goes up to 256 slots, and 300 prompts run fastest as two waves of 150."""
    code, data = run_json("7B", "--gpu", "H200", "--task", "infer", "--prompt-len", "32", "--prompts", "300")
    assert code == 0 and data["prompts"] == 300 and data["max_slots"] == 256
    best = data["recommendation"]
    assert best["micro_batch"] == 150 and "--batch-size 150" in best["command"]
    assert best["job"]["batch-size"] == 150
    assert any(w.startswith("batch 150 is the slots engine's slots") for w in data["warnings"])
    code, data = run_json("7B", "--gpu", "H200", "--task", "infer", "--prompt-len", "32")
    assert data["recommendation"]["micro_batch"] == 256 and data["batch_size"] == 16
    # Given, --batch-size binds.
    code, data = run_json("7B", "--gpu", "H200", "--task", "infer", "--prompt-len", "32", "--batch-size", "16")
    assert data["recommendation"]["micro_batch"] == 16 and data["max_slots"] is None


def test_task_infer_output_says_how_the_batch_was_chosen() -> None:
    result = run("7B", "--gpu", "H200", "--task", "infer", "--prompt-len", "32", "--prompts", "257")
    assert result.exit_code == 0, result.output
    assert "257 prompts of 32 + 256 tokens, up to 256 at once on the slots engine (16 on others)" in result.output
    assert "note: batch 129 is the slots engine's slots: of 1 to 256" in result.output
    assert "257 prompts run in 2 waves" in result.output


def test_p40_plans_never_use_bf16() -> None:
    code, data = run_json("7B", "--gpu", "P40")
    assert code == 0
    assert not any(c["precision"].startswith("bf16") for c in data["candidates"])
    assert data["recommendation"]["precision"] == "fp32" and data["inference"]["precision"] == "fp32"
    assert any("1/65" in warning for warning in data["warnings"])


def test_dataset_sizes_the_run_and_times_it(tmp_path: Path) -> None:
    data_file = tmp_path / "alpaca.jsonl"
    record = {"instruction": "x" * 400, "output": "y" * 400}  # 800 characters: ~200 tokens
    data_file.write_text("\n".join(json.dumps(record) for _ in range(1000)) + "\n")
    code, data = run_json("7B", "--dataset", str(data_file), "--epochs", "3")
    assert code == 0
    assert data["tokens_per_epoch"] == 200_000 and data["epochs"] == 3
    best = data["recommendation"]
    assert best["time_s"] == pytest.approx(600_000 / best["tokens_per_s"])
    assert f"--data {data_file}" in best["command"] and "--epochs 3" in best["command"]
    table = run("7B", "--dataset", str(data_file))
    assert "time" in table.output and "1,000 records" in table.output


def test_records_are_cut_at_the_sequence_length(tmp_path: Path) -> None:
    data_file = tmp_path / "long.jsonl"
    data_file.write_text(json.dumps({"text": "z" * 40_000}) + "\n")
    code, data = run_json("7B", "--dataset", str(data_file), "--seq-len", "256")
    assert code == 0 and data["tokens_per_epoch"] == 256


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["not-a-model"], "unknown model"),
    (["7B", "--gpu", "Z9000"], "unknown GPU"),
    (["7B", "--gpu", "A100"], "more than one card"),
    (["7B", "--gpu-mem", "24"], "no unit"),
    (["7B", "--gpus", "4", "--batch-size", "10"], "multiple of 4"),
    (["7B", "--tokens", "100", "--dataset", "x.jsonl"], "give one"),
    (["7B", "--dataset", "/no/such/file.jsonl"], "no such file"),
    (["7B", "--margin", "1.5"], "--margin"),
    (["7B", "--gpus", "0"], "--gpus must be positive"),
    (["7B", "--lora-targets", "q_proj,nonsense"], "no linear layer named nonsense"),
    (["7B", "--prompts", "100"], "--prompts sizes inference"),
    (["7B", "--task", "infer", "--prompts", "0"], "--prompts"),
])
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_answers_well_under_a_second_in_process() -> None:
    run("7B", "--gpus", "1")  # warm imports
    started = time.perf_counter()
    result = run("7B", "--gpus", "1")
    assert result.exit_code == 0 and time.perf_counter() - started < 0.5


def test_a_probed_card_the_catalog_lacks_is_planned_without_times() -> None:
    card = {"name": "NVIDIA Foo 48GB", "bus": "00000000:18:00.0", "total_mib": 49000, "used_mib": 300, "cc": (8, 6),
            "links": None, "procs": []}
    code, data = run_json("13B", "--tokens", "1000000", nvml=fake_pynvml([card]))
    assert code == 0 and data["hardware"]["gpu"] == "NVIDIA Foo 48GB"
    best = data["recommendation"]
    assert best["tokens_per_s"] is None and best["time_s"] is None and best["precision"] == "bf16-true"
    assert any("not in the GPU catalog" in note for note in data["notes"])
