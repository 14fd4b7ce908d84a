"""Where a decode step of the slots engine spends its time (runtime.infer.slots), on a CUDA GPU.

    python benchmarks/slots_probe.py --out results.jsonl

A Llama-2-7B-shaped model with random weights (built on the GPU, not saved), every slot prefilled with a short
prompt, then per (slots, cache length): the captured step replayed alone (GPU time), the engine's `advance`
(replay, next tokens to the host: what a step costs the schedule), the eager step, and the CUDA kernels of a
few replays by total time (torch.profiler); the step over the whole cache and over the positions in use.
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


def kernels(call, count: int = 5, top: int = 12) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            call()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / count, e.count // count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda row: -row[1])
    return [{"kernel": k[:90], "us_per_step": round(t, 1), "calls_per_step": c} for k, t, c in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from llmplan.planner.resolve import find_model
    from llmplan.runtime.infer import slots
    from llmplan.runtime.models.modeling import build_random_model
    from bench_model import append, environment

    spec = dataclasses.replace(find_model("Llama-2-7B"), vocab_size=49152)
    model = build_random_model(spec, "bf16", "cuda").eval()
    with torch.inference_mode():
        for count, length in SHAPES:
            decoder = slots._Decoder(model, slots=count, length=length)
            decoder.prefill(list(range(count)), [[1 + i % 100] * 12 for i in range(count)], None)
            in_use = decoder.visible(12 + 128)  # the middle of a 256-token run on 12-token prompts
            record = {"bench": "slots-probe", "slots": count, "cache_len": length, "visible": in_use,
                      "replay_whole_cache_ms": 1e3 * timed(lambda: decoder.step(length), STEPS),
                      "replay_ms": 1e3 * timed(lambda: decoder.step(in_use), STEPS),
                      "advance_ms": 1e3 * timed(lambda: decoder.advance(None, 12 + 128), STEPS),
                      "eager_step_ms": 1e3 * timed(lambda: decoder._step(in_use), 5),
                      "kernels": kernels(lambda: decoder.step(in_use))}
            append(args.out, {**record, **environment()})
            decoder = None  # free its cache before the next shape
            torch.cuda.empty_cache()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
