"""The "slots" engine: a fixed set of sequence slots decoded together, one step replayed as one CUDA graph.

What a decode step costs on a GPU is the host: an eager step of a 7B model launches some thousand kernels
(35-70 ms on an H200) while reading its weights takes about 3 ms. This engine removes that cost without a
compiler: the whole step (the model's forward on one new token per slot, the cache writes, the argmax) is
captured once as a CUDA graph on static buffers and replayed, which costs one launch.

- The KV cache is static: `slots` rows of `cache_len` positions per layer (the plan sizes it: slots x the
  longest prompt plus max_new_tokens), allocated once. Each slot holds one sequence at its own position:
  `write_at[slot]` is where its next key and value go, and the step's attention mask lets each slot see its
  own positions up to there (`SlotLayer`). Attention reads only the positions in use (one graph per length
  in use, in blocks of CACHE_ALIGN, captured when a call first reaches it).
- Continuous batching: a prompt waits until a slot is free; when a sequence stops (a stop token, or
  max_new_tokens), its slot is refilled with the next waiting prompt. New prompts are prefilled together
  (right-padded, an eager forward into a dynamic cache whose keys and values are then copied into their slots),
  longest first, so a refill pays one prefill for many slots: slots are refilled once a quarter of them is
  free, or when the waiting prompts all fit.
- On the CPU (and in CI) the same step runs eagerly: the engine is the same code, only not captured.

Models: decoder-only families whose attention is the plain full-attention path of transformers (Llama,
Mistral without a sliding window shorter than the cache, Qwen2, Qwen3), in 16 or 32 bits, on one device.
`supports` says so; `engine.choose` falls back to the other engines otherwise.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmplan.planner.request import SLOTS_CACHE_ALIGN as CACHE_ALIGN
from llmplan.planner.request import SLOTS_MODEL_TYPES
from llmplan.planner.request import SLOTS_PREFILL_TOKENS as PREFILL_TOKENS
from llmplan.planner.request import slots_cache_len, slots_compile_step

from . import slot_step
from .generation import Finished, GenerationSettings

# A kept decoder serves a call needing up to this many fewer slots (the rest idle): a server's batches vary in
# size, and an idle slot costs a 7B step on an H200 ~0.03 ms (the probe: 4.8 ms at 8 slots, 6.5 at 64), far
# less than capturing a decoder of its own.
IDLE_SLOTS_KEPT = 16
REFILL_SHARE = 4  # refill once 1/REFILL_SHARE of the slots are free (or the waiting prompts all fit)
WARMUP_STEPS = 2  # eager steps on a side stream before capture (cuBLAS and allocator warm-up)


def supports(model: Any) -> str | None:
    """None when the engine can run this model; otherwise why not (one line)."""
    config = _text_config(model)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return "quantized weights"
    if config.model_type not in SLOTS_MODEL_TYPES:
        return f"model type {config.model_type!r} (slots run {', '.join(sorted(SLOTS_MODEL_TYPES))})"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"attention layers of types {sorted(layer_types)}"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "a sliding attention window"
    return None


def cache_len(longest_prompt: int, max_new_tokens: int) -> int:
    """Positions one slot holds: its longest possible sequence, rounded up to CACHE_ALIGN (as the plan counts)."""
    return slots_cache_len(longest_prompt, max_new_tokens)


class Decoders:
    """The captured decoder of a loaded model, kept between calls: a later call that needs as many slots or up to
    IDLE_SLOTS_KEPT fewer, and a cache length it holds (a server's next batch, the next file of prompts), reuses
    its cache and graphs instead of capturing again (a longer cache costs memory, not time: steps read the
    positions in use). One at a time: a call of another shape replaces it (and frees its cache)."""

    def __init__(self) -> None:
        self._kept: _Decoder | None = None

    def get(self, model: Any, slots: int, length: int, compile_step: bool = False) -> _Decoder:
        """A decoder of `slots` slots holding `length` positions each, its step compiled when the call is long
        enough to pay for it (`default_step`); a kept compiled one is always reused."""
        kept = self._kept
        base = _base_model(model)
        step = default_step(base, base.device, compile_step)
        if (kept is None or kept.model is not model or not 0 <= kept.slots - slots <= IDLE_SLOTS_KEPT
                or kept.length < length or kept.step_kind not in (step, "compiled")):
            self._kept = None  # free the old cache before allocating the new one
            kept = self._kept = _Decoder(model, slots=slots, length=length, step=step)
        return kept

    @property
    def current(self) -> _Decoder | None:
        return self._kept

    def clear(self) -> None:
        self._kept = None


def generate(model: Any, encoded: Sequence[list[int]], settings: GenerationSettings, *, stop_ids: Sequence[int],
             decoders: Decoders) -> Iterator[Finished]:
    """Yield each prompt's generated ids (stop token included) as it finishes, in any order."""
    if not encoded:
        return
    slot_count = min(settings.batch_size, len(encoded))
    decoder = decoders.get(model, slots=slot_count,
                           length=cache_len(max(len(ids) for ids in encoded), settings.max_new_tokens),
                           compile_step=slots_compile_step(len(encoded), slot_count, settings.max_new_tokens))
    decoder.reset()
    sampler = None if settings.greedy else _Sampler(settings, decoder.device)
    yield from _Schedule(decoder, slot_count, sampler, encoded, settings, frozenset(stop_ids)).run()


# ---- the cache ----------------------------------------------------------------------------------
def _slot_layer_class() -> type:
    """transformers' StaticLayer, writing each row at its own position (imported late: transformers is heavy)."""
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        """Keys and values of one layer for every slot; a decode step writes row r at `write_at[r]`."""

        def __init__(self, max_cache_len: int, write_at: torch.Tensor) -> None:
            super().__init__(max_cache_len=max_cache_len)
            self.write_at = write_at
            self.rows = torch.arange(write_at.shape[0], device=write_at.device)
            self.visible = max_cache_len  # positions attention reads: those in use, in whole blocks

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys[self.rows, :, self.write_at] = key_states[:, :, -1]
            self.values[self.rows, :, self.write_at] = value_states[:, :, -1]
            return self.keys[:, :, : self.visible], self.values[:, :, : self.visible]

    return SlotLayer


def _slot_cache(model: Any, slots: int, length: int, write_at: torch.Tensor) -> Any:
    from transformers.cache_utils import Cache

    config = _text_config(model)
    shape = slot_step.step_shape(config)
    layer_class = _slot_layer_class()
    proto = torch.zeros(slots, shape.kv_heads, 1, shape.head_dim, dtype=model.dtype, device=write_at.device)
    layers = []
    for _ in range(config.num_hidden_layers):
        layer = layer_class(length, write_at)
        layer.lazy_initialization(proto, proto)
        layers.append(layer)
    return Cache(layers=layers)


def _cache_keyword(model: Any) -> str:
    """The forward's name for the cache: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model: Any) -> Any:
    return model.config.get_text_config()


STEP_KINDS = ("transformers", "fused", "compiled", "liger")  # what `default_step` picks from (the probe's --steps)


def default_step(base: Any, device: torch.device, compile_step: bool) -> str:
    """The written-out step with fused projections where it runs the model (slot_step.supports); on CUDA compiled
    for a long call (`slots_compile_step`), on Liger's kernels otherwise; transformers' forward for anything else
    (a model with adapters: LoRA layers stay as they are)."""
    if slot_step.supports(base) is not None:
        return "transformers"
    if device.type != "cuda":
        return "fused"
    if compile_step:
        return "compiled"
    return "liger" if importlib.util.find_spec("liger_kernel") is not None else "fused"


def _step_kernels(kind: str) -> slot_step.StepKernels | None:
    if kind == "compiled":
        return slot_step.compiled_kernels()
    if kind == "liger":
        return slot_step.liger_kernels()
    return None if kind == "transformers" else slot_step.EAGER


# ---- one decode step, captured ------------------------------------------------------------------
@dataclass(frozen=True)
class _Captured:
    replay: Any
    logits: torch.Tensor


class _Decoder:
    """The static buffers, the slot cache and the captured steps; `prefill` loads prompts into slots.

    A step's attention reads only the cache positions in use, `visible` (the furthest slot's, rounded up to
    CACHE_ALIGN): reading the whole static cache every step cost as much as the weights at 64 slots and three
    times as much at 256 (benchmarks/results/slots-probe-h200.jsonl). Each `visible` is its own graph, captured
    the first time a call reaches it, in one memory pool."""

    def __init__(self, model: Any, *, slots: int, length: int, step: str | None = None) -> None:
        self.model = model
        self.base = _base_model(model)
        self.device = self.base.device
        self.step_kind = step or default_step(self.base, self.device, compile_step=False)
        self.fused = None if self.step_kind == "transformers" else slot_step.fuse_projections(self.base)
        self.kernels = _step_kernels(self.step_kind)
        self.slots = slots
        self.length = length
        self.write_at = torch.full((slots,), length - 1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.next = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.arange(length, device=self.device)
        self.cache = _slot_cache(self.base, slots, length, self.write_at)
        self.caches = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.rows = self.cache.layers[0].rows
        self.cache_kwarg = _cache_keyword(self.base)
        self.logits: torch.Tensor | None = None
        self.graphs: dict[int, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def visible(self, furthest_position: int) -> int:
        """Cache positions a step reads when the furthest slot writes at `furthest_position`."""
        return min(self.length, math.ceil((furthest_position + 1) / CACHE_ALIGN) * CACHE_ALIGN)

    def step(self, visible: int) -> None:
        """One decode step of every slot, attention over the first `visible` positions (replayed on CUDA)."""
        for layer in self.cache.layers:
            layer.visible = visible
        if self.pool is None:
            self._step(visible)
            return
        captured = self.graphs.get(visible) or self._capture(visible)
        captured.replay()
        self.logits = captured.logits

    def _step(self, visible: int) -> None:
        mask = (self.positions[None, :visible] <= self.write_at[:, None])[:, None, None, :]
        if self.fused is not None:
            self.logits = slot_step.logits_step(self.fused, self.kernels, self.tokens, self.caches, self.rows,
                                                self.write_at, mask, visible)
        else:
            out = self.model(input_ids=self.tokens[:, None], position_ids=self.write_at[:, None],
                             attention_mask=mask, use_cache=True, **{self.cache_kwarg: self.cache})
            self.logits = out.logits[:, -1]
        self.next.copy_(self.logits.argmax(dim=-1))
        self.write_at.add_(1).clamp_(max=self.length - 1)

    def _capture(self, visible: int) -> _Captured:
        """Capture the step at `visible`, mid-call: the warm-up steps write what the real step will write (the
        same tokens' keys at the same positions, and noise beyond them that no mask lets through), and
        `write_at`, which they advance, is put back."""
        saved = self.write_at.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS if not self.graphs else 1):
                self._step(visible)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(visible)
        self.write_at.copy_(saved)
        self.graphs[visible] = _Captured(graph.replay, self.logits)
        return self.graphs[visible]

    def reset(self) -> None:
        """Every slot free (what a free slot computes is never read)."""
        self.write_at.fill_(self.length - 1)

    def advance(self, sampler: _Sampler | None, furthest_position: int) -> list[int]:
        """One decode step for every slot: the next token of each (greedy without a sampler)."""
        self.step(self.visible(furthest_position))
        chosen = self.next if sampler is None else sampler.sample(self.logits)
        self.tokens.copy_(chosen)
        return chosen.tolist()

    def prefill(self, slots: list[int], prompts: list[list[int]], sampler: _Sampler | None) -> list[int]:
        """Run the prompts, put their keys and values into `slots`, and return each one's first new token."""
        from transformers import DynamicCache

        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        scratch = DynamicCache(config=self.base.config)
        hidden = self.base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=self.positions[None, :width],
                                        use_cache=True, **{self.cache_kwarg: scratch}).last_hidden_state
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        logits = self.base.get_output_embeddings()(last)
        rows = torch.tensor(slots, device=self.device)
        for target, source in zip(self.cache.layers, scratch.layers):
            target.keys[rows, :, :width] = source.keys
            target.values[rows, :, :width] = source.values
        first = logits.argmax(dim=-1) if sampler is None else sampler.sample(logits)
        self.tokens[rows] = first
        self.write_at[rows] = lengths
        return first.tolist()


class _Sampler:
    """Temperature and nucleus (top-p) sampling from a generator seeded by the call."""

    def __init__(self, settings: GenerationSettings, device: torch.device) -> None:
        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(settings.seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.settings.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


# ---- the schedule: which prompt is in which slot -------------------------------------------------
@dataclass
class _Sequence:
    index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def write_position(self) -> int:
        """Where the next step writes this sequence's newest token."""
        return self.prompt_tokens + len(self.token_ids) - 1


class _Schedule:
    """Which prompt is in which of the call's `slots` (the first ones of the decoder's: a kept decoder may have
    more, which stay idle)."""

    def __init__(self, decoder: _Decoder, slots: int, sampler: _Sampler | None, encoded: Sequence[list[int]],
                 settings: GenerationSettings, stop_ids: frozenset[int]) -> None:
        self.decoder = decoder
        self.slots = slots
        self.sampler = sampler
        self.encoded = encoded
        self.max_new_tokens = settings.max_new_tokens
        self.stop_ids = stop_ids
        # Longest first: prompts of one refill have similar lengths, so little padding in their prefill.
        self.waiting = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        self.running: dict[int, _Sequence] = {}  # slot -> its sequence

    def run(self) -> Iterator[Finished]:
        while self.waiting or self.running:
            if self._should_refill():
                yield from self._refill()
            if self.running:
                yield from self._decode()

    def _free_slots(self) -> list[int]:
        return [slot for slot in range(self.slots) if slot not in self.running]

    def _should_refill(self) -> bool:
        free = len(self._free_slots())
        if not self.waiting or free == 0:
            return False
        return not self.running or free >= self.slots / REFILL_SHARE or len(self.waiting) <= free

    def _refill(self) -> Iterator[Finished]:
        free = self._free_slots()
        taken = [self.waiting.pop(0) for _ in range(min(len(free), len(self.waiting)))]
        for group in _prefill_groups(taken, self.encoded):
            slots = free[: len(group)]
            free = free[len(group) :]
            first = self.decoder.prefill(slots, [list(self.encoded[i]) for i in group], self.sampler)
            now = time.perf_counter()
            for slot, index, token in zip(slots, group, first):
                self.running[slot] = _Sequence(index, len(self.encoded[index]), [token], now)
                yield from self._finish_if_done(slot)

    def _decode(self) -> Iterator[Finished]:
        furthest = max(sequence.write_position for sequence in self.running.values())
        chosen = self.decoder.advance(self.sampler, furthest)
        for slot in list(self.running):
            self.running[slot].token_ids.append(chosen[slot])
            yield from self._finish_if_done(slot)

    def _finish_if_done(self, slot: int) -> Iterator[Finished]:
        sequence = self.running[slot]
        if sequence.token_ids[-1] in self.stop_ids or len(sequence.token_ids) >= self.max_new_tokens:
            del self.running[slot]
            yield Finished(sequence.index, sequence.token_ids, sequence.first_token_at)


def _prefill_groups(indices: list[int], encoded: Sequence[list[int]]) -> Iterator[list[int]]:
    """The prompts in consecutive groups whose padded size (count x longest) stays within PREFILL_TOKENS."""
    group: list[int] = []
    for index in indices:
        widest = max([len(encoded[i]) for i in group] + [len(encoded[index])])
        if group and widest * (len(group) + 1) > PREFILL_TOKENS:
            yield group
            group = []
        group.append(index)
    if group:
        yield group
