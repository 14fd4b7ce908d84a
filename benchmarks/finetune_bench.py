"""llmplan's fine-tuning recipe against a plain transformers + peft loop, and its DDP / ZeRO-2 scaling.

One GPU (each case in its own process, results appended as JSON lines):
    python benchmarks/finetune_bench.py --tokenizer DIR --out finetune.jsonl
Scaling (the recipe under torchrun, one process per GPU; 1 GPU single; DDP, ZeRO-2, ZeRO-3, ZeRO-2 with
the optimizer offloaded on several):
    torchrun --nproc-per-node 2 benchmarks/finetune_bench.py --scaling ddp --out scaling.jsonl

The model is Llama-2-7B-shaped with random weights (bench_model.py); the settings are issue #6's: LoRA r 8
(alpha 16) on q_proj and v_proj, micro-batch 4, sequences of at most 512 tokens, bf16 weights, AdamW at
2e-4, no gradient checkpointing; QLoRA the same on an NF4 base. Both paths train on the same tokenized
examples (examples/data/alpaca_llmplan.jsonl through llmplan's template and response-only labels) in the
same order:

- plain: what the PEFT docs show. from_pretrained, (prepare_model_for_kbit_training,) get_peft_model,
  batches of 4 padded to their longest example (dynamic padding, as DataCollatorForSeq2Seq does), forward,
  backward, clip, step.
- llmplan: the recipe itself (runtime.train: setup, train, cleanup), with packing (examples concatenated into
  full 512-token sequences) and, as "llmplan-nopack", without, to show what packing contributes.

Tokens/s counts real tokens (padding excluded) over the steps after the first WARMUP_STEPS. Peak memory is
torch.cuda.max_memory_reserved over the run, against the planner's estimate for the same request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from bench_model import DATA, MODEL_DIR, append, environment, in_own_process, prepare

STEPS = 18
WARMUP_STEPS = 3
MICRO_BATCH = 4
SEQ_LEN = 512
LORA_R = 8
TARGETS = ("q_proj", "v_proj")
SCALING = {  # --scaling: (backend, ZeRO stage, offload) on several GPUs
    "ddp": ("ddp", 0, "none"),
    "zero2": ("deepspeed", 2, "none"),
    "zero3": ("deepspeed", 3, "none"),
    "zero2-offload": ("deepspeed", 2, "optimizer"),
}
CASES = [  # (path, method, packing)
    ("plain", "lora", False),
    ("llmplan", "lora", True),
    ("llmplan-nopack", "lora", False),
    ("plain", "qlora", False),
    ("llmplan", "qlora", True),
]


def train_config(method: str, packing: bool, output_dir: str, workers: int = 1, backend: str = "single",
                 zero: int = 0, max_steps: int = STEPS):
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    return TrainConfig(model=str(MODEL_DIR), data=DataConfig(path=str(DATA), packing=packing, val_fraction=0.0),
                       output_dir=output_dir, method=method, precision="bf16-true", micro_batch=MICRO_BATCH,
                       seq_len=SEQ_LEN, lr=2e-4, warmup_steps=0, max_steps=max_steps, lora_r=LORA_R,
                       lora_alpha=2 * LORA_R, lora_targets=TARGETS, log_every=1, save_every=10_000, device="cuda",
                       workers=workers, backend=backend, zero=zero)


def measured_rate(history: list[dict]) -> tuple[float, int]:
    """(tokens/s, tokens) over the logged steps after the warm-up; each step logs its own tokens/s."""
    tokens = seconds = 0.0
    previous = 0
    for entry in history:
        step_tokens = entry["tokens"] - previous
        previous = entry["tokens"]
        if entry["step"] > WARMUP_STEPS:
            tokens += step_tokens
            seconds += step_tokens / entry["tokens_per_s"]
    return tokens / seconds, int(tokens)


def through_llmplan(method: str, packing: bool) -> dict:
    """The recipe as a Ray Train worker runs it, in one process."""
    from llmplan.runtime.train.train import cleanup, setup, train

    with tempfile.TemporaryDirectory() as output:
        state = setup(train_config(method, packing, output))
        try:
            result = train(state)
            rate, tokens = measured_rate(state.history)
            sequences = len(state.train_data)
        finally:
            cleanup(state)
    return {"tokens_per_s": rate, "measured_tokens": tokens, "peak_reserved_bytes": result.peak_memory_per_rank[0],
            "final_loss": result.final_loss, "train_sequences": sequences}


def plain(method: str) -> dict:
    """A hand-written transformers + peft loop over the same examples, padded per batch."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmplan.runtime.text.data import build_datasets, collate, pad_token_id
    from llmplan.runtime.models.modeling import quantization_config

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    examples, _, _ = build_datasets(train_config(method, False, "/tmp/unused").data, tokenizer, SEQ_LEN, seed=0)
    quant = quantization_config("nf4" if method == "qlora" else "none")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map={"": "cuda"},
                                                 quantization_config=quant)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=list(TARGETS),
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    tokens = seconds = 0.0
    for step in range(STEPS):
        rows = [examples[(step * MICRO_BATCH + i) % len(examples)] for i in range(MICRO_BATCH)]
        batch = {k: v.to("cuda") for k, v in collate(rows, pad_id=pad_token_id(tokenizer)).items()}
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP_STEPS:
            seconds += time.perf_counter() - started
            tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / seconds, "measured_tokens": int(tokens),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "final_loss": float(loss)}


def estimate_for(method: str) -> int:
    from llmplan.planner.estimator import estimate
    from llmplan.planner.request import EstimateRequest, LoraSpec, Method, Quant, Task
    from llmplan.planner.resolve import resolve_model

    request = EstimateRequest(model=resolve_model(str(MODEL_DIR)).spec, task=Task.FINETUNE, method=Method(method),
                              quant=Quant.NF4 if method == "qlora" else Quant.NONE, micro_batch_size=MICRO_BATCH,
                              seq_len=SEQ_LEN, lora=LoraSpec(r=LORA_R, alpha=2 * LORA_R, targets=TARGETS))
    return estimate(request).peak_bytes


def run_case(index: int) -> dict:
    path, method, packing = CASES[index]
    measured = plain(method) if path == "plain" else through_llmplan(method, packing)
    return {"path": path, "method": method, "packing": packing, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN,
            "steps": STEPS, "warmup_steps": WARMUP_STEPS, **measured, "estimated_peak_bytes": estimate_for(method),
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), **environment()}


def run_scaling(backend: str) -> dict | None:
    """One torchrun rank of the recipe: single on 1 process, DDP or ZeRO-2 on several (NCCL)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    from llmplan.runtime.train.train import cleanup, setup, train

    output = f"/tmp/llmplan-scaling-{backend}-{world}"
    name = "single" if world == 1 else backend
    engine, zero, offload = SCALING[backend] if world > 1 else ("single", 0, "none")
    config = dataclasses.replace(train_config("lora", True, output, workers=world, backend=engine, zero=zero),
                                 offload=offload)
    state = setup(config, rank=rank, world_size=world, device=f"cuda:{local}")
    after_setup = torch.cuda.memory_allocated()  # the weights (whole, or this rank's ZeRO-3 partition) and states
    try:
        result = train(state)
        rate, tokens = measured_rate(state.history)
    finally:
        cleanup(state)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    return {"path": "llmplan", "method": "lora", "backend": name, "workers": world, "micro_batch": MICRO_BATCH,
            "seq_len": SEQ_LEN, "steps": STEPS, "zero": config.zero, "offload": config.offload, "tokens_per_s": rate, "measured_tokens": tokens,
            "peak_reserved_bytes_per_rank": list(result.peak_memory_per_rank), "final_loss": result.final_loss,
            "allocated_after_setup_bytes": after_setup,
            **environment()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scaling", choices=tuple(SCALING))
    parser.add_argument("--cases", default=",".join(map(str, range(len(CASES)))), help="Comma list of CASES indices.")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling:
        line = run_scaling(args.scaling)
        if line is not None:
            append(args.out, line)
        return
    if args.case is not None:
        print(json.dumps(run_case(args.case)))
        return
    prepare(args.tokenizer)
    for index in map(int, args.cases.split(",")):
        append(args.out, in_own_process(__file__, ["--case", str(index), "--out", str(args.out)],
                                        failed={"case": CASES[index]}))


if __name__ == "__main__":
    main()
