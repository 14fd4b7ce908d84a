"""Which engine runs a generation call, and transformers' two fast paths behind `runtime.inference`.

The engines (`generation.ENGINES`):

- "slots" (`runtime.infer.slots`): llmplan's own: a static slot cache, continuous refill, the decode step
  replayed as one CUDA graph without a compiler. The default on CUDA for the models it supports.
- "continuous": transformers' continuous batching (`init_continuous_batching`): a paged KV cache sized
  here from the call (concurrency x the longest prompt plus max_new_tokens, never the free memory), a
  scheduler that admits a waiting prompt into a finished sequence's slot at the next step, prompts handed
  over longest first (grouped by length), and on CUDA its forward passes replayed as CUDA graphs.
  Completions come out as they finish.
- "graphs": `generate` on a static KV cache, which transformers compiles with
  `torch.compile(mode="reduce-overhead")` (CUDA graphs) on CUDA; prompts sorted by length into batches of
  the concurrency, every batch the same shape (the last one padded with repeats) so one graph serves all.
- "generate": plain `model.generate` on batches (`runtime.inference`): the CPU, quantized and sharded models.

`choose(...)` decides for "auto" (measured on an H200: BENCHMARKS.md, "Inference engines").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .generation import Finished, InferenceError

# Where the slots engine cannot run, when "auto" takes which other engine, from the H200 runs (BENCHMARKS.md, "Inference engines"; 7B shape, bf16):
# the compiled static-cache path decodes 64 rows in 9.5 ms a step but compiles for ~30 s first; the continuous
# engine starts in under 2 s and decodes 8 rows in 15 ms, 64 rows in 42 ms (transformers' paged SDPA path).
# Compiling pays once the call has more decode steps than ~30 s / (42 - 9.5) ms.
GRAPHS_MIN_DECODE_STEPS = 1000
# Fewer batches than this: the plain `generate` path (one prompt, or one batch, stays quick).
MIN_BATCHES_FOR_FAST_PATH = 2
PAGE_SIZE = 64  # tokens per KV-cache page (transformers' default of 256 wastes a page per short sequence)
PREFILL_TOKENS = 2048  # tokens one continuous-batching step may take in (prompt chunks plus decoding rows)
POLL_S = 0.5
# transformers' compile level for the continuous engine's forward passes (0: none; CUDA graphs still replay
# the eager kernels).
COMPILE_LEVEL = 0


def choose(requested: str, *, device: torch.device, quantized: bool, sharded: bool, prompts: int,
           batch_size: int, max_new_tokens: int = 256, slots_refusal: str | None) -> str:
    """The engine a call runs on: the one asked for, or for "auto" the one that finishes it first (above).

    `slots_refusal` is `slots.supports(model)`: None when the slots engine can run the model."""
    if prompts == 0:
        return "generate"
    if requested == "slots" and slots_refusal is not None:
        raise InferenceError(f"the slots engine cannot run this model ({slots_refusal}): use --engine auto")
    if requested != "auto":
        return requested
    if device.type == "cuda" and not sharded and slots_refusal is None:
        return "slots"
    batches = math.ceil(prompts / batch_size)
    if device.type != "cuda" or quantized or sharded or batches < MIN_BATCHES_FOR_FAST_PATH:
        return "generate"
    return "graphs" if batches * max_new_tokens >= GRAPHS_MIN_DECODE_STEPS else "continuous"


def kv_cache_tokens(concurrency: int, longest_prompt: int, max_new_tokens: int) -> int:
    """Tokens the paged cache holds: every slot's longest possible sequence, rounded up to whole pages."""
    per_sequence = math.ceil((longest_prompt + max_new_tokens) / PAGE_SIZE) * PAGE_SIZE
    return concurrency * per_sequence


# ---- continuous batching ------------------------------------------------------------------------
def continuous(model: Any, encoded: Sequence[list[int]], generation_config: Any, *, concurrency: int,
               seed: int, stop_ids: Sequence[int], compile_level: int | None = None) -> Iterator[Finished]:
    """Yield each prompt's generated ids as it finishes (any order), through transformers' continuous batching."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    longest = max(len(ids) for ids in encoded)
    new = generation_config.max_new_tokens
    on_cuda = model.device.type == "cuda"
    config = _config(ContinuousBatchingConfig, page_size=PAGE_SIZE,
                     num_blocks=kv_cache_tokens(concurrency, longest, new) // PAGE_SIZE,
                     max_batch_tokens=max(PREFILL_TOKENS, concurrency), max_requests_per_batch=concurrency,
                     use_cuda_graph=on_cuda, allow_block_sharing=False, seed=seed, auto_switch_to_flash=False,
                     default_compile_level=COMPILE_LEVEL if compile_level is None else compile_level)
    manager = _started(model, generation_config, config, warm_up=on_cuda)
    try:
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: grouped by length
        for index in order:
            manager.add_request(list(encoded[index]), request_id=str(index), max_new_tokens=new,
                                record_timestamps=True, eos_token_id=list(stop_ids) or -1)
        yield from _results(manager, len(encoded))
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()


def _started(model: Any, generation_config: Any, config: Any, *, warm_up: bool) -> Any:
    """The manager, its CUDA graphs captured, its loop running. Built outside inference mode: the loop's thread
    updates these tensors in place and (transformers 5.17) does not run in inference mode itself."""
    with torch.inference_mode(False), torch.no_grad():
        manager = model.init_continuous_batching(generation_config=generation_config,
                                                 continuous_batching_config=config)
        if warm_up:
            manager.warmup()
        manager.start()
    return manager


def _config(config_class: Any, **wanted: Any) -> Any:
    """transformers' ContinuousBatchingConfig from the options this transformers has: `page_size` was
    `block_size` up to 5.16; `auto_switch_to_flash` (5.18+) is off already before it existed."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    if "page_size" not in fields:
        wanted["block_size"] = wanted.pop("page_size")
    return config_class(**{name: value for name, value in wanted.items() if name in fields})


def _results(manager: Any, count: int) -> Iterator[Finished]:
    done = 0
    while done < count:
        result = manager.get_result(timeout=POLL_S)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"continuous batching stopped after {done} of {count} prompts")
            continue
        if not result.is_finished():
            continue
        if result.error is not None:
            raise RuntimeError(f"continuous batching failed on prompt {result.request_id}: {result.error}")
        done += 1
        first = result.timestamps[0] if result.timestamps else None
        yield Finished(int(result.request_id), list(result.generated_tokens), first)


# ---- static cache, compiled decode --------------------------------------------------------------
def graphs(model: Any, encoded: Sequence[list[int]], *, batch_size: int, max_new_tokens: int,
           generate_batch: Callable[[list[list[int]], int, Any], list[list[int]]]) -> Iterator[Finished]:
    """Yield each prompt's generated ids batch by batch: prompts sorted by length, one static cache of one
    shape for the whole call (so the compiled decode step is captured once), `generate_batch(rows, width,
    cache)` running `generate` on the rows left-padded to `width`."""
    from transformers import StaticCache

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    longest = max(len(ids) for ids in encoded)
    width = math.ceil(longest / PAGE_SIZE) * PAGE_SIZE
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for first in range(0, len(order), batch_size):
        indices = order[first : first + batch_size]
        rows = [list(encoded[i]) for i in indices]
        rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape: one graph
        cache.reset()
        outputs = generate_batch(rows, width, cache)
        for index, ids in zip(indices, outputs):
            yield Finished(index, ids, None)
