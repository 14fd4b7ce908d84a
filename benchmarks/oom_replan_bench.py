"""A real CUDA out-of-memory and the scheduler's re-plan ladder, on one GPU, below the Ray layer.

    python benchmarks/oom_replan_bench.py --tokenizer DIR --out oom.jsonl [--fraction 0.3]

The planner plans a 7B-shaped LoRA fine-tuning (seq 1024, global batch 16) for the whole card, as NVML
reports it. Then the card shrinks under the plan, as when another tenant takes memory after submission:
each attempt runs with `torch.cuda.set_per_process_memory_fraction(FRACTION)`. An attempt that runs out of
memory is re-planned exactly as the scheduler does (`planner.replan.replan_after_oom` with the margin
`learned_margin` gives after that many OOMs) and run again, until one succeeds or the ladder ends. Each
attempt is its own process (as each retry is its own Ray Train run); each line records the plan, the
outcome, the peak reserved memory and the error's first line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_model import DATA, MODEL_DIR, append, environment, in_own_process, prepare

SEQ_LEN = 1024
GLOBAL_BATCH = 16  # the packed example set holds 19 sequences of 1024: one step per epoch
STEPS = 2
MAX_ATTEMPTS = 6


def first_plan():
    from llmplan.planner.hardware import plan_hardware
    from llmplan.planner.nvml_probe import probe_gpus
    from llmplan.planner.plan import FinetuneAsk, plan_finetune
    from llmplan.planner.request import LoraSpec, Method, Precision
    from llmplan.planner.resolve import resolve_model

    hardware = plan_hardware(1, None, None, probe_gpus)
    spec = resolve_model(str(MODEL_DIR)).spec
    ask = FinetuneAsk(model=str(MODEL_DIR), spec=spec, methods=(Method.LORA,), seq_len=SEQ_LEN,
                      batch_size=GLOBAL_BATCH, lora=LoraSpec(r=8, alpha=16, targets=("q_proj", "v_proj")),
                      precision=Precision.BF16_TRUE, gradient_checkpointing=None)
    return plan_finetune(ask, hardware), spec, hardware


def run_attempt(plan_json: str, fraction: float) -> dict:
    """One training run of `plan` on a card cut to `fraction` of its memory."""
    import torch

    from llmplan.planner.plan import FinetunePlan
    from llmplan.runtime.train.train import cleanup, setup, train
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    torch.cuda.set_per_process_memory_fraction(fraction)
    plan = FinetunePlan.from_dict(json.loads(plan_json))
    with tempfile.TemporaryDirectory() as output:
        config = TrainConfig(model=plan.model, data=DataConfig(path=str(DATA), packing=True, val_fraction=0.0),
                             output_dir=output, method=plan.method, precision=plan.precision,
                             micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, seq_len=plan.seq_len,
                             gradient_checkpointing=plan.gradient_checkpointing, lora_r=plan.lora_r,
                             lora_alpha=2 * plan.lora_r, lora_targets=plan.lora_targets, warmup_steps=0,
                             max_steps=STEPS, save_every=10_000, device="cuda")
        state = setup(config)
        try:
            result = train(state)
            return {"outcome": "succeeded", "peak_reserved_bytes": result.peak_memory_per_rank[0]}
        except torch.OutOfMemoryError as error:
            return {"outcome": "out_of_memory", "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                    "error": str(error).splitlines()[0][:300]}
        finally:
            cleanup(state)


def ladder(fraction: float, out: Path) -> None:
    import torch

    from llmplan.planner.replan import learned_margin, replan_after_oom

    plan, spec, hardware = first_plan()
    limit = int(fraction * torch.cuda.get_device_properties(0).total_memory)
    reason, out_of_memory = "the first plan", 0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        outcome = in_own_process(__file__, ["--attempt", json.dumps(plan.to_dict()), "--fraction", str(fraction),
                                            "--out", str(out)], failed={"outcome": "crashed"})
        append(out, {"attempt": attempt, "why": reason, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                     "gradient_checkpointing": plan.gradient_checkpointing, "method": plan.method,
                     "estimated_peak_bytes": plan.estimated_peak_bytes, "card_limit_bytes": limit,
                     "planned_for_bytes": hardware.memory_bytes, "margin": learned_margin(out_of_memory),
                     **outcome, **environment()})
        if outcome["outcome"] != "out_of_memory":
            return
        out_of_memory += 1
        found = replan_after_oom(plan, spec, hardware, learned_margin(out_of_memory))
        if found is None:
            append(out, {"attempt": attempt + 1, "outcome": "ladder exhausted"})
            return
        plan, rung = found
        reason = rung.reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--attempt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attempt:
        print(json.dumps(run_attempt(args.attempt, args.fraction)))
        return
    prepare(args.tokenizer)
    ladder(args.fraction, args.out)


if __name__ == "__main__":
    main()
