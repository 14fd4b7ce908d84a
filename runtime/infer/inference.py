"""Text generation on one device: the inference recipe below the Ray layer.

    generator = setup("path/to/hf-model", dtype="bf16", quant="none", device="cuda")
    report = complete(generator, ["The capital of France is"], GenerationSettings(max_new_tokens=32))
    report[0].text, report.tokens_per_second, report.peak_reserved_bytes
    cleanup(generator)

`setup` loads the tokenizer (left padding, a pad token) and the model with the runtime's defaults
(`runtime.modeling.load_pretrained`: SDPA attention, bitsandbytes int8 / nf4, the expandable-segment
allocator on CUDA), plus an optional PEFT adapter. `complete` and `chat` run prompts on the engine
`runtime.infer.engine.choose` picks: on CUDA the slots engine (`runtime.infer.slots`: continuous batching, the
decode step replayed as a CUDA graph) with `batch_size` as its number of slots, elsewhere batches of
`batch_size` through `model.generate`;
`respond_as_finished` yields each completion as it finishes; `stream` yields one prompt's text as it is
generated.

`GenerationSettings` is the whole decoding policy: the checkpoint's `generation_config.json` sampling
defaults (temperature, top-k, repetition penalty, ...) are dropped at setup, only its stop tokens are kept,
so the same settings decode the same way on every model. Sampling is seeded per call from
`settings.seed` inside `torch.random.fork_rng`, so it neither reads nor disturbs the global RNG.

Ray-free on purpose: the Ray actors call these functions, and so can a benchmark on a GPU machine.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import engine as engines
from . import slots
from llmplan.runtime.text.chat import Dialog, DialogError, Message, PromptItem, format_chat
from llmplan.runtime.infer.generation import (Completion, Finished, FinishReason, GenerationReport, GenerationSettings,
                                              InferenceError)
from llmplan.runtime.models.modeling import (apply_liger_layer_kernels, configure_allocator, inference_kernels_that_run,
                                            liger_installed, load_pretrained)

DTYPES = ("bf16", "fp16", "fp32")
QUANTS = ("none", "int8", "nf4")
# Decoding turns generated ids into text the same way in `complete` and in `stream`.
DECODE_KWARGS = {"skip_special_tokens": True}


@dataclass(eq=False)
class Generator:
    """A loaded model and tokenizer: a handle on memory, released by `cleanup` (or leaving a `with` block)."""

    model: Any
    tokenizer: Any
    device: torch.device
    stop_token_ids: frozenset[int]
    context_length: int | None  # the model's max_position_embeddings
    decoders: slots.Decoders = field(default_factory=slots.Decoders)  # the slots engine's captured decoder

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        cleanup(self)

    @property
    def closed(self) -> bool:
        return self.model is None


# ---- setup --------------------------------------------------------------------------------------
def setup(
    model_dir: str | Path,
    *,
    dtype: str = "bf16",
    quant: str = "none",
    device: str = "cuda",
    adapter: str | Path | None = None,
) -> Generator:
    """Load a Hugging Face model directory (and optionally a PEFT adapter directory) for generation."""
    model_dir = _checked_dir(model_dir, "config.json", "a Hugging Face model directory")
    adapter_dir = _checked_dir(adapter, "adapter_config.json", "a PEFT adapter directory") if adapter else None
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("quant", quant, QUANTS)
    sharded = device == "auto"  # every GPU the process sees (HF device_map="auto")
    if sharded or torch.device(device).type == "cuda":
        configure_allocator()  # before the first CUDA allocation, or it has no effect
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(str(model_dir), dtype, quant, device)
    torch_device = model.device if sharded else torch.device(device)  # sharded: where the embeddings are
    capability = torch.cuda.get_device_capability(torch_device) if torch_device.type == "cuda" else None
    if inference_kernels_that_run(model.config.model_type, torch_device.type, quant, capability,
                                  liger_installed()) == "liger":
        apply_liger_layer_kernels(model)
    stop_ids = stop_token_ids(model, tokenizer)
    model.generation_config = _plain_generation_config(tokenizer, stop_ids)  # on the base: PEFT generates with it
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    model.eval()
    return Generator(model, tokenizer, torch_device, stop_ids, context)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's tokenizer, padding on the left (generation continues at the right end of every row)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InferenceError(f"{model_dir}: the tokenizer has neither a pad nor an EOS token: add one to it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """A PEFT adapter on top of the loaded base model (not merged: it works on quantized bases too)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The checkpoint's EOS ids (generation_config.json may list several, e.g. Llama-3) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _plain_generation_config(tokenizer: Any, stop_ids: frozenset[int]) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=tokenizer.pad_token_id,
    )


def _checked_dir(path: str | Path, marker: str, what: str) -> Path:
    path = Path(path)
    if not (path / marker).is_file():
        raise InferenceError(f"{path} is not {what} (no {marker} in it): pass the directory that holds {marker}")
    return path


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InferenceError(f"unknown {name} {value!r}: use {', '.join(choices)}")


# ---- run ----------------------------------------------------------------------------------------
def complete(generator: Generator, prompts: Sequence[str], settings: GenerationSettings) -> GenerationReport:
    """Continue each text prompt (the tokenizer adds its BOS, as in training)."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InferenceError(f"prompt {i} is {type(prompt).__name__}, not text: use chat() for dialogs")
    return _generate(generator, [_encode(generator, p, special=True) for p in prompts], settings)


def chat(
    generator: Generator, dialogs: Sequence[Sequence[Message | Mapping[str, Any]]], settings: GenerationSettings
) -> GenerationReport:
    """Answer each dialog: formatted by `format_chat` (the chat template, or Llama-2's format)."""
    return _generate(generator, _encode_all(generator, dialogs, _encode_dialog), settings)


def respond(generator: Generator, items: Sequence[PromptItem], settings: GenerationSettings) -> GenerationReport:
    """A mix of text prompts and dialogs (what `chat.load_prompts` reads), answered in their order."""
    return _generate(generator, _encode_all(generator, items, _encode_item), settings)


def respond_as_finished(generator: Generator, items: Sequence[PromptItem],
                        settings: GenerationSettings) -> Iterator[tuple[int, Completion] | GenerationReport]:
    """`respond`, yielding `(index, completion)` as each prompt finishes (in any order), then the report."""
    encoded = _encode_all(generator, items, _encode_item)
    _check_open(generator)
    _check_context(generator, encoded, settings)
    return _finished(generator, encoded, settings)


def stream(generator: Generator, prompt: PromptItem, settings: GenerationSettings) -> Iterator[str]:
    """Yield the text of one prompt (or dialog) piece by piece as it is generated.

    The pieces join to exactly `complete(...)[0].text` for the same settings: `generate` runs in a thread
    and hands each new token over a queue; the text is decoded here the way `complete` decodes it.
    Closing the iterator early stops the generation after the current token.
    """
    ids = _encode_item(generator, prompt)
    _check_context(generator, [ids], settings)
    return _stream(generator, ids, settings)


def stream_report(generator: Generator, prompt: PromptItem, settings: GenerationSettings) -> Iterator[str | GenerationReport]:
    """`stream`, then one last item: the `GenerationReport` of the whole call (token counts, time, memory)."""
    ids = _encode_item(generator, prompt)
    _check_context(generator, [ids], settings)
    reset_peak_memory(generator)
    start = time.perf_counter()
    new_ids: list[int] = []
    yield from _stream(generator, ids, settings, new_ids)
    peak = peak_memory(generator)
    yield GenerationReport((_completion(generator, new_ids, len(ids)),), time.perf_counter() - start, peak)


def gpus_of(generator: Generator) -> list[torch.device]:
    """The GPUs the model's weights are on: one, or each shard's (device_map="auto")."""
    placed = getattr(generator.model, "hf_device_map", None) or {}
    found = {torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in placed.values()
             if isinstance(d, int) or str(d).startswith("cuda")}
    found.add(generator.device)
    return sorted((d for d in found if d.type == "cuda"), key=lambda d: d.index or 0)


def reset_peak_memory(generator: Generator) -> None:
    for gpu in gpus_of(generator):
        torch.cuda.reset_peak_memory_stats(gpu)


def peak_memory(generator: Generator) -> int | None:
    """The largest torch.cuda.max_memory_reserved over the model's GPUs (the plan's per-GPU figure); None off CUDA."""
    peaks = [torch.cuda.max_memory_reserved(gpu) for gpu in gpus_of(generator)]
    return max(peaks) if peaks else None


# ---- cleanup ------------------------------------------------------------------------------------
def cleanup(generator: Generator) -> None:
    """Drop the model and tokenizer and give the memory back (the CUDA cache too)."""
    generator.decoders.clear()
    generator.model = None
    generator.tokenizer = None
    gc.collect()
    if generator.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- encoding -----------------------------------------------------------------------------------
def _encode(generator: Generator, text: str, *, special: bool) -> list[int]:
    _check_open(generator)
    return generator.tokenizer(text, add_special_tokens=special)["input_ids"]


def _encode_all(generator: Generator, items: Sequence[Any], encode: Any) -> list[list[int]]:
    """Encode every item; a dialog that cannot be formatted is named by its index."""
    encoded = []
    for i, item in enumerate(items):
        try:
            encoded.append(encode(generator, item))
        except DialogError as error:
            raise DialogError(f"dialog {i}: {error}") from None
    return encoded


def _encode_dialog(generator: Generator, dialog: Sequence[Message | Mapping[str, Any]]) -> list[int]:
    # The chat template (or the Llama-2 format) writes every special token itself.
    _check_open(generator)
    return _encode(generator, format_chat(generator.tokenizer, dialog), special=False)


def _encode_item(generator: Generator, item: PromptItem | Dialog) -> list[int]:
    if isinstance(item, str):
        return _encode(generator, item, special=True)
    return _encode_dialog(generator, item)


def _check_open(generator: Generator) -> None:
    if generator.closed:
        raise InferenceError("this generator was cleaned up: call setup() again to load the model")


def _check_context(generator: Generator, encoded: Sequence[list[int]], settings: GenerationSettings) -> None:
    for i, ids in enumerate(encoded):
        if not ids:
            raise InferenceError(f"prompt {i} has no tokens: give non-empty text")
        if generator.context_length and len(ids) + settings.max_new_tokens > generator.context_length:
            raise InferenceError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens {settings.max_new_tokens} it exceeds the "
                f"model's context of {generator.context_length} tokens: shorten the prompt or lower max_new_tokens"
            )


# ---- generation ---------------------------------------------------------------------------------
def _generate(generator: Generator, encoded: list[list[int]], settings: GenerationSettings) -> GenerationReport:
    _check_open(generator)
    _check_context(generator, encoded, settings)
    by_index: dict[int, Completion] = {}
    for item in _finished(generator, encoded, settings):
        if isinstance(item, GenerationReport):
            return dataclasses.replace(item, completions=tuple(by_index[i] for i in range(len(encoded))))
        by_index[item[0]] = item[1]
    raise AssertionError("_finished ends with its report")


def _finished(generator: Generator, encoded: list[list[int]],
              settings: GenerationSettings) -> Iterator[tuple[int, Completion] | GenerationReport]:
    """Run the call on the engine `choose` picks: `(index, completion)` as each prompt finishes, then the
    report (its completions in the order they finished)."""
    engine = engines.choose(settings.engine, device=generator.device, quantized=_quantized(generator.model),
                            sharded=len(gpus_of(generator)) > 1, prompts=len(encoded),
                            batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                            slots_refusal=slots.supports(generator.model))
    reset_peak_memory(generator)
    start = time.perf_counter()
    first_token: list[float] = []
    done: list[Completion] = []
    with _seeded(settings.seed, generator.device), torch.inference_mode(), _quiet_int8_casts():
        for finished in _run_engine(engine, generator, encoded, settings, first_token):
            completion = _completion(generator, finished.token_ids, len(encoded[finished.index]))
            first_token.append(finished.first_token_at or time.perf_counter())
            done.append(completion)
            yield finished.index, completion
    wall = time.perf_counter() - start
    ttft = min(first_token) - start if first_token else None
    yield GenerationReport(tuple(done), wall, peak_memory(generator), ttft, engine)


def _run_engine(engine: str, generator: Generator, encoded: list[list[int]], settings: GenerationSettings,
                first_token: list[float]) -> Iterator[Finished]:
    if engine == "slots":
        return slots.generate(generator.model, encoded, settings, stop_ids=sorted(generator.stop_token_ids),
                              decoders=generator.decoders)
    if engine == "continuous":
        config = _generation_config(generator, settings)
        return engines.continuous(generator.model, encoded, config, concurrency=settings.batch_size,
                                  seed=settings.seed, stop_ids=sorted(generator.stop_token_ids))
    if engine == "graphs":
        run = lambda rows, width, cache: _generate_rows(generator, rows, settings, width=width, cache=cache)  # noqa: E731
        return engines.graphs(generator.model, encoded, batch_size=settings.batch_size,
                              max_new_tokens=settings.max_new_tokens, generate_batch=run)
    return _batches(generator, encoded, settings, first_token)


def _batches(generator: Generator, encoded: list[list[int]], settings: GenerationSettings,
             first_token: list[float]) -> Iterator[Finished]:
    """The plain path: `generate` on batches of `batch_size` prompts in their order."""
    for first in range(0, len(encoded), settings.batch_size):
        rows = encoded[first : first + settings.batch_size]
        timer = _FirstToken() if first == 0 else None
        outputs = _generate_rows(generator, rows, settings, streamer=timer)
        for offset, ids in enumerate(outputs):
            yield Finished(first + offset, ids, timer.at if timer else None)


def _generate_rows(generator: Generator, rows: list[list[int]], settings: GenerationSettings, *,
                   width: int | None = None, cache: Any = None, streamer: Any = None) -> list[list[int]]:
    """`generate` on rows left-padded to `width` (default: the longest): the new ids of every row."""
    input_ids, attention_mask = _left_padded(rows, generator.tokenizer.pad_token_id, generator.device, width)
    extra = {"past_key_values": cache} if cache is not None else {}
    output = generator.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                      **extra, **_generation_kwargs(settings))
    return output[:, input_ids.shape[1] :].tolist()


def _quantized(model: Any) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)


def _generation_config(generator: Generator, settings: GenerationSettings) -> Any:
    """The model's plain generation config (stop tokens, pad) with the call's decoding policy."""
    config = copy.deepcopy(generator.model.generation_config)
    config.update(**_generation_kwargs(settings))
    return config


def _left_padded(batch: list[list[int]], pad_id: int, device: torch.device,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(ids) for ids in batch] + [width or 0])
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    return input_ids, mask


def _generation_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    if settings.greedy:
        return {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
    # top_k=0 turns off transformers' default top-k of 50: sampling is temperature and top-p only.
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": True,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": 0,
    }


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block and restore the previous state after it."""
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


class _Int8CastFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@contextmanager
def _quiet_int8_casts() -> Iterator[None]:
    """bitsandbytes logs a warning in every int8 layer's forward when the input is not fp16 (once per layer
    per token); LLM.int8 always quantizes its input from fp16, which is expected, not a problem to report."""
    logger, quiet = logging.getLogger("bitsandbytes.autograd._functions"), _Int8CastFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _completion(generator: Generator, new_ids: list[int], prompt_tokens: int) -> Completion:
    """Cut the generated ids after the first stop token (later ones are padding) and decode them."""
    stop = next((i for i, t in enumerate(new_ids) if t in generator.stop_token_ids), None)
    if stop is None:
        return Completion(_decode(generator, new_ids), tuple(new_ids), prompt_tokens, FinishReason.LENGTH)
    kept = new_ids[: stop + 1]
    return Completion(_decode(generator, kept[:-1]), tuple(kept), prompt_tokens, FinishReason.STOP)


def _decode(generator: Generator, ids: list[int]) -> str:
    return generator.tokenizer.decode(ids, **DECODE_KWARGS)


# ---- streaming ----------------------------------------------------------------------------------
_END = object()


def _stream(generator: Generator, ids: list[int], settings: GenerationSettings,
            new_ids: list[int] | None = None) -> Iterator[str]:
    """Yield text pieces; `new_ids`, when given, receives the generated ids."""
    tokens: queue.Queue = queue.Queue()
    cancel = threading.Event()
    worker = threading.Thread(
        target=_stream_worker, args=(generator, ids, settings, tokens, cancel), daemon=True, name="llmplan-generate"
    )
    worker.start()
    try:
        yield from _stream_text(generator, tokens, [] if new_ids is None else new_ids)
    finally:
        cancel.set()
        worker.join()


def _stream_worker(
    generator: Generator, ids: list[int], settings: GenerationSettings, tokens: queue.Queue, cancel: threading.Event
) -> None:
    """Run `generate` for one prompt, putting each new token (then _END, or the error) on `tokens`."""
    try:
        input_ids, attention_mask = _left_padded([ids], generator.tokenizer.pad_token_id, generator.device)
        with _seeded(settings.seed, generator.device), torch.inference_mode(), _quiet_int8_casts():
            generator.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                streamer=_TokenQueue(tokens),
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                **_generation_kwargs(settings),
            )
    except BaseException as error:  # handed to the consumer, which re-raises it
        tokens.put(error)
    tokens.put(_END)


def _stream_text(generator: Generator, tokens: queue.Queue, new_ids: list[int]) -> Iterator[str]:
    """Decode the tokens so far after each new one and yield the text not yet yielded.

    A piece is held back while the text ends in an incomplete UTF-8 character (U+FFFD) or does not extend
    what was already yielded, so the pieces join to the final text.
    """
    emitted = ""
    while (item := tokens.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        if new_ids and new_ids[-1] in generator.stop_token_ids:
            continue  # nothing after a stop token is part of the answer
        new_ids.extend(item)
        text = _completion(generator, new_ids, 0).text
        if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = _completion(generator, new_ids, 0).text
    if len(text) > len(emitted):
        yield text[len(emitted) :]


class _FirstToken(BaseStreamer):
    """A `generate` streamer that notes when the first new token came (the prompt is put first)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class _TokenQueue(BaseStreamer):
    """A `generate` streamer (transformers' BaseStreamer protocol): the prompt first, then each new token."""

    def __init__(self, tokens: queue.Queue) -> None:
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the worker puts _END once generate has returned


class _Cancelled(StoppingCriteria):
    """A stopping criterion that ends generation once the stream's consumer has gone away."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)
