"""Where a decode step of the slots engine spends its time (runtime.infer.slots), on a CUDA GPU.

    python benchmarks/slots_probe.py --out results.jsonl

A Llama-2-7B-shaped model with random weights (built on the GPU, not saved), every slot prefilled with a short
prompt, then per (slots, cache length) and per step kind (`--steps`: transformers' forward, the written-out step
with fused projections, the same compiled; runtime.infer.slot_step): the first step (compile and capture), the
captured step replayed alone (GPU time), the engine's `advance` (replay, next tokens to the host: what a step
costs the schedule), the eager step, and the CUDA kernels of a few replays by total time (torch.profiler, with
the count and total of all of them); the step over the whole cache and over the positions in use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

SHAPES = [(8, 320), (64, 320), (256, 320), (64, 1280)]
STEPS = 50


def timed(call, steps: int) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def kernels(call, count: int = 5, top: int = 12) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            call()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / count, e.count // count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda row: -row[1])
    return {"kernels": [{"kernel": k[:90], "us_per_step": round(t, 1), "calls_per_step": c} for k, t, c in rows[:top]],
            "kernel_us_per_step": round(sum(t for _, t, _ in rows), 1),
            "kernel_calls_per_step": sum(c for _, _, c in rows)}


def probe(model, count: int, length: int, kind: str, reference: dict) -> dict:
    """One step kind at one shape; `reference` keeps the first kind's first-step logits to compare the others."""
    from llmplan.runtime.infer import slots

    decoder = slots._Decoder(model, slots=count, length=length, step=kind)
    decoder.prefill(list(range(count)), [[1 + i % 100] * 12 for i in range(count)], None)
    in_use = decoder.visible(12 + 128)  # the middle of a 256-token run on 12-token prompts
    first_step_s = timed(lambda: decoder.step(in_use), 1)
    logits = reference.setdefault((count, length), decoder.logits.float().clone())
    agreement = {"max_abs_logit_diff": (decoder.logits.float() - logits).abs().max().item(),
                 "same_argmax": (decoder.logits.argmax(-1) == logits.argmax(-1)).float().mean().item()}
    return {"bench": "slots-probe", "slots": count, "cache_len": length, "visible": in_use, "step": kind,
            "first_step_s": first_step_s, **agreement,
            "replay_whole_cache_ms": 1e3 * timed(lambda: decoder.step(length), STEPS),
            "replay_ms": 1e3 * timed(lambda: decoder.step(in_use), STEPS),
            "advance_ms": 1e3 * timed(lambda: decoder.advance(None, 12 + 128), STEPS),
            "eager_step_ms": 1e3 * timed(lambda: decoder._step(in_use), 5),
            **kernels(lambda: decoder.step(in_use))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="transformers,fused,compiled", help="step kinds (slots.STEP_KINDS)")
    parser.add_argument("--shapes", default=",".join(f"{s}x{n}" for s, n in SHAPES), help="SLOTSxCACHE_LEN,...")
    args = parser.parse_args()
    import torch

    from llmplan.planner.resolve import find_model
    from llmplan.runtime.models.modeling import build_random_model
    from bench_model import append, environment

    spec = dataclasses.replace(find_model("Llama-2-7B"), vocab_size=49152)
    model = build_random_model(spec, "bf16", "cuda").eval()
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    reference: dict = {}
    with torch.inference_mode():
        for count, length in shapes:
            for kind in args.steps.split(","):
                append(args.out, {**probe(model, count, length, kind, reference), **environment()})
                torch.cuda.empty_cache()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
