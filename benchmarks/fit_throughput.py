"""Fit the throughput model's constants to the H200 runs, and print how well the model does.

    python benchmarks/fit_throughput.py            # per-run table (markdown) with the committed constants
    python benchmarks/fit_throughput.py --fit      # also re-derive the fitted constants

The runs are `benchmarks/results/memory-h200.jsonl` (each has measured `tokens_per_s`; fine-tuning runs
`step_s`, inference runs `generate_s`). Fine-tuning time per step and generate time are linear in the
fitted constants (1/efficiency, bytes per element, seconds per call), so a least-squares fit on relative
errors finds them; `planner/throughput.py` holds the rounded values. Pure Python, no numpy.

The slots engine's constants come from `benchmarks/results/engine-h200.jsonl` (`"path": "slots"`, measured
`wall_seconds` of one call): the Llama-2-7B shape with SmolLM2's 49,152-token vocabulary (benchmarks/bench_model.py),
bf16, the longest prompt as the plan's prompt length. Only the last run of each (slots, prompts) case is the
current engine: the earlier ones read the whole static cache every step (attention now reads the positions in
use), which the model no longer describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from llmplan.planner import throughput as tp
from llmplan.planner.calibration import load_runs
from llmplan.planner.calibration import request_from_case as request_for
from llmplan.planner.gpus import lookup_gpu
from llmplan.planner.request import Engine, EstimateRequest, Precision, Quant, Task
from llmplan.planner.resolve import find_model

RESULTS = Path(__file__).resolve().parent / "results" / "memory-h200.jsonl"
HELD_OUT = Path(__file__).resolve().parent / "results" / "memory-h200-heldout.jsonl"
ENGINE_RESULTS = Path(__file__).resolve().parent / "results" / "engine-h200.jsonl"
BENCH_VOCAB = 49_152  # SmolLM2's tokenizer, which the benchmark's Llama-2-7B-shaped model uses
H200 = lookup_gpu("H200")

# Runs the model does not claim to cover, and why (also in tests/planner/test_throughput.py).
UNCOVERED = {
    "lora-phi3-mini-gc-b4-s4096": "sliding window (2047) shorter than the sequence: SDPA gets an explicit "
                                  "mask and leaves the flash kernel, which the model does not capture",
}


def predicted_tokens_per_s(run: dict) -> float:
    req = request_for(run["case"])
    if req.task is Task.INFER:
        return tp.generation_throughput(req, H200).tokens_per_s
    return tp.finetune_throughput(req, H200).tokens_per_s


# ---- least squares on relative errors -----------------------------------------------------------------
def solve(rows: list[list[float]], targets: list[float], fixed: list[float]) -> list[float]:
    """theta minimising sum(((X theta + fixed - y) / y)^2), by the normal equations."""
    k = len(rows[0])
    a = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for x, y, f in zip(rows, targets, fixed):
        w = 1 / y
        for i in range(k):
            b[i] += x[i] * w * (y - f) * w
            for j in range(k):
                a[i][j] += x[i] * w * x[j] * w
    for col in range(k):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(k):
            if r != col and a[col][col]:
                factor = a[r][col] / a[col][col]
                a[r] = [v - factor * p for v, p in zip(a[r], a[col])]
                b[r] -= factor * b[col]
    return [b[i] / a[i][i] if a[i][i] else 0.0 for i in range(k)]  # 0: no run informs that constant


def fit_training(runs: list[dict]) -> dict[str, float]:
    rates = tp.card_rates(H200, Precision.BF16_TRUE)
    rows, targets, fixed = [], [], []
    for run in runs:
        req = request_for(run["case"])
        work = tp.training_work(req)
        matmul_s = work.flops / rates.flops + work.fp32_flops / rates.fp32_flops
        rows.append([
            matmul_s,
            work.adapter_elements / rates.bandwidth,
            work.activation_bytes / rates.bandwidth,
            work.layer_passes,
            work.quantized_linear_calls,
        ])
        targets.append(run["step_s"])
        fixed.append(work.fixed_bytes / rates.bandwidth + tp._optimizer_term(req, rates).seconds)
    inv_e, lora_bytes, traffic, host, qlora_call = solve(rows, targets, fixed)
    return {"MATMUL_EFFICIENCY": 1 / inv_e, "LORA_BYTES_PER_ELEMENT": lora_bytes,
            "ACTIVATION_TRAFFIC": traffic, "HOST_LAYER_PASS_S": host, "QLORA_LINEAR_CALL_S": qlora_call}


def fit_generation(runs: list[dict]) -> dict[str, float]:
    rates = tp.card_rates(H200, Precision.BF16_TRUE)
    rows, targets, fixed = [], [], []
    for run in runs:
        work = tp.decode_work(request_for(run["case"]))
        memory = work.bytes_per_step / rates.bandwidth
        compute = work.flops_per_step / (rates.flops * tp.MATMUL_EFFICIENCY)
        calls = work.steps * work.linear_calls_per_step
        rows.append([
            0.0 if work.hybrid_cache else work.steps,
            work.steps if work.hybrid_cache else 0.0,
            work.steps * work.layers,
            calls if work.quant is Quant.INT8 else 0.0,
            calls if work.quant is Quant.NF4 else 0.0,
        ])
        targets.append(run["generate_s"])
        fixed.append(work.prefill_flops / (rates.flops * tp.MATMUL_EFFICIENCY) + work.steps * max(memory, compute))
    overhead, hybrid, layer, int8, nf4 = solve(rows, targets, fixed)
    return {"DECODE_STEP_OVERHEAD_S": overhead, "HYBRID_CACHE_STEP_OVERHEAD_S": hybrid, "DECODE_LAYER_OVERHEAD_S": layer,
            "INT8_LINEAR_CALL_S": int8, "NF4_LINEAR_CALL_S": nf4}


# ---- the slots engine ----------------------------------------------------------------------------------------
SLOTS_STEP_RESULTS = Path(__file__).resolve().parent / "results" / "slots-step-engine-h200.jsonl"


def slots_runs(path: Path = ENGINE_RESULTS, forced: Path = SLOTS_STEP_RESULTS) -> list[dict]:
    """The engine's runs of the written-out step: the one run of the four cases (the step compiled or on Liger's
    kernels as the engine chose), and the batch-8 case with Liger's kernels forced (a case the engine compiles
    in that run). The run with the compiled step forced is left out: its compile found Inductor's cache warm."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows += [json.loads(line) for line in forced.read_text().splitlines()]
    return [row for row in rows if row.get("path") == "slots" and row.get("slots_step")
            and not (row.get("step_forced") and row["slots_step"] == "compiled")]


def slots_request(run: dict) -> EstimateRequest:
    model = dataclasses.replace(find_model("Llama-2-7B"), vocab_size=BENCH_VOCAB)
    return EstimateRequest(model=model, task=Task.INFER, precision=Precision.BF16_TRUE, engine=Engine.SLOTS,
                           micro_batch_size=run["batch"], prompt_len=run["longest_prompt_tokens"],
                           max_new_tokens=run["max_new_tokens"])


def slots_predicted_tokens_per_s(run: dict) -> float:
    return tp.generation_throughput(slots_request(run), H200, prompts=run["prompts"]).tokens_per_s


SLOTS_PROBE = Path(__file__).resolve().parent / "results" / "slots-step-probe-h200.jsonl"


def fit_slots_step(path: Path = SLOTS_PROBE) -> dict[str, float]:
    """A captured step (the probe's replays, compiled and on Liger's kernels) = weights / bandwidth + KV bytes /
    (bandwidth x efficiency) + layers x the step kind's cost per layer."""
    rates = tp.card_rates(H200, Precision.BF16_TRUE)
    rows, targets, fixed = [], [], []
    for probe in map(json.loads, path.read_text().splitlines()):
        if probe["step"] not in ("compiled", "liger"):
            continue
        req = slots_request({"batch": probe["slots"], "longest_prompt_tokens": 12, "max_new_tokens": 256})
        kv = probe["slots"] * probe["visible"] * req.model.kv_cache_bytes_per_token(req.precision.compute_bytes)
        layers = req.model.num_layers
        rows.append([kv / rates.bandwidth, layers if probe["step"] == "liger" else 0.0,
                     layers if probe["step"] == "compiled" else 0.0])
        targets.append(probe["replay_ms"] / 1e3)
        fixed.append(tp._weights_read_per_step(req) / rates.bandwidth)
    inv_e, layer, compiled_layer = solve(rows, targets, fixed)
    return {"SLOTS_BANDWIDTH_EFFICIENCY": 1 / inv_e, "SLOTS_LAYER_STEP_S": layer,
            "SLOTS_COMPILED_LAYER_STEP_S": compiled_layer}


def fit_slots(runs: list[dict]) -> dict[str, float]:
    """Wall time of a call = steps x the step (the committed step constants, fitted on the probe) + eager layer
    passes x their cost + the prefill's FLOPs + the compile (every fitted run is memory bound: checked by the
    table)."""
    rates = tp.card_rates(H200, Precision.BF16_TRUE)
    rows, targets, fixed = [], [], []
    for run in runs:
        work = tp.slots_work(slots_request(run), run["prompts"])
        compiled = run["slots_step"] == "compiled"
        layer_s = tp.SLOTS_COMPILED_LAYER_STEP_S if compiled else tp.SLOTS_LAYER_STEP_S
        step = ((work.weight_bytes_per_step + work.kv_bytes_per_step / tp.SLOTS_BANDWIDTH_EFFICIENCY) / rates.bandwidth
                + work.layers * layer_s)
        rows.append([work.eager_layer_passes])
        targets.append(run["wall_seconds"])
        fixed.append(work.steps * step + work.prefill_flops / (rates.flops * tp.MATMUL_EFFICIENCY)
                     + (tp.SLOTS_COMPILE_S if compiled else 0.0))
    (eager,) = solve(rows, targets, fixed)
    return {**fit_slots_step(), "SLOTS_EAGER_LAYER_S": eager}


def slots_table(runs: list[dict]) -> tuple[str, list[float]]:
    lines = ["| slots | prompts | measured tokens/s | predicted | error |", "|---:|---:|---:|---:|---:|"]
    errors = []
    for run in runs:
        measured, predicted = run["tokens_per_s"], slots_predicted_tokens_per_s(run)
        errors.append(abs(predicted / measured - 1))
        lines.append(f"| {run['batch']} | {run['prompts']:,} | {measured:,.0f} | {predicted:,.0f} | "
                     f"{predicted / measured - 1:+.1%} |")
    return "\n".join(lines), errors


# ---- report ---------------------------------------------------------------------------------------
def table(runs: list[dict]) -> tuple[str, list[float]]:
    """Markdown rows (measured vs predicted tokens/s) and the absolute errors of the covered runs."""
    lines = ["| run | task | measured tokens/s | predicted | error | covered |", "|---|---|---:|---:|---:|---|"]
    errors = []
    for run in runs:
        case = run["case"]
        measured, predicted = run["tokens_per_s"], predicted_tokens_per_s(run)
        error = predicted / measured - 1
        covered = case["id"] not in UNCOVERED
        if covered:
            errors.append(abs(error))
        task = case["task"] if case["task"] == "infer" else case["method"]
        lines.append(f"| {case['id']} | {task} | {measured:,.0f} | {predicted:,.0f} | {error:+.0%} | "
                     f"{'yes' if covered else 'no: ' + UNCOVERED[case['id']]} |")
    return "\n".join(lines), errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="re-derive the fitted constants")
    args = parser.parse_args(argv)
    runs = load_runs(RESULTS)
    if args.fit:
        covered = [run for run in runs if run["case"]["id"] not in UNCOVERED]
        fitted = {**fit_training([r for r in covered if r["case"]["task"] == "finetune"]),
                  **fit_generation([r for r in covered if r["case"]["task"] == "infer"]),
                  **fit_slots(slots_runs())}
        for name, value in fitted.items():
            print(f"{name} = {value:.4g}   (committed: {getattr(tp, name):.4g})")
        print()
    for title, path in (("Fitted on", RESULTS), ("Held out (not used by the fit)", HELD_OUT)):
        text, errors = table(load_runs(path))
        print(f"{title} {path.name}:\n\n{text}\n")
        print(f"{len(errors)} covered runs: median abs. error {statistics.median(errors):.0%}, "
              f"max {max(errors):.0%}; {sum(e <= 0.25 for e in errors)} within 25%\n")
    text, errors = slots_table(slots_runs())
    print(f"The slots engine, {ENGINE_RESULTS.name}:\n\n{text}\n")
    print(f"{len(errors)} runs: max abs. error {max(errors):.1%}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
