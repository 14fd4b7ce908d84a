"""Measured runs against the estimator: reading `benchmarks/results/*.jsonl` (written by
`benchmarks/measure_memory.py`) and turning each measured case back into an `EstimateRequest`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .estimator import estimate
from .defaults import ALL_LINEAR, lora_alpha, parse_lora_targets
from .request import Engine, EstimateRequest, Kernels, LoraSpec, Method, Optimizer, Precision, Quant, Task
from .resolve import find_model


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request_from_case(case: dict) -> EstimateRequest:
    """The request describing a measured case (inference cases carry no method: LoRA is the default).

    Cases of `benchmarks/long_context_bench.py` leave out what they do not vary (fine-tuning, bf16-true,
    AdamW, all-linear LoRA targets) and may keep only `layers` of the architecture's decoder layers."""
    model = find_model(case["model"])
    if case.get("layers"):
        model = dataclasses.replace(model, name=f"{model.name}-{case['layers']}l", num_layers=case["layers"])
    method = case.get("method", "none")
    targets = case.get("lora_targets", ALL_LINEAR)
    return EstimateRequest(
        model=model,
        task=Task(case.get("task", "finetune")),
        method=Method(method) if method != "none" else Method.LORA,
        precision=Precision(case.get("precision", "bf16-true")),
        quant=Quant(case.get("quant", "nf4" if method == "qlora" else "none")),
        micro_batch_size=case["batch_size"],
        seq_len=case["seq_len"],
        prompt_len=case.get("prompt_len") or 1,
        max_new_tokens=case.get("max_new_tokens") or 1,
        lora=LoraSpec(r=case["lora_r"], alpha=lora_alpha(case["lora_r"]),
                      targets=parse_lora_targets(targets)),
        gradient_checkpointing=case["gradient_checkpointing"],
        optimizer=Optimizer(case.get("optimizer", "adamw")),
        kernels=Kernels(case.get("kernels", "none")),
        lora_dropout=case.get("lora_dropout", 0.0),
        activation_offload=case.get("activation_offload", False),
        # Inference cases before the slots engine ran one batch through plain generate.
        engine=Engine(case.get("engine", "generate")),
        compiled_layers=case.get("compile") == "layers",
    )


def relative_error(run: dict) -> float:
    """(estimated - measured) / measured peak reserved memory."""
    predicted = estimate(request_from_case(run["case"])).peak_bytes
    return (predicted - run["peak_reserved_bytes"]) / run["peak_reserved_bytes"]
