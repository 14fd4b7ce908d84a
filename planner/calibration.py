"""Measured runs against the estimator: reading `benchmarks/results/*.jsonl` (written by
`benchmarks/measure_memory.py`) and turning each measured case back into an `EstimateRequest`."""

from __future__ import annotations

import json
from pathlib import Path

from .estimator import estimate
from .request import ALL_LINEAR, EstimateRequest, LoraSpec, Method, Optimizer, Precision, Quant, Task
from .resolve import find_model


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request_from_case(case: dict) -> EstimateRequest:
    """The request describing a measured case (inference cases carry no method: LoRA is the default)."""
    targets = (ALL_LINEAR,) if case["lora_targets"] == ALL_LINEAR else tuple(case["lora_targets"].split(","))
    return EstimateRequest(
        model=find_model(case["model"]),
        task=Task(case["task"]),
        method=Method(case["method"]) if case["method"] != "none" else Method.LORA,
        precision=Precision(case["precision"]),
        quant=Quant(case["quant"]),
        batch_size=case["batch_size"],
        seq_len=case["seq_len"],
        prompt_len=case["prompt_len"] or 1,
        max_new_tokens=case["max_new_tokens"] or 1,
        lora=LoraSpec(r=case["lora_r"], alpha=2 * case["lora_r"], targets=targets),
        gradient_checkpointing=case["gradient_checkpointing"],
        optimizer=Optimizer(case["optimizer"]),
    )


def relative_error(run: dict) -> float:
    """(estimated - measured) / measured peak reserved memory."""
    predicted = estimate(request_from_case(run["case"])).peak_bytes
    return (predicted - run["peak_reserved_bytes"]) / run["peak_reserved_bytes"]
