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


@pytest.mark.parametrize("engine,batch_size", [("slots", 2), ("slots", 3), ("slots", 8), ("continuous", 2),
                                               ("graphs", 2)])
def test_a_fast_engine_gives_generates_greedy_tokens_in_prompt_order(tiny, engine: str, batch_size: int) -> None:
    """Slots: 2 and 3 slots are refilled (one at a time, and several prompts together); 8 hold every prompt."""
    plain = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
    fast = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=batch_size, engine=engine))
    assert fast.engine == engine and plain.engine == "generate"
    assert ids(fast) == ids(plain)
    assert [c.text for c in fast] == [c.text for c in plain]
    assert [c.prompt_tokens for c in fast] == [c.prompt_tokens for c in plain]
    assert len(set(ids(fast))) == len(MANY)  # the prompts lead somewhere different


@pytest.mark.parametrize("engine", ["slots", "continuous"])
def test_continuous_batching_stops_a_sequence_at_its_stop_token_and_refills_its_slot(tiny, engine: str) -> None:
    """A stop token taken from the greedy output ends some sequences early; the others still run to the end."""
    plain = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
    stop = plain[1].token_ids[3]
    tiny.stop_token_ids, kept = frozenset({stop}), tiny.stop_token_ids
    try:
        expected = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine="generate"))
        fast = complete(tiny, MANY, GenerationSettings(max_new_tokens=12, batch_size=2, engine=engine))
    finally:
        tiny.stop_token_ids = kept
    assert ids(fast) == ids(expected)
    assert fast[1].completion_tokens <= 4 and fast[1].finish_reason.value == "stop"


@pytest.mark.parametrize("engine", ["slots", "continuous"])
def test_completions_come_out_as_they_finish_then_the_report(tiny, engine: str) -> None:
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, engine=engine)
    items = list(respond_as_finished(tiny, MANY, settings))
    finished, report = items[:-1], items[-1]
    assert isinstance(report, GenerationReport) and report.engine == engine
    assert sorted(index for index, _ in finished) == list(range(len(MANY)))
    assert report.generated_tokens == 6 * len(MANY)
    assert report.first_token_seconds is not None and 0 < report.first_token_seconds <= report.wall_seconds


@pytest.mark.parametrize("engine", ["slots", "continuous"])
def test_seeded_sampling_on_a_fast_engine_repeats_and_other_seeds_differ(tiny, engine: str) -> None:
    def sample(seed: int, top_p: float = 1.0):
        return ids(complete(tiny, MANY[:3], GenerationSettings(max_new_tokens=8, temperature=1.0, seed=seed,
                                                                top_p=top_p, batch_size=2, engine=engine)))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert sample(3, top_p=0.5) == sample(3, top_p=0.5) != sample(3)


def test_auto_takes_slots_on_cuda_where_they_run_and_the_other_engines_by_work_size_elsewhere() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    common = {"quantized": False, "sharded": False, "batch_size": 64}
    runs, refused = {"slots_refusal": None}, {"slots_refusal": "model type 'gemma2'"}
    assert engines.choose("auto", device=cuda, prompts=2048, **common, **runs) == "slots"
    assert engines.choose("auto", device=cuda, prompts=1, **common, **runs) == "slots"  # capture costs < 1 s
    assert engines.choose("auto", device=cpu, prompts=2048, **common, **runs) == "generate"  # CI has no GPU
    assert engines.choose("auto", device=cuda, prompts=2048, quantized=False, sharded=True, batch_size=64,
                          **runs) == "generate"
    assert engines.choose("auto", device=cuda, prompts=2048, **common, **refused) == "graphs"  # compiling pays
    assert engines.choose("auto", device=cuda, prompts=256, max_new_tokens=64, **common, **refused) == "continuous"
    assert engines.choose("auto", device=cuda, prompts=1, **common, **refused) == "generate"  # one prompt stays quick
    assert engines.choose("auto", device=cuda, prompts=64, **common, **refused) == "generate"  # one batch too
    assert engines.choose("auto", device=cuda, prompts=2048, quantized=True, sharded=False, batch_size=64,
                          slots_refusal="quantized weights") == "generate"
    assert engines.choose("continuous", device=cpu, prompts=3, **common, **runs) == "continuous"
    assert engines.choose("slots", device=cpu, prompts=0, **common, **runs) == "generate"


def test_the_slots_engine_says_which_models_it_cannot_run(tiny) -> None:
    from llmplan.runtime.infer import slots

    assert slots.supports(tiny.model) is None
    gemma = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert "gemma2" in slots.supports(transformers.Gemma2ForCausalLM(gemma))
    mistral = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    assert slots.supports(transformers.MistralForCausalLM(mistral)) == "a sliding attention window"
    model, tiny.model = tiny.model, transformers.MistralForCausalLM(mistral)
    try:
        with pytest.raises(InferenceError, match=r"the slots engine cannot run this model \(a sliding attention "
                                                 r"window\): use --engine auto"):
            complete(tiny, MANY[:2], GenerationSettings(max_new_tokens=2, engine="slots"))
    finally:
        tiny.model = model


def test_slots_attend_over_the_positions_in_use_and_still_give_generates_tokens(tiny) -> None:
    """70 new tokens: the cache holds 128 positions a slot, and steps read 64, then 128, as sequences cross 64."""
    plain = complete(tiny, MANY, GenerationSettings(max_new_tokens=70, batch_size=3, engine="generate"))
    fast = complete(tiny, MANY, GenerationSettings(max_new_tokens=70, batch_size=3, engine="slots"))
    assert tiny.decoders.current.length == 128
    assert ids(fast) == ids(plain)


def test_a_later_call_that_fits_reuses_the_slots_decoder_and_another_shape_replaces_it(tiny) -> None:
    tiny.decoders.clear()  # what earlier tests left would be reused too
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, engine="slots")
    first = complete(tiny, MANY, settings)
    kept = tiny.decoders.current
    again = complete(tiny, MANY, settings)
    assert tiny.decoders.current is kept and ids(again) == ids(first)  # its cache was reset: no leftover state
    longer = complete(tiny, MANY, GenerationSettings(max_new_tokens=90, batch_size=2, engine="slots"))
    assert tiny.decoders.current is not kept and tiny.decoders.current.length > kept.length
    assert [c.token_ids[:6] for c in longer] == ids(first)
    longest = tiny.decoders.current
    shorter = complete(tiny, MANY, settings)  # fits the longer cache: reused
    assert tiny.decoders.current is longest and ids(shorter) == ids(first)
    complete(tiny, MANY, GenerationSettings(max_new_tokens=6, batch_size=3, engine="slots"))  # more slots
    assert tiny.decoders.current is not longest and tiny.decoders.current.slots == 3
    three = tiny.decoders.current
    fewer = complete(tiny, MANY, settings)  # 2 slots of the kept 3 (a server's smaller batch), the third idle
    assert tiny.decoders.current is three and ids(fewer) == ids(first)
    one_prompt = complete(tiny, MANY[:1], settings)
    assert tiny.decoders.current is three and ids(one_prompt) == ids(first)[:1]


def test_the_slots_cache_holds_each_slots_longest_sequence_in_whole_blocks(tiny) -> None:
    from llmplan.runtime.infer import slots

    assert slots.cache_len(100, 256) == 384  # 356 positions -> 6 blocks of 64
    # What a decoder really allocates (the planner counts the same: tests/planner/test_estimator.py):
    # keys and values x layers x 8 slots x KV heads x 384 positions x head dims x 4 bytes (fp32)
    config = tiny.model.config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    decoder = slots._Decoder(tiny.model, slots=8, length=slots.cache_len(100, 256))
    allocated = sum(t.numel() * t.element_size() for layer in decoder.cache.layers for t in (layer.keys, layer.values))
    assert allocated == 2 * config.num_hidden_layers * 8 * heads * 384 * head_dim * 4


def test_the_kv_cache_is_sized_by_the_call_in_whole_pages() -> None:
    assert engines.kv_cache_tokens(8, 100, 256) == 8 * 384  # 356 tokens -> 6 pages of 64
    assert engines.kv_cache_tokens(64, 512, 256) == 64 * 768


def test_an_unknown_engine_is_refused() -> None:
    with pytest.raises(InferenceError, match="unknown engine 'vllm': use auto, generate, slots, continuous, graphs"):
        GenerationSettings(engine="vllm")
