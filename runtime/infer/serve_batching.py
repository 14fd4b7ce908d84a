"""Concurrent requests to one loaded model, answered in batches: what `llmplan serve` runs behind its HTTP API.

    batcher = Batcher(generator, max_batch=8)
    answer = batcher.answer("The capital of France is", settings)      # from any thread; blocks until done
    for piece in batcher.stream(dialog, settings): ...                  # text pieces, then a StreamEnd

One worker thread owns the model. It takes the first request waiting, then every other request that arrived
meanwhile (those that came while the previous batch ran), and runs them through the recipe's public calls
(`inference.complete` for text, `inference.chat` for dialogs, `inference.stream_report` for a stream: `stream`
and the call's report, as the Ray replicas use it): requests with
the same kind and settings go together, at most `max_batch` at a time (what the plan says fits). A batch that
fails is run again one request at a time, so that a bad prompt fails only its own request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llmplan.runtime.text.chat import PromptItem
from llmplan.runtime.infer.inference import (Completion, FinishReason, GenerationReport, GenerationSettings, Generator, chat, complete,
                        stream_report)

_STOP = object()


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream: the whole completion (why it ended, its token counts)."""

    completion: Completion

    @property
    def finish_reason(self) -> FinishReason:
        return self.completion.finish_reason


@dataclass
class ServeStats:
    requests: int = 0  # answered (or failed) requests
    batches: int = 0  # generation calls: a batch of requests, or one stream
    prompt_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0  # time spent generating

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.busy_seconds if self.busy_seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass
class _Request:
    prompt: PromptItem
    settings: GenerationSettings
    answer: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[bool, GenerationSettings]:
        return isinstance(self.prompt, str), self.settings


@dataclass
class _Stream:
    prompt: PromptItem
    settings: GenerationSettings
    pieces: queue.Queue = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)  # the client went away


class Batcher:
    def __init__(self, generator: Generator, max_batch: int) -> None:
        self.generator, self.max_batch = generator, max_batch
        self.inbox: queue.Queue = queue.Queue()
        self.stats = ServeStats()
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._loop, name="llmplan-serve-batcher", daemon=True)
        self.worker.start()

    # -- from request threads --
    def submit(self, prompt: PromptItem, settings: GenerationSettings) -> Future:
        """The request queued for the next batch; its future gives the `Completion` (or the recipe's error)."""
        request = _Request(prompt, replace(settings, batch_size=self.max_batch))
        self.inbox.put(request)
        return request.answer

    def answer(self, prompt: PromptItem, settings: GenerationSettings) -> Completion:
        return self.submit(prompt, settings).result()

    def stream(self, prompt: PromptItem, settings: GenerationSettings) -> Iterator[str | StreamEnd]:
        """Text pieces as they are generated, then a `StreamEnd`; the recipe's error is raised here. Closing the
        iterator early stops the generation."""
        request = _Stream(prompt, replace(settings, batch_size=1))
        self.inbox.put(request)
        try:
            while True:
                item = request.pieces.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    return
        finally:
            request.gone.set()

    def snapshot(self) -> ServeStats:
        with self.lock:
            return replace(self.stats)

    def close(self) -> None:
        self.inbox.put(_STOP)
        self.worker.join(timeout=60)

    # -- the worker --
    def _loop(self) -> None:
        while (first := self.inbox.get()) is not _STOP:
            waiting = [first]
            while True:
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in waiting
            for work in self._batches([item for item in waiting if item is not _STOP]):
                self._run(work)
            if stop:
                return

    def _batches(self, waiting: list[Any]) -> list[Any]:
        """Streams one by one; the other requests grouped by kind and settings (in order), max_batch at a time."""
        groups: dict[tuple[bool, GenerationSettings], list[_Request]] = {}
        streams = []
        for item in waiting:
            if isinstance(item, _Stream):
                streams.append(item)
            else:
                groups.setdefault(item.key, []).append(item)
        batches: list[Any] = [group[i:i + self.max_batch] for group in groups.values()
                              for i in range(0, len(group), self.max_batch)]
        return batches + streams

    def _run(self, work: Any) -> None:
        if isinstance(work, _Stream):
            self._run_stream(work)
        else:
            self._run_batch(work)

    def _run_batch(self, batch: list[_Request]) -> None:
        text, settings = batch[0].key
        started = time.perf_counter()
        try:
            report = (complete if text else chat)(self.generator, [request.prompt for request in batch], settings)
        except Exception as error:  # noqa: BLE001 - handed to the requests (one alone: its own error)
            self._count(started, 1 if len(batch) == 1 else 0, 0, 0)
            if len(batch) == 1:
                batch[0].answer.set_exception(error)
            else:
                for request in batch:
                    self._run_batch([request])
            return
        self._count(started, len(batch), report.prompt_tokens, report.generated_tokens)
        for request, completion in zip(batch, report.completions):
            request.answer.set_result(completion)

    def _run_stream(self, request: _Stream) -> None:
        started = time.perf_counter()
        try:
            pieces = stream_report(self.generator, request.prompt, request.settings)
            try:
                for piece in pieces:
                    if isinstance(piece, GenerationReport):
                        completion = piece.completions[0]
                    else:
                        request.pieces.put(piece)
                    if request.gone.is_set():
                        self._count(started, 1, 0, 0)
                        return
            finally:
                pieces.close()
        except Exception as error:  # noqa: BLE001 - raised in the request's thread
            self._count(started, 1, 0, 0)
            request.pieces.put(error)
            return
        self._count(started, 1, completion.prompt_tokens, completion.completion_tokens)
        request.pieces.put(StreamEnd(completion))

    def _count(self, started: float, requests: int, prompt_tokens: int, generated: int) -> None:
        with self.lock:
            self.stats.requests += requests
            self.stats.batches += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.generated_tokens += generated
            self.stats.busy_seconds += time.perf_counter() - started
