"""Long-context fine-tuning on one GPU: peak memory and tokens/s at 2k-32k tokens, three recipes (issue 15).

    python benchmarks/long_context_bench.py run --out long-context.jsonl [--ids a,b] [--group memory|speed]

Recipes, on the same dense (unpadded) random sequences:
- new: the runtime's `modeling.prepare_for_training` (QLoRA's base frozen in bf16, no fp32 upcast), Liger's
  kernels where the case says so, the expandable-segments allocator; the whole run under
  `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`, so a fallback to the math kernel fails the case;
- main: the recipe before this change (PEFT's `prepare_model_for_kbit_training` for QLoRA, no Liger), with
  the expandable-segments allocator;
- plain: the same as main with PyTorch's default allocator: what a transformers + peft loop does.

Models have random weights from the catalog's architecture configs (memory and speed do not depend on the
values). Where `layers` is set, the model keeps only that many decoder layers: the configuration measured is
that smaller model, and the estimator is checked against the same smaller model (a per-layer cost times the
layer count plus the embeddings, head and logits). QLoRA models are saved once in bf16 (under
/dev/shm) and loaded through `BitsAndBytesConfig`, as a user's checkpoint would be.

Each case runs in a fresh process (its own CUDA context and allocator); one JSON line per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAVED = Path(os.environ.get("LLMPLAN_BENCH_MODELS", "/dev/shm/llmplan-long-context"))


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    method: str  # full | lora | qlora
    seq_len: int
    gradient_checkpointing: bool = True
    kernels: str = "none"  # liger | none (recipe new only)
    recipe: str = "new"  # new | main | plain
    layers: int = 0  # 0: the architecture's own layer count
    batch_size: int = 1
    lora_r: int = 16
    lora_dropout: float = 0.0
    steps: int = 3  # the first one is not timed
    group: str = "memory"  # memory | speed
    activation_offload: bool = False  # checkpointed layer inputs in CPU memory (recipe new, with checkpointing)
    compile: str = "none"  # none | layers: torch.compile of each decoder layer (prepare_for_training(compile_layers))
    liger_layers: bool = True  # with compile and kernels liger: False is the recipe (Liger's fused loss only)


def _m(id, model, method, seq, gc=True, kernels="none", layers=0, **extra):
    return Case(id, model, method, seq, gc, kernels, layers=layers, **extra)


def _speed(id, method, recipe, kernels="none", seq=2048, batch=2, gc=False, steps=6, **extra):
    return Case(id, "Llama-3-8B", method, seq, gc, kernels, recipe, batch_size=batch, steps=steps, group="speed", **extra)


CASES: tuple[Case, ...] = (
    # GQA, vocabulary 128k (Llama-3-8B shape, 8 of its 32 layers)
    _m("lc-qlora-llama3-8l-gc-s8k", "Llama-3-8B", "qlora", 8192, layers=8),
    _m("lc-qlora-llama3-8l-gc-s8k-liger", "Llama-3-8B", "qlora", 8192, kernels="liger", layers=8),
    _m("lc-qlora-llama3-8l-gc-s32k", "Llama-3-8B", "qlora", 32768, layers=8),
    _m("lc-qlora-llama3-8l-gc-s32k-liger", "Llama-3-8B", "qlora", 32768, kernels="liger", layers=8),
    _m("lc-qlora-llama3-8l-s4k", "Llama-3-8B", "qlora", 4096, gc=False, layers=8),
    _m("lc-qlora-llama3-8l-s4k-liger", "Llama-3-8B", "qlora", 4096, gc=False, kernels="liger", layers=8),
    _m("lc-lora-llama3-8l-gc-s16k", "Llama-3-8B", "lora", 16384, layers=8),
    _m("lc-lora-llama3-8l-gc-s16k-liger", "Llama-3-8B", "lora", 16384, kernels="liger", layers=8),
    _m("lc-lora-llama3-8l-s2k-drop", "Llama-3-8B", "lora", 2048, gc=False, layers=8, lora_dropout=0.1),
    _m("lc-lora-llama3-8l-gc-s8k-drop", "Llama-3-8B", "lora", 8192, layers=8, lora_dropout=0.1),
    # the whole Llama-3-8B: QLoRA at 8k and 16k tokens is what a 24 GB card is asked to hold
    _m("lc-qlora-llama3-8b-gc-s8k-liger", "Llama-3-8B", "qlora", 8192, kernels="liger"),
    _m("lc-qlora-llama3-8b-gc-s16k-liger", "Llama-3-8B", "qlora", 16384, kernels="liger"),
    _m("lc-qlora-llama3-8b-gc-s16k", "Llama-3-8B", "qlora", 16384),
    # what `llmplan fit Llama-3-8B --gpu RTX-4090 --method qlora --seq-len 8192` plans: micro-batch 2, checkpointing
    _m("fit-qlora-llama3-8b-gc-b2-s8k-liger", "Llama-3-8B", "qlora", 8192, kernels="liger", batch_size=2),
    # the recipe before issue 15 (fp32 norms and activations, math SDPA kernel), for comparison only
    _m("lc-qlora-llama3-8b-gc-s8k-main", "Llama-3-8B", "qlora", 8192, recipe="main"),
    _m("lc-qlora-llama3-8l-gc-s8k-main", "Llama-3-8B", "qlora", 8192, layers=8, recipe="main"),
    # GQA, vocabulary 32k, no sliding window (Mistral-7B-v0.3 shape)
    _m("lc-qlora-mistral03-8l-gc-s16k", "Mistral-7B-v0.3", "qlora", 16384, layers=8),
    _m("lc-qlora-mistral03-8l-gc-s16k-liger", "Mistral-7B-v0.3", "qlora", 16384, kernels="liger", layers=8),
    _m("lc-lora-mistral03-8l-s4k", "Mistral-7B-v0.3", "lora", 4096, gc=False, layers=8),
    _m("lc-lora-mistral03-8l-s4k-liger", "Mistral-7B-v0.3", "lora", 4096, gc=False, kernels="liger", layers=8),
    # GQA, vocabulary 152k (Qwen2.5-7B shape; biases on q, k, v)
    _m("lc-qlora-qwen25-7b-8l-gc-s8k", "Qwen2.5-7B", "qlora", 8192, layers=8),
    _m("lc-qlora-qwen25-7b-8l-gc-s8k-liger", "Qwen2.5-7B", "qlora", 8192, kernels="liger", layers=8),
    _m("lc-lora-qwen25-7b-8l-gc-s32k-liger", "Qwen2.5-7B", "lora", 32768, kernels="liger", layers=8),
    # MHA, vocabulary 32k (Llama-2-7B shape)
    _m("lc-qlora-llama2-8l-gc-s8k", "Llama-2-7B", "qlora", 8192, layers=8),
    _m("lc-qlora-llama2-8l-gc-s8k-liger", "Llama-2-7B", "qlora", 8192, kernels="liger", layers=8),
    _m("lc-lora-llama2-8l-s2k", "Llama-2-7B", "lora", 2048, gc=False, layers=8),
    # MHA, vocabulary 256k, head dim 256 (Gemma-7B shape)
    _m("lc-qlora-gemma-7b-8l-gc-s8k", "Gemma-7B", "qlora", 8192, layers=8),
    _m("lc-qlora-gemma-7b-8l-gc-s8k-liger", "Gemma-7B", "qlora", 8192, kernels="liger", layers=8),
    _m("lc-lora-gemma-7b-8l-gc-s16k-liger", "Gemma-7B", "lora", 16384, kernels="liger", layers=8),
    # full fine-tuning, small models (allocator slack), tied embeddings
    _m("lc-full-qwen25-15b-gc-s8k", "Qwen2.5-1.5B", "full", 8192),
    _m("lc-full-qwen25-15b-gc-s8k-liger", "Qwen2.5-1.5B", "full", 8192, kernels="liger"),
    _m("lc-full-llama32-1b-gc-s16k-liger", "Llama-3.2-1B", "full", 16384, kernels="liger"),
    _m("lc-full-llama32-1b-s2k", "Llama-3.2-1B", "full", 2048, gc=False),
    # speed: Llama-3-8B shape, LoRA r16 all-linear and QLoRA, dense 2,048-token rows
    _speed("speed-lora-plain", "lora", "plain"),
    _speed("speed-lora-main", "lora", "main"),
    _speed("speed-lora-new", "lora", "new", "liger"),
    _speed("speed-qlora-plain", "qlora", "plain"),
    _speed("speed-qlora-main", "qlora", "main"),
    _speed("speed-qlora-new", "qlora", "new", "liger"),
    # issue 15's LoRA target (1.3x, -30%): regional compilation of the decoder layers, over Liger's kernels or
    # in place of its layer kernels (Liger's fused loss kept: what the recipe's compile_layers does)
    _speed("speed-lora-new-compile", "lora", "new", "liger", compile="layers", steps=8),
    _speed("speed-lora-new-compile-loss", "lora", "new", "liger", compile="layers", liger_layers=False, steps=8),
    # activation offload: the checkpointed layer inputs wait in CPU memory (compare lc-qlora-llama3-8l-gc-s32k-liger)
    _m("lc-qlora-llama3-8l-gc-s32k-liger-offload", "Llama-3-8B", "qlora", 32768, kernels="liger", layers=8,
       activation_offload=True),
    _m("lc-lora-llama3-8l-gc-s16k-liger-offload", "Llama-3-8B", "lora", 16384, kernels="liger", layers=8,
       activation_offload=True),
)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _select(ids: str | None, group: str | None) -> list[Case]:
    cases = [c for c in CASES if not group or c.group == group]
    if ids:
        wanted = ids.split(",")
        cases = [c for c in cases if c.id in wanted]
    return cases


def _env(recipe: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if recipe != "plain":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def _run_one(out: Path, case: Case, timeout: int) -> None:
    import subprocess

    started = time.time()
    try:
        done = subprocess.run([sys.executable, __file__, "case", case.id], env=_env(case.recipe),
                              capture_output=True, text=True, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        record = json.loads(lines[-1]) if done.returncode == 0 and lines else {
            "case": dataclasses.asdict(case), "error": done.stderr[-2500:]}
    except subprocess.TimeoutExpired:
        record = {"case": dataclasses.asdict(case), "error": f"timeout {timeout} s"}
    record["wall_s"] = round(time.time() - started, 1)
    with out.open("a") as sink:
        sink.write(json.dumps(record) + "\n")
    status = record.get("error", "")[-300:] or (
        f"{record['peak_reserved_bytes'] / 2**30:.2f} GiB, {record['tokens_per_s']:.0f} tok/s")
    print(f"{case.id}: {status} ({record['wall_s']} s)", flush=True)


def _estimated_gib(case: Case) -> float:
    from llmplan.planner.calibration import request_from_case
    from llmplan.planner.estimator import estimate

    return estimate(request_from_case(dataclasses.asdict(case))).peak_bytes / 2**30


def run_all(out: Path, cases: list[Case], timeout: int, parallel: int, budget_gib: float) -> None:
    """Speed cases one at a time; memory cases `parallel` at once while their estimates (x1.5, the old recipe
    can need more) fit `budget_gib`: each process's peak is its own allocator's, whatever runs beside it."""
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor

    for case in {(c.model, c.layers): c for c in cases if c.method == "qlora"}.values():
        done = subprocess.run([sys.executable, __file__, "save", case.id], capture_output=True, text=True)
        print(f"saved {case.model} ({case.layers or 'all'} layers): rc {done.returncode} {done.stderr[-500:]}", flush=True)
    for case in [c for c in cases if c.group == "speed"]:
        _run_one(out, case, timeout)
    memory = sorted((c for c in cases if c.group == "memory"), key=_estimated_gib, reverse=True)
    free = threading.Condition()
    in_use = [0.0]

    def run(case: Case) -> None:
        need = min(1.5 * _estimated_gib(case) + 1, budget_gib)
        with free:
            free.wait_for(lambda: in_use[0] + need <= budget_gib)
            in_use[0] += need
        try:
            _run_one(out, case, timeout)
        finally:
            with free:
                in_use[0] -= need
                free.notify_all()

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run, memory))


# ------------------------------------------------------------------------------------------------
# worker (one case per process)
# ------------------------------------------------------------------------------------------------
def spec_of(case: Case):
    """The architecture measured: the catalog's, with `layers` decoder layers where the case sets it."""
    from llmplan.planner.model_catalog import MODELS

    spec = next(m for m in MODELS if m.name == case.model)
    if case.layers:
        spec = dataclasses.replace(spec, name=f"{spec.name}-{case.layers}l", num_layers=case.layers)
    return spec


def _load(case: Case):
    from llmplan.runtime.models.modeling import build_random_model, load_pretrained

    spec = spec_of(case)
    if case.method != "qlora":
        return build_random_model(spec, "bf16", "cuda")
    return load_pretrained(str(save(case)), "bf16", "nf4", "cuda")


def save(case: Case) -> Path:
    """The case's architecture saved once in bf16, for the NF4 loader."""
    from llmplan.runtime.models.modeling import build_random_model

    spec = spec_of(case)
    saved = SAVED / spec.name
    if not (saved / "config.json").exists():
        build_random_model(spec, "bf16", "cuda").save_pretrained(saved)
    return saved


def _prepare(model, case: Case):
    from llmplan.runtime.models.modeling import (
        LoraSettings,
        apply_liger_kernels,
        apply_lora,
        enable_gradient_checkpointing,
        prepare_for_training,
    )

    lora = None if case.method == "full" else LoraSettings(case.lora_r, 2 * case.lora_r, case.lora_dropout)
    if case.recipe == "new":
        kernels = case.kernels
        if case.compile == "layers" and case.liger_layers and kernels == "liger":
            apply_liger_kernels(model)  # Liger's layer kernels under Inductor too (the recipe keeps only its loss)
            kernels = "none"
        return prepare_for_training(model, case.method, case.gradient_checkpointing, lora, kernels,
                                    activation_offload=case.activation_offload,
                                    compile_layers=case.compile == "layers")
    # main / plain: the recipe before issue 15 (PEFT's k-bit preparation upcasts the non-quantized weights)
    model.config.use_cache = False
    if case.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif case.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora)
    model.train()
    return model


def _fused_attention_only(case: Case):
    """The new recipe runs with the math SDPA kernel switched off: a fallback would raise."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if case.recipe != "new" or spec_of(case).attention != "sdpa":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _train(model, case: Case) -> dict:
    import torch

    from llmplan.runtime.models.modeling import make_optimizer

    optimizer = make_optimizer(model, "adamw")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (case.batch_size, case.seq_len), device="cuda")
    losses = []
    with _fused_attention_only(case):
        for step in range(case.steps):
            if step == 1:
                torch.cuda.synchronize()
                started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    timed = case.steps - 1
    return {"tokens_per_s": case.batch_size * case.seq_len * timed / elapsed, "step_s": elapsed / timed,
            "losses": losses, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_case(case: Case) -> dict:
    import datetime as dt

    import torch

    torch.manual_seed(0)
    model = _prepare(_load(case), case)
    loaded = torch.cuda.memory_allocated()
    measured = _train(model, case)
    free, total = torch.cuda.mem_get_info()
    return {
        "case": dataclasses.asdict(case),
        "num_layers": spec_of(case).num_layers,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_bytes": total,
        "date": dt.date.today().isoformat(),
        "versions": _versions(),
        "cuda": torch.version.cuda,
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "prepared_allocated_bytes": loaded,
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
    run.add_argument("--group", choices=["memory", "speed"])
    run.add_argument("--timeout", type=int, default=240)
    run.add_argument("--parallel", type=int, default=3, help="memory cases run at once")
    run.add_argument("--budget-gib", type=float, default=125.0, help="GPU memory the parallel cases may share")
    sub.add_parser("case").add_argument("id")
    sub.add_parser("save").add_argument("id")
    sub.add_parser("list")
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.out, _select(args.ids, args.group), args.timeout, args.parallel, args.budget_gib)
    elif args.command == "case":
        print(json.dumps(run_case(next(c for c in CASES if c.id == args.id))), flush=True)
    elif args.command == "save":
        save(next(c for c in CASES if c.id == args.id))
    else:
        for case in CASES:
            print(case.id)


if __name__ == "__main__":
    main()
