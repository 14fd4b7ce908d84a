"""Measure real peak GPU memory and tokens/s for catalog models, with the runtime's defaults.

Run on a CUDA machine:
    python benchmarks/measure_memory.py run --out results.jsonl [--ids a,b] [--group infer|finetune]

Each case runs in a fresh Python process (its own CUDA context and caching allocator) so that one
case's allocator state cannot leak into the next. Models are random-initialised from the catalog's
configs (memory and speed do not depend on weight values); int8/nf4 cases save the random model once
and load it through `BitsAndBytesConfig`, as a user's checkpoint would be loaded.

Recorded per case: torch.cuda.max_memory_reserved / max_memory_allocated, memory after loading,
memory in the steady state between steps, device memory used (CUDA context included), tokens/s,
GPU name, library versions and date. The estimator's tests read the committed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAVED_MODELS = Path(os.environ.get("LLMPLAN_BENCH_MODELS", "/tmp/llmplan-bench-models"))


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    task: str  # infer | finetune
    method: str = "none"  # full | lora | qlora for finetune
    precision: str = "bf16-true"
    quant: str = "none"
    batch_size: int = 1
    seq_len: int = 512  # fine-tuning sequence length
    prompt_len: int = 0  # inference
    max_new_tokens: int = 0
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_targets: str = "all-linear"  # or a comma list
    optimizer: str = "adamw"
    allocator: str = "expandable"  # expandable | default (PyTorch's legacy segments)


def _infer(id, model, batch, prompt, new, quant="none", allocator="expandable"):
    return Case(id, model, "infer", quant=quant, batch_size=batch, prompt_len=prompt, max_new_tokens=new, allocator=allocator)


def _ft(id, model, method, batch, seq, gc, precision="bf16-true", targets="all-linear", optimizer="adamw", r=8):
    quant = "nf4" if method == "qlora" else "none"
    return Case(
        id, model, "finetune", method=method, precision=precision, quant=quant, batch_size=batch, seq_len=seq,
        gradient_checkpointing=gc, lora_targets=targets, optimizer=optimizer, lora_r=r,
    )


CASES: tuple[Case, ...] = (
    # inference, 16-bit
    _infer("inf-llama2-7b-b1", "Llama-2-7B", 1, 512, 256),
    _infer("inf-llama2-7b-b8", "Llama-2-7B", 8, 512, 512),
    _infer("inf-llama2-7b-b8-legacy", "Llama-2-7B", 8, 512, 512, allocator="default"),
    _infer("inf-llama31-8b-b4", "Llama-3.1-8B", 4, 1024, 256),
    _infer("inf-mistral-7b-b16", "Mistral-7B", 16, 256, 256),
    _infer("inf-qwen25-7b-b8", "Qwen2.5-7B", 8, 512, 256),
    _infer("inf-gemma2-9b-b4", "Gemma-2-9B", 4, 512, 256),
    _infer("inf-phi3-mini-b8", "Phi-3-mini", 8, 1024, 256),
    _infer("inf-qwen25-05b-b16", "Qwen2.5-0.5B", 16, 2048, 512),
    _infer("inf-llama32-1b-b16", "Llama-3.2-1B", 16, 1024, 256),
    _infer("inf-mixtral-b1", "Mixtral-8x7B", 1, 512, 128),
    _infer("inf-smollm2-17b-b8", "SmolLM2-1.7B", 8, 512, 256),
    _infer("inf-qwen25-05b-b16-legacy", "Qwen2.5-0.5B", 16, 2048, 512, allocator="default"),
    # inference, quantized
    _infer("inf-llama32-3b-int8-b4", "Llama-3.2-3B", 4, 512, 128, quant="int8"),
    _infer("inf-qwen25-15b-int8-b8", "Qwen2.5-1.5B", 8, 512, 128, quant="int8"),
    _infer("inf-llama2-7b-nf4-b4", "Llama-2-7B", 4, 512, 256, quant="nf4"),
    _infer("inf-qwen25-3b-nf4-b8", "Qwen2.5-3B", 8, 512, 256, quant="nf4"),
    _infer("inf-gemma2-2b-nf4-b4", "Gemma-2-2B", 4, 1024, 256, quant="nf4"),
    # LoRA, bf16 base
    _ft("lora-llama2-7b-b4-s512", "Llama-2-7B", "lora", 4, 512, False),
    _ft("lora-llama2-7b-gc-b8-s1024", "Llama-2-7B", "lora", 8, 1024, True),
    _ft("lora-llama31-8b-gc-b4-s2048", "Llama-3.1-8B", "lora", 4, 2048, True),
    _ft("lora-qwen25-7b-b2-s1024", "Qwen2.5-7B", "lora", 2, 1024, False),
    _ft("lora-mistral-7b-gc-b16-s512-qv", "Mistral-7B", "lora", 16, 512, True, targets="q_proj,v_proj"),
    _ft("lora-gemma2-2b-b4-s1024", "Gemma-2-2B", "lora", 4, 1024, False),
    _ft("lora-phi3-mini-gc-b4-s4096", "Phi-3-mini", "lora", 4, 4096, True),
    _ft("lora-qwen25-15b-b8-s512", "Qwen2.5-1.5B", "lora", 8, 512, False),
    _ft("lora-tinyllama-b16-s256", "TinyLlama-1.1B", "lora", 16, 256, False),
    _ft("lora-llama32-1b-gc-b1-s4096-r64", "Llama-3.2-1B", "lora", 1, 4096, True, r=64),
    # QLoRA
    _ft("qlora-llama2-7b-gc-b4-s1024", "Llama-2-7B", "qlora", 4, 1024, True),
    _ft("qlora-llama32-3b-b4-s512", "Llama-3.2-3B", "qlora", 4, 512, False),
    _ft("qlora-qwen25-3b-gc-b8-s1024", "Qwen2.5-3B", "qlora", 8, 1024, True),
    _ft("qlora-gemma2-2b-gc-b2-s2048", "Gemma-2-2B", "qlora", 2, 2048, True),
    _ft("qlora-qwen25-15b-b4-s1024-8bit", "Qwen2.5-1.5B", "qlora", 4, 1024, False, optimizer="paged-adamw-8bit"),
    # full fine-tuning
    _ft("full-llama32-1b-b8-s1024", "Llama-3.2-1B", "full", 8, 1024, False),
    _ft("full-qwen25-05b-mixed-b8-s1024", "Qwen2.5-0.5B", "full", 8, 1024, False, precision="bf16-mixed"),
    _ft("full-smollm2-360m-mixed-b16-s512", "SmolLM2-360M", "full", 16, 512, False, precision="bf16-mixed"),
    _ft("full-llama2-7b-gc-b2-s1024", "Llama-2-7B", "full", 2, 1024, True),
    _ft("full-qwen25-15b-mixed-gc-b4-s2048", "Qwen2.5-1.5B", "full", 4, 2048, True, precision="bf16-mixed"),
    _ft("full-gemma2-2b-b2-s512", "Gemma-2-2B", "full", 2, 512, False),
    _ft("full-llama32-3b-mixed-gc-b4-s1024", "Llama-3.2-3B", "full", 4, 1024, True, precision="bf16-mixed"),
    _ft("full-tinyllama-8bit-b8-s1024", "TinyLlama-1.1B", "full", 8, 1024, False, optimizer="adamw-8bit"),
    # held out: measured after the estimator's constants were set, to check it on configurations it never saw
    _ft("val-lora-llama32-3b-gc-b8-s2048-qv", "Llama-3.2-3B", "lora", 8, 2048, True, targets="q_proj,v_proj"),
    _ft("val-lora-gemma-7b-b2-s1024", "Gemma-7B", "lora", 2, 1024, False),
    _ft("val-full-smollm2-17b-b8-s1024", "SmolLM2-1.7B", "full", 8, 1024, False),
    _ft("val-full-tinyllama-mixed-gc-b16-s2048", "TinyLlama-1.1B", "full", 16, 2048, True, precision="bf16-mixed"),
    _ft("val-lora-llama31-8b-b1-s4096-r16-attn", "Llama-3.1-8B", "lora", 1, 4096, False, targets="q_proj,k_proj,v_proj,o_proj", r=16),
    _ft("val-qlora-qwen25-3b-b2-s2048", "Qwen2.5-3B", "qlora", 2, 2048, False),
    _infer("val-inf-mistral-7b-b32", "Mistral-7B", 32, 256, 128),
    _infer("val-inf-qwen25-15b-nf4-b16", "Qwen2.5-1.5B", 16, 1024, 128, quant="nf4"),
)

WARMUP_STEPS = 1
TIMED_STEPS = 3


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _select(ids: str | None, group: str | None, exclude: str | None = None) -> list[Case]:
    cases = list(CASES)
    if ids:
        wanted = set(ids.split(","))
        cases = [c for c in cases if c.id in wanted]
    if exclude:
        unwanted = set(exclude.split(","))
        cases = [c for c in cases if c.id not in unwanted]
    if group:
        cases = [c for c in cases if c.task == group]
    return cases


def _device_used_bytes() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


def _run_subprocess(args: list[str], allocator: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if allocator == "expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "benchmarks"), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def run_all(out: Path, cases: list[Case], timeout: int) -> None:
    baseline = _device_used_bytes()
    for model in sorted({c.model for c in cases if c.quant != "none"}):
        if not (SAVED_MODELS / model / "config.json").exists():
            done = _run_subprocess(["save", model], "expandable", timeout)
            print(f"saved {model}: rc={done.returncode} {done.stderr[-400:] if done.returncode else ''}", flush=True)
    with out.open("a") as sink:
        for case in cases:
            started = time.time()
            done = _run_subprocess(["case", case.id], case.allocator, timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode == 0 and lines:
                record = json.loads(lines[-1])
                record["device_idle_used_bytes"] = baseline
            else:
                record = {"case": dataclasses.asdict(case), "error": done.stderr[-2000:]}
            record["wall_s"] = round(time.time() - started, 1)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            status = "error" if "error" in record else f"{record['peak_reserved_bytes'] / 2**30:.2f} GiB"
            print(f"{case.id}: {status} ({record['wall_s']} s)", flush=True)


# ------------------------------------------------------------------------------------------------
# worker (one case per process)
# ------------------------------------------------------------------------------------------------
def _spec(name: str):
    from llmplan.planner.model_catalog import MODELS

    return next(m for m in MODELS if m.name.lower() == name.lower())


def save_random_model(name: str) -> None:
    from llmplan.runtime.models.modeling import build_random_model

    model = build_random_model(_spec(name), "bf16", "cuda")
    model.save_pretrained(SAVED_MODELS / name)


def _load(case: Case):
    from llmplan.runtime.models.modeling import build_random_model, load_pretrained

    if case.quant != "none":
        return load_pretrained(str(SAVED_MODELS / case.model), "bf16", case.quant, "cuda")
    weights_dtype = "fp32" if case.precision in ("bf16-mixed", "fp16-mixed", "fp32") and case.method == "full" else "bf16"
    return build_random_model(_spec(case.model), weights_dtype, "cuda")


def _prepare_for_training(model, case: Case):
    from llmplan.runtime.models.modeling import LoraSettings, prepare_for_training

    lora = None
    if case.method in ("lora", "qlora"):
        targets = case.lora_targets if case.lora_targets == "all-linear" else tuple(case.lora_targets.split(","))
        lora = LoraSettings(r=case.lora_r, alpha=2 * case.lora_r, targets=targets)
    return prepare_for_training(model, case.method, case.gradient_checkpointing, lora, kernels="none")


def _finetune(model, case: Case, vocab: int) -> dict:
    import torch

    from llmplan.runtime.models.modeling import make_optimizer

    model = _prepare_for_training(model, case)
    optimizer = make_optimizer(model, case.optimizer)
    autocast = case.precision in ("bf16-mixed", "fp16-mixed")
    amp_dtype = torch.float16 if case.precision == "fp16-mixed" else torch.bfloat16
    ids = torch.randint(0, vocab, (case.batch_size, case.seq_len), device="cuda")
    losses, steady = [], 0
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=amp_dtype, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        steady = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "tokens_per_s": case.batch_size * case.seq_len * TIMED_STEPS / elapsed,
        "step_s": elapsed / TIMED_STEPS,
        "losses": losses,
        "steady_allocated_bytes": steady,
        "trainable_params": trainable,
    }


def _generate(model, case: Case, vocab: int) -> dict:
    import torch

    model.eval()
    ids = torch.randint(3, vocab, (case.batch_size, case.prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        model.generate(ids[:1, :16], max_new_tokens=4, min_new_tokens=4, **{**kwargs, "attention_mask": mask[:1, :16]})
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=case.max_new_tokens, min_new_tokens=case.max_new_tokens, **kwargs)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    new_tokens = (out.shape[1] - case.prompt_len) * case.batch_size
    return {"tokens_per_s": new_tokens / elapsed, "generate_s": elapsed, "new_tokens": new_tokens}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_case(case: Case) -> dict:
    import torch

    torch.manual_seed(0)
    model = _load(case)
    weights_allocated = torch.cuda.memory_allocated()
    vocab = model.config.vocab_size
    attn = getattr(model.config, "_attn_implementation", None)
    measured = _finetune(model, case, vocab) if case.task == "finetune" else _generate(model, case, vocab)
    free, total = torch.cuda.mem_get_info()
    return {
        "case": dataclasses.asdict(case),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_bytes": total,
        "date": dt.date.today().isoformat(),
        "versions": _versions(),
        "cuda": torch.version.cuda,
        "attn_implementation": attn,
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "weights_allocated_bytes": weights_allocated,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "device_used_bytes": total - free,
        **measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--ids")
    run.add_argument("--group", choices=["infer", "finetune"])
    run.add_argument("--exclude", help="comma list of case ids to skip (already measured)")
    run.add_argument("--timeout", type=int, default=300)
    sub.add_parser("case").add_argument("id")
    sub.add_parser("save").add_argument("model")
    sub.add_parser("list")
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.out, _select(args.ids, args.group, args.exclude), args.timeout)
    elif args.command == "case":
        print(json.dumps(run_case(next(c for c in CASES if c.id == args.id))))
    elif args.command == "save":
        save_random_model(args.model)
    else:
        for case in CASES:
            print(case.id)


if __name__ == "__main__":
    main()
