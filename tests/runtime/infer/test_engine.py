"""The fast engines (runtime.engine) on CPU: the same greedy tokens as `generate`, results as they finish."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmplan.runtime.infer import engine as engines  # noqa: E402
from llmplan.runtime.infer.inference import (  # noqa: E402
    GenerationReport,
    GenerationSettings,
    InferenceError,
    complete,
    respond_as_finished,
    setup,
)

from .test_inference import PROMPTS, save_tiny_llama  # noqa: E402

# Six prompts of different lengths through two slots: every slot is refilled at least twice.
MANY = PROMPTS + ["Hello world, hello tokenizer", "The capital of France is Paris. Once upon a time there"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    with setup(save_tiny_llama(tmp_path_factory.mktemp("tiny")), dtype="fp32", quant="none", device="cpu") as loaded:
        yield loaded


def ids(report) -> list[tuple[int, ...]]:
    return [completion.token_ids for completion in report]


@pytest.mark.parametrize("engine", ["continuous", "graphs"])
def test_a_fast_engine_gives_generates_greedy_tokens_in_prompt_order(tiny, engine: str) -> None:
    plain = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
    fast = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine=engine))
    assert fast.engine == engine and plain.engine == "generate"
    assert ids(fast) == ids(plain)
    assert [c.text for c in fast] == [c.text for c in plain]
    assert [c.prompt_tokens for c in fast] == [c.prompt_tokens for c in plain]
    assert len(set(ids(fast))) == len(MANY)  # the prompts lead somewhere different


def test_continuous_batching_stops_a_sequence_at_its_stop_token_and_refills_its_slot(tiny) -> None:
    """A stop token taken from the greedy output ends some sequences early; the others still run to the end."""
    plain = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
    stop = plain[1].token_ids[3]
    tiny.stop_token_ids, kept = frozenset({stop}), tiny.stop_token_ids
    try:
        expected = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
        fast = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="continuous"))
    finally:
        tiny.stop_token_ids = kept
    assert ids(fast) == ids(expected)
    assert fast[1].completion_tokens <= 4 and fast[1].finish_reason.value == "stop"


def test_completions_come_out_as_they_finish_then_the_report(tiny) -> None:
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, engine="continuous")
    items = list(respond_as_finished(tiny, MANY, settings))
    finished, report = items[:-1], items[-1]
    assert isinstance(report, GenerationReport) and report.engine == "continuous"
    assert sorted(index for index, _ in finished) == list(range(len(MANY)))
    assert report.generated_tokens == 6 * len(MANY)
    assert report.first_token_seconds is not None and 0 < report.first_token_seconds <= report.wall_seconds


def test_seeded_sampling_on_the_continuous_engine_repeats_and_other_seeds_differ(tiny) -> None:
    def sample(seed: int):
        return ids(complete(tiny, MANY[:3], GenerationSettings(max_new_tokens=8, temperature=1.0, seed=seed,
                                                                batch_size=2, engine="continuous")))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_auto_takes_a_fast_engine_only_on_cuda_for_enough_unquantized_work() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    common = {"quantized": False, "sharded": False, "batch_size": 64}
    assert engines.choose("auto", device=cuda, prompts=2048, **common) == "graphs"  # compiling pays
    assert engines.choose("auto", device=cuda, prompts=256, max_new_tokens=64, **common) == "continuous"
    assert engines.choose("auto", device=cuda, prompts=1, **common) == "generate"  # one prompt stays quick
    assert engines.choose("auto", device=cuda, prompts=64, **common) == "generate"  # one batch too
    assert engines.choose("auto", device=cpu, prompts=2048, **common) == "generate"  # CI has no GPU
    assert engines.choose("auto", device=cuda, prompts=2048, quantized=True, sharded=False, batch_size=64) == "generate"
    assert engines.choose("auto", device=cuda, prompts=2048, quantized=False, sharded=True, batch_size=64) == "generate"
    assert engines.choose("continuous", device=cpu, prompts=3, **common) == "continuous"
    assert engines.choose("continuous", device=cpu, prompts=0, **common) == "generate"


def test_the_kv_cache_is_sized_by_the_call_in_whole_pages() -> None:
    assert engines.kv_cache_tokens(8, 100, 256) == 8 * 384  # 356 tokens -> 6 pages of 64
    assert engines.kv_cache_tokens(64, 512, 256) == 64 * 768


def test_an_unknown_engine_is_refused() -> None:
    with pytest.raises(InferenceError, match="unknown engine 'vllm': use auto, generate, continuous, graphs"):
        GenerationSettings(engine="vllm")
