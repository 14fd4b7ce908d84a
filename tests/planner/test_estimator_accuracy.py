"""The estimator against every committed GPU measurement (benchmarks/results/memory-h200.jsonl).

Target (issue 2): median absolute error <= 5% and maximum <= 10% of measured peak reserved memory.
The runs with PyTorch's legacy allocator (`allocator: default`) show what the runtime avoids by
using expandable segments; they are held to a separate, documented check.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from llmplan.planner.calibration import load_runs, relative_error
from llmplan.planner.resolve import find_model

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULTS = RESULTS_DIR / "memory-h200.jsonl"
# Measured after the estimator's constants were set: configurations it had never seen.
HELD_OUT = RESULTS_DIR / "memory-h200-heldout.jsonl"


RUNS = load_runs(RESULTS)
# Its six QLoRA runs were re-measured with the runtime's recipe since issue 15 (bf16 base, 2026-12-03).
RUNTIME_RUNS = [run for run in RUNS if run["case"]["allocator"] == "expandable"]


def test_measurements_cover_what_the_issue_asks() -> None:
    cases = [run["case"] for run in RUNTIME_RUNS]
    families = {find_model(case["model"]).model_type for case in cases}
    assert len(RUNTIME_RUNS) >= 30
    assert {"llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3"} <= families
    assert {case["quant"] for case in cases if case["task"] == "infer"} == {"none", "int8", "nf4"}
    finetune = [case for case in cases if case["task"] == "finetune"]
    assert {c["gradient_checkpointing"] for c in finetune if c["method"] == "lora"} == {True, False}
    assert {c["precision"] for c in finetune if c["method"] == "full"} >= {"bf16-true", "bf16-mixed"}
    assert min(c["batch_size"] for c in cases) == 1 and max(c["batch_size"] for c in cases) >= 16
    assert min(c["seq_len"] for c in finetune) <= 256 and max(c["seq_len"] for c in finetune) >= 4096
    assert all(run["gpu"].startswith("NVIDIA H") for run in RUNS)


@pytest.mark.parametrize("run", RUNTIME_RUNS, ids=[run["case"]["id"] for run in RUNTIME_RUNS])
def test_each_measurement_within_10_percent(run: dict) -> None:
    assert abs(relative_error(run)) <= 0.10


HELD_OUT_RUNS = load_runs(HELD_OUT)


@pytest.mark.parametrize("run", HELD_OUT_RUNS, ids=[run["case"]["id"] for run in HELD_OUT_RUNS])
def test_held_out_measurement_within_10_percent(run: dict) -> None:
    assert abs(relative_error(run)) <= 0.10


def test_median_error_within_5_percent() -> None:
    errors = [abs(relative_error(run)) for run in RUNTIME_RUNS]
    assert statistics.median(errors) <= 0.05


def test_legacy_allocator_runs_show_why_the_runtime_uses_expandable_segments() -> None:
    legacy = {run["case"]["id"]: run for run in RUNS if run["case"]["allocator"] == "default"}
    run = legacy["inf-llama2-7b-b8-legacy"]
    # The issue's observation, reproduced: Llama-2-7B, batch 8, 512+512 tokens reserves about twice
    # what it allocates with the legacy allocator.
    assert run["peak_reserved_bytes"] > 1.9 * run["peak_allocated_bytes"]
    twin = next(r for r in RUNTIME_RUNS if r["case"]["id"] == "inf-llama2-7b-b8")
    assert twin["peak_reserved_bytes"] < 1.02 * twin["peak_allocated_bytes"]
