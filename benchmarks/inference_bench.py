"""llmplan's generation path against a plain transformers `generate` loop, and dynamic vs static KV cache.

Run on a CUDA machine (no Ray needed: it calls the runtime below the Ray layer, as the Ray actor does):
    python benchmarks/inference_bench.py --tokenizer DIR --out results.jsonl [--quant none,nf4]

DIR holds a tokenizer (e.g. SmolLM2's, from `llmplan models pull smollm2-135m-instruct`); the model is
Llama-2-7B-shaped with that tokenizer's vocabulary, random weights saved once (memory and speed do not
depend on weight values). Each case runs in its own process. Recorded per case: tokens/s, peak reserved
memory, the estimator's prediction for the same request, GPU name, library versions, date.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_model import MODEL_DIR, append, environment, in_own_process, prepare

CASES = [  # (path, quant, cache, batch, prompt, new)
    ("plain", "none", "dynamic", 8, 512, 256),
    ("llmplan", "none", "dynamic", 8, 512, 256),
    ("plain", "none", "static", 8, 512, 256),
    ("plain", "nf4", "dynamic", 8, 512, 256),
    ("llmplan", "nf4", "dynamic", 8, 512, 256),
    ("llmplan-sharded", "none", "dynamic", 8, 512, 256),  # device_map="auto" over every GPU (run with --cases 5)
]


def prompts(tokenizer, batch: int, length: int) -> list[str]:
    words = "the plan runs on the card and the model answers every prompt in time".split()
    text = " ".join(words[i % len(words)] for i in range(length * 2))
    ids = tokenizer(text, add_special_tokens=False).input_ids[: length - 1]
    return [tokenizer.decode(ids)] * batch


def plain(quant: str, cache: str, batch: int, prompt: int, new: int) -> dict:
    """What users write by hand: from_pretrained, generate, with HF defaults."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmplan.runtime.models.modeling import quantization_config

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map={"": "cuda"},
                                                 quantization_config=quantization_config(quant))
    inputs = tokenizer(prompts(tokenizer, batch, prompt), return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    model.generate(**{k: v[:1, :8] for k, v in inputs.items()}, max_new_tokens=2, do_sample=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
    return {"tokens_per_s": generated / seconds, "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def through_llmplan(quant: str, batch: int, prompt: int, new: int, device: str = "cuda") -> dict:
    """The runtime's own path: setup (expandable segments, its quantization), complete, as the actor runs it;
    device "auto" shards the model over every GPU, as a replica holding several GPUs does."""
    from llmplan.runtime.infer.inference import GenerationSettings, complete, setup

    generator = setup(MODEL_DIR, dtype="bf16", quant=quant, device=device)
    complete(generator, ["warm up"], GenerationSettings(max_new_tokens=2, batch_size=1))
    report = complete(generator, prompts(generator.tokenizer, batch, prompt),
                      GenerationSettings(max_new_tokens=new, batch_size=batch))
    from llmplan.runtime.infer.inference import gpus_of

    return {"tokens_per_s": report.tokens_per_second, "peak_reserved_bytes": report.peak_reserved_bytes,
            "generated_tokens": report.generated_tokens, "gpus_used": len(gpus_of(generator))}


def estimate_for(quant: str, batch: int, prompt: int, new: int) -> int:
    from llmplan.planner.estimator import estimate
    from llmplan.planner.request import EstimateRequest, Quant, Task
    from llmplan.planner.resolve import resolve_model

    spec = resolve_model(str(MODEL_DIR)).spec
    req = EstimateRequest(model=spec, task=Task.INFER, quant=Quant(quant), micro_batch_size=batch, prompt_len=prompt,
                          max_new_tokens=new)
    return estimate(req).peak_bytes


def run_case(index: int) -> dict:
    path, quant, cache, batch, prompt, new = CASES[index]
    if path == "plain":
        measured = plain(quant, cache, batch, prompt, new)
    else:
        measured = through_llmplan(quant, batch, prompt, new, "auto" if path == "llmplan-sharded" else "cuda")
    return {"path": path, "quant": quant, "cache": cache, "batch": batch, "prompt_len": prompt, "max_new_tokens": new,
            **measured, "estimated_peak_bytes": estimate_for(quant, batch, prompt, new),
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), **environment()}




# ---- the engines (issue 16): many prompts, batch 8 and 64 ----------------------------------------------
# (path, batch, prompts, new). "plain" and "generate" run batch after batch at a rate that does not depend on
# the number of batches: they are timed on one batch of the prompts, not all of them.
ENGINE_CASES = [
    ("check", 8, 8, 32),  # greedy tokens: the continuous engine against generate, same prompts
    ("plain", 8, 8, 256),
    ("generate", 8, 8, 256),
    ("generate", 64, 64, 256),
    ("continuous", 8, 64, 256),
    ("continuous", 64, 256, 256),
    ("graphs", 64, 256, 256),
    ("generate_batch", 0, 256, 256),
    ("continuous", 64, 2048, 256),
    ("continuous", 256, 2048, 256),
    ("continuous-compile1", 64, 256, 256),
    # the slots engine (runtime.infer.slots), with the baselines again in the same call
    ("check-slots", 8, 16, 32),  # greedy tokens: slots against generate, bf16 and fp32
    ("plain", 64, 64, 256),
    ("slots", 8, 64, 256),
    ("slots", 64, 256, 256),
    ("slots", 256, 256, 256),
    ("slots", 256, 2048, 256),
    ("slots", 64, 2048, 256),
]
BANDWIDTH = 4.8e12  # H200 HBM3e, bytes/s
DEVICE = os.environ.get("LLMPLAN_BENCH_DEVICE", "cuda")  # "cpu": a dry run of the code on a small model
ON_CUDA = DEVICE == "cuda"
CASE_TIMEOUT_S = float(os.environ.get("LLMPLAN_BENCH_CASE_TIMEOUT", "150"))


def data_prompts(count: int) -> list[str]:
    """Instructions from examples/data, cycled (numbered after the first round) to `count` prompts."""
    from bench_model import DATA

    rows = [json.loads(line)["instruction"] for line in DATA.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] + ("" if i < len(rows) else f" ({i // len(rows)})") for i in range(count)]


def bandwidth_limit(batch: int, prompt_tokens: float, new: int) -> float:
    """Tokens/s if every decode step only read the weights and the batch's KV cache at full bandwidth."""
    from llmplan.planner.resolve import resolve_model

    spec = resolve_model(str(MODEL_DIR)).spec
    weights = 2 * (spec.num_layers * (4 * spec.hidden_size ** 2 + 3 * spec.hidden_size * spec.intermediate_size)
                   + 2 * spec.hidden_size * spec.vocab_size)
    kv_per_token = 2 * 2 * spec.num_layers * spec.num_kv_heads * (spec.head_dim or spec.hidden_size // spec.num_heads)
    average_context = prompt_tokens + new / 2
    step_bytes = weights + batch * average_context * kv_per_token
    return batch * BANDWIDTH / step_bytes


def engine_case(index: int) -> dict:
    import torch

    path, batch, count, new = ENGINE_CASES[index]
    texts = data_prompts(count)
    if path == "check":
        return greedy_check(texts, new)
    if path == "check-slots":
        return slots_check(texts, new)
    if path == "generate_batch":
        measured = through_generate_batch(texts, new)
    elif path == "plain":
        measured = plain_batches(texts, batch, new)
    else:
        measured = through_engine(path, texts, batch, new)
    prompt_mean = measured.pop("prompt_tokens") / count
    limit = bandwidth_limit(batch or 64, prompt_mean, new)
    return {"bench": "engine", "path": path, "batch": batch, "prompts": count, "max_new_tokens": new,
            "mean_prompt_tokens": prompt_mean, **measured, "bandwidth_limit_tokens_per_s": limit,
            "share_of_limit": measured["tokens_per_s"] / limit, "peak_allocated_bytes": torch.cuda.max_memory_allocated() if ON_CUDA else None,
            **environment()}


def through_engine(path: str, texts: list[str], batch: int, new: int) -> dict:
    """llmplan's recipe (setup, complete) on one engine; the continuous engine with transformers' compile level 1
    is called below the recipe (engine.continuous), as the recipe would."""
    from llmplan.runtime.infer.inference import GenerationSettings, complete, setup

    generator = setup(MODEL_DIR, dtype="bf16", quant="none", device=DEVICE)
    complete(generator, ["warm up"], GenerationSettings(max_new_tokens=2, batch_size=1))
    engine = "continuous" if path.startswith("continuous") else path
    if path == "continuous-compile1":
        from llmplan.runtime.infer import engine as engines

        engines.COMPILE_LEVEL = 1  # this process only
    settings = GenerationSettings(max_new_tokens=new, batch_size=batch, engine=engine)
    report = complete(generator, texts, settings)
    longest = max(len(generator.tokenizer(text).input_ids) for text in texts)
    return {"tokens_per_s": report.tokens_per_second, "wall_seconds": report.wall_seconds,
            "longest_prompt_tokens": longest, "estimated_peak_bytes": estimate_for("none", batch, longest, new),
            "generated_tokens": report.generated_tokens, "prompt_tokens": report.prompt_tokens,
            "first_token_seconds": report.first_token_seconds, "engine": report.engine,
            "slots_step": generator.decoders.current.step_kind if report.engine == "slots" else None,
            "peak_reserved_bytes": report.peak_reserved_bytes}


def plain_batches(texts: list[str], batch: int, new: int) -> dict:
    """HF generate with its defaults, batch after batch, as users write it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map={"": DEVICE})
    model.generate(**tokenizer(["warm up"], return_tensors="pt").to(DEVICE), max_new_tokens=2, do_sample=False)
    if ON_CUDA:
        torch.cuda.synchronize()
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    started, generated, prompt_tokens = time.perf_counter(), 0, 0
    for first in range(0, len(texts), batch):
        inputs = tokenizer(texts[first : first + batch], return_tensors="pt", padding=True).to(DEVICE)
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        prompt_tokens += int(inputs["attention_mask"].sum())
    if ON_CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": generated / seconds, "wall_seconds": seconds, "generated_tokens": generated,
            "prompt_tokens": prompt_tokens, "peak_reserved_bytes": torch.cuda.max_memory_reserved() if ON_CUDA else None}


def through_generate_batch(texts: list[str], new: int) -> dict:
    """transformers' `generate_batch` with its defaults (its own cache sizing and CUDA-graph choice)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map={"": DEVICE})
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = model.generate_batch(encoded, generation_config=config)
    seconds = time.perf_counter() - started
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"tokens_per_s": generated / seconds, "wall_seconds": seconds, "generated_tokens": generated,
            "prompt_tokens": sum(map(len, encoded)), "peak_reserved_bytes": torch.cuda.max_memory_reserved() if ON_CUDA else None}


def greedy_check(texts: list[str], new: int) -> dict:
    """Greedy tokens of the continuous engine against `generate` one prompt at a time (bf16, same prompts)."""
    from llmplan.runtime.infer.inference import GenerationSettings, complete, setup

    generator = setup(MODEL_DIR, dtype="bf16", quant="none", device=DEVICE)
    one_by_one = [complete(generator, [t], GenerationSettings(max_new_tokens=new, batch_size=1))[0].token_ids
                  for t in texts]
    fast = [c.token_ids for c in complete(generator, texts, GenerationSettings(max_new_tokens=new, batch_size=8,
                                                                                engine="continuous"))]
    batched = [c.token_ids for c in complete(generator, texts, GenerationSettings(max_new_tokens=new, batch_size=8,
                                                                                   engine="generate"))]

    def agreement(other: list[tuple[int, ...]]) -> dict:
        same = sum(a == b for a, b in zip(one_by_one, other))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(one_by_one, other)]
        return {"identical": same, "of": len(texts), "min_common_prefix": min(prefix)}

    return {"bench": "engine", "path": "check", "max_new_tokens": new, "continuous_vs_one_by_one": agreement(fast),
            "generate_batch8_vs_one_by_one": agreement(batched), **environment()}


def slots_check(texts: list[str], new: int) -> dict:
    """Greedy tokens of the slots engine (batch 8, so slots are refilled) against `generate` one prompt at a time
    and in batches of 8, in bf16 and in fp32 (where only summation order can make them differ)."""
    import torch

    from llmplan.runtime.infer.inference import GenerationSettings, cleanup, complete, setup

    record: dict = {"bench": "engine", "path": "check-slots", "prompts": len(texts), "max_new_tokens": new}
    for dtype in ("bf16", "fp32"):
        generator = setup(MODEL_DIR, dtype=dtype, quant="none", device=DEVICE)
        one_by_one = [complete(generator, [t], GenerationSettings(max_new_tokens=new, batch_size=1,
                                                                  engine="generate"))[0].token_ids for t in texts]
        runs = {engine: [c.token_ids for c in complete(generator, texts, GenerationSettings(
            max_new_tokens=new, batch_size=8, engine=engine))] for engine in ("slots", "generate")}
        for engine, tokens in runs.items():
            same = sum(a == b for a, b in zip(one_by_one, tokens))
            prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(one_by_one, tokens)]
            record[f"{dtype}_{engine}_batch8_vs_one_by_one"] = {"identical": same, "of": len(texts),
                                                               "min_common_prefix": min(prefix)}
        record[f"{dtype}_slots_vs_generate_batch8_identical"] = sum(a == b for a, b in zip(runs["slots"], runs["generate"]))
        cleanup(generator)
        if ON_CUDA:
            torch.cuda.empty_cache()
    return {**record, **environment()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", default="0,1,2,3,4", help="Comma list of CASES indices.")
    parser.add_argument("--engine-cases", default="", help="Comma list of ENGINE_CASES indices (run instead of --cases).")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case)))
        return
    if args.engine_case is not None:
        print(json.dumps(engine_case(args.engine_case)))
        return
    prepare(args.tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if args.engine_cases:
        for index in map(int, args.engine_cases.split(",")):
            append(args.out, in_own_process(__file__, ["--engine-case", str(index)], env=env, timeout=CASE_TIMEOUT_S,
                                            failed={"bench": "engine", "case": ENGINE_CASES[index]}))
        return
    for index in map(int, args.cases.split(",")):
        append(args.out, in_own_process(__file__, ["--case", str(index)], env=env, failed={"case": CASES[index]}))


if __name__ == "__main__":
    main()
