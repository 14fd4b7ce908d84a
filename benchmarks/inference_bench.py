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

    from llmplan.runtime.modeling import quantization_config

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
    from llmplan.runtime.inference import GenerationSettings, complete, setup

    generator = setup(MODEL_DIR, dtype="bf16", quant=quant, device=device)
    complete(generator, ["warm up"], GenerationSettings(max_new_tokens=2, batch_size=1))
    report = complete(generator, prompts(generator.tokenizer, batch, prompt),
                      GenerationSettings(max_new_tokens=new, batch_size=batch))
    from llmplan.runtime.inference import gpus_of

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", default="0,1,2,3,4", help="Comma list of CASES indices.")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case)))
        return
    prepare(args.tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    for index in map(int, args.cases.split(",")):
        append(args.out, in_own_process(__file__, ["--case", str(index)], env=env, failed={"case": CASES[index]}))


if __name__ == "__main__":
    main()
