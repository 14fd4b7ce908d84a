"""Markdown table: measured peak reserved memory vs llmplan's estimate vs the rules users use today.

    python benchmarks/accuracy_table.py [benchmarks/results/memory-h200.jsonl]

Baselines, as their authors state them:
- LLaMA-Factory's README "Hardware Requirement" table: GB per billion parameters of
  18 (full, AMP), 8 (full, pure bf16), 2 (LoRA, 16-bit), 1 (QLoRA 8-bit), 0.5 (QLoRA 4-bit);
  for inference we apply the same bytes per parameter as its frozen-weights rows (2 / 1 / 0.5).
- Weights only, as `accelerate estimate-memory` reports it: parameters x bytes of the dtype for
  inference, and its "Training using Adam" figure of 4 x that for full fine-tuning; LoRA/QLoRA get
  the weights alone.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from llmplan.planner.calibration import load_runs, request_from_case
from llmplan.planner.estimator import estimate
from llmplan.planner.resolve import find_model

DEFAULT = Path(__file__).resolve().parent / "results" / "memory-h200.jsonl"
GIB = 2**30
LLAMA_FACTORY_BYTES = {"full-mixed": 18, "full-true": 8, "lora": 2, "qlora": 0.5, "int8": 1, "nf4": 0.5, "none": 2}


def llama_factory_rule(case: dict, params: int) -> float:
    if case["task"] == "infer":
        key = case["quant"]
    elif case["method"] == "full":
        key = "full-mixed" if case["precision"].endswith("mixed") else "full-true"
    else:
        key = case["method"]
    return params * LLAMA_FACTORY_BYTES[key]


def weights_only_rule(case: dict, params: int) -> float:
    per_param = {"none": 2, "int8": 1, "nf4": 0.5}[case["quant"]]
    if case["task"] == "finetune" and case["method"] == "full":
        dtype_bytes = 4 if case["precision"].endswith("mixed") else 2
        return params * dtype_bytes * 4
    return params * per_param


def rows(path: Path) -> list[dict]:
    out = []
    for run in load_runs(path):
        case = run["case"]
        if case["allocator"] != "expandable":
            continue
        params = find_model(case["model"]).params
        measured = run["peak_reserved_bytes"]
        out.append({
            "id": case["id"], "measured": measured,
            "llmplan": estimate(request_from_case(case)).peak_bytes,
            "llama_factory": llama_factory_rule(case, params),
            "weights_only": weights_only_rule(case, params),
        })
    return out


def error(row: dict, key: str) -> float:
    return (row[key] - row["measured"]) / row["measured"]


def markdown(table: list[dict]) -> str:
    lines = ["| run | measured GiB | llmplan GiB | error | LLaMA-Factory rule | weights only |", "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(
            f"| {row['id']} | {row['measured'] / GIB:.2f} | {row['llmplan'] / GIB:.2f} | {error(row, 'llmplan'):+.1%} "
            f"| {error(row, 'llama_factory'):+.0%} | {error(row, 'weights_only'):+.0%} |"
        )
    summary = []
    for key, label in (("llmplan", "llmplan"), ("llama_factory", "LLaMA-Factory rule"), ("weights_only", "weights only")):
        errors = [abs(error(row, key)) for row in table]
        summary.append(f"| {label} | {statistics.median(errors):.1%} | {max(errors):.1%} |")
    return "\n".join(lines + ["", "| estimator | median abs. error | max abs. error |", "|---|---:|---:|", *summary])


if __name__ == "__main__":
    print(markdown(rows(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)))
