"""What a generation call takes and gives back: its settings, completions and report, and its error.

Light on purpose (no torch, no transformers): the command that submits the work (`llmplan generate`, `chat`) builds
the settings and reads the completions without paying seconds for the stack that generates them, which only the
Ray actors import (`runtime.inference`, which re-exports these names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from llmplan.planner.request import Engine


ENGINES = tuple(engine.value for engine in Engine)  # runtime.infer.engine: which one runs a call


class InferenceError(ValueError):
    """A request the runtime cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0  # nucleus sampling (only when temperature > 0)
    seed: int = 0
    batch_size: int = 8  # prompts decoded together: a batch of `generate`, the fast engines' concurrency
    engine: str = "auto"  # engine.ENGINES: "auto" takes the fast engine on CUDA where it pays

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InferenceError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size <= 0:
            raise InferenceError(f"batch_size must be positive, got {self.batch_size}")
        if self.engine not in ENGINES:
            raise InferenceError(f"unknown engine {self.engine!r}: use {', '.join(ENGINES)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Finished:
    """One prompt's result as an engine finishes it: its index in the call and its generated ids."""

    index: int
    token_ids: list[int]
    first_token_at: float | None  # perf_counter time of its first generated token, when known


class FinishReason(str, Enum):
    STOP = "stop"  # the model produced a stop token (EOS)
    LENGTH = "length"  # max_new_tokens ran out


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text, without the prompt and the stop token
    token_ids: tuple[int, ...]  # the generated ids, the stop token included
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class GenerationReport(Sequence[Completion]):
    """The completions, in the order of the prompts, and what generating them took."""

    completions: tuple[Completion, ...]
    wall_seconds: float
    peak_reserved_bytes: int | None  # torch.cuda.max_memory_reserved during the call; None off CUDA
    first_token_seconds: float | None = None  # from the call's start to its first generated token
    engine: str = "generate"  # the engine that ran the call

    def __getitem__(self, index):  # type: ignore[override]
        return self.completions[index]

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def generated_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.completions)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the wall time of the whole call (prefill included)."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "prompts": len(self.completions),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "first_token_seconds": self.first_token_seconds,
            "engine": self.engine,
        }
