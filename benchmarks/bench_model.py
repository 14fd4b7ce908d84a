"""The 7B-shaped model the GPU benchmarks share: Llama-2-7B's architecture with random weights, saved once.

Memory and speed do not depend on weight values, so a random model stands in for the real checkpoint no
machine here can download. Its vocabulary is that of the tokenizer given (SmolLM2's, carried to the GPU
machine), so real text tokenizes into it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

MODEL_DIR = Path(os.environ.get("LLMPLAN_BENCH_MODELS", "/tmp/llmplan-bench-models")) / "llama2-7b-shape"
DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca_llmplan.jsonl"


def prepare(tokenizer_dir: Path) -> Path:
    """Save the random 7B-shaped model once, with the tokenizer beside it; its directory."""
    return save_random_model("Llama-2-7B", tokenizer_dir, MODEL_DIR)


def save_random_model(catalog_name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A catalog model's architecture with random weights (built on the GPU) and the tokenizer's vocabulary,
    saved once as an HF directory named like `out`; its directory. `python bench_model.py NAME TOKENIZER OUT`."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer

    from llmplan.planner.resolve import find_model
    from llmplan.runtime.models.modeling import build_random_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dataclasses.replace(find_model(catalog_name), name=out.name, vocab_size=len(tokenizer))
    build_random_model(spec, "bf16", "cuda").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def environment() -> dict:
    """What a result line records about where it was measured."""
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "date": dt.date.today().isoformat()}


def in_own_process(script: str, arguments: list[str], *, env: dict[str, str] | None = None,
                   failed: dict | None = None, timeout: float | None = None) -> dict:
    """Run `script` in a fresh Python (its own CUDA context and allocator) and return the JSON object its last
    line of output holds; when it fails or runs past `timeout` seconds, `failed` with the end of its error output
    under "error"."""
    try:
        done = subprocess.run([sys.executable, script, *arguments], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return {**(failed or {}), "error": f"timed out after {timeout:.0f} s", "stderr": str(expired.stderr)[-2000:]}
    if done.returncode != 0:
        return {**(failed or {}), "error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def append(path: Path, record: dict) -> None:
    """One result line, written as it is measured (a run cut short keeps what it had) and shown."""
    line = json.dumps(record)
    with path.open("a") as sink:
        sink.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    print(save_random_model(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
