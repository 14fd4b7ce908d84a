"""The generation core on CPU, against a tiny random Llama with a byte-level BPE tokenizer built here."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmplan.runtime.text.chat import DialogError, Message, format_chat  # noqa: E402
from llmplan.runtime.infer.inference import (  # noqa: E402
    FinishReason,
    GenerationSettings,
    InferenceError,
    chat,
    cleanup,
    complete,
    respond,
    setup,
    stream,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a tiny language model.",
    "Hello world, hello tokenizer, hello again!",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = ["Hello", "The quick brown fox jumps over", "What is the capital of France? The capital", "Once upon"]
GREEDY = GenerationSettings(max_new_tokens=10, batch_size=4)
DIALOG = [Message("system", "Be brief."), Message("user", "What is the capital of France?")]


# ---- a tiny model, built without the hub ----------------------------------------------------------
def save_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on four lines; BOS added to every text, no pad token (the runtime adds one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 4, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_llama(directory: Path) -> Path:
    tokenizer = save_tokenizer(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,  # wide init: varied, decisive greedy picks
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # EOS's logit is 0 while the max over 319 random logits is positive: greedy never stops
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(directory)
    return directory


def save_lora_adapter(model_dir: Path, directory: Path) -> Path:
    """A LoRA adapter on q/v with random A and B (PEFT initialises B to zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    return directory


def save_merged(model_dir: Path, adapter_dir: Path, directory: Path) -> Path:
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def generator(tiny_dir: Path):
    with setup(tiny_dir, dtype="fp32", quant="none", device="cpu") as loaded:
        yield loaded


def ids(report) -> list[tuple[int, ...]]:
    return [completion.token_ids for completion in report]


# ---- batching, seeding, streaming ----------------------------------------------------------------
def test_a_batch_of_different_lengths_gives_the_one_by_one_greedy_tokens(generator) -> None:
    batched = complete(generator, PROMPTS, GREEDY)
    one_by_one = [complete(generator, [prompt], GREEDY)[0] for prompt in PROMPTS]
    assert ids(batched) == [c.token_ids for c in one_by_one]
    assert [c.text for c in batched] == [c.text for c in one_by_one]
    assert len({len(generator.tokenizer(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # really padded
    assert [c.prompt_tokens for c in batched] == [len(generator.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert all(c.completion_tokens == 10 and c.finish_reason is FinishReason.LENGTH for c in batched)
    assert len(set(ids(batched))) == len(PROMPTS)  # the prompts lead somewhere different


def test_a_sharded_load_generates_what_one_device_does(generator, tiny_dir: Path) -> None:
    """device "auto" (a plan sharding the model over the actor's GPUs) loads with device_map="auto"; without GPUs
    everything lands on the CPU, where the inputs must go too."""
    with setup(tiny_dir, dtype="fp32", quant="none", device="auto") as sharded:
        assert sharded.device == torch.device("cpu")
        report = complete(sharded, PROMPTS, GREEDY)
    assert ids(report) == ids(complete(generator, PROMPTS, GREEDY))
    assert report.peak_reserved_bytes is None  # no GPU memory to report


def test_batches_of_two_give_the_same_greedy_tokens_as_one_batch(generator) -> None:
    halves = complete(generator, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=3))
    assert ids(halves) == ids(complete(generator, PROMPTS, GREEDY))


def test_seeded_sampling_repeats_and_other_seeds_differ(generator) -> None:
    def sample(seed: int) -> list[tuple[int, ...]]:
        return ids(complete(generator, PROMPTS, GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9,
                                                                    seed=seed, batch_size=4)))

    rng_before = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left as it was
    assert sample(7) == first
    assert sample(8) != first
    assert first != ids(complete(generator, PROMPTS, GREEDY))


def test_streaming_yields_the_greedy_text_piece_by_piece(generator) -> None:
    settings = GenerationSettings(max_new_tokens=16)
    for prompt in ("The quick brown fox", DIALOG):
        pieces = list(stream(generator, prompt, settings))
        assert len(pieces) > 1
        assert "".join(pieces) == respond(generator, [prompt], settings)[0].text


def test_streaming_a_sample_gives_the_seeded_sample(generator) -> None:
    settings = GenerationSettings(max_new_tokens=16, temperature=0.8, seed=3)
    assert "".join(stream(generator, "Once upon", settings)) == complete(generator, ["Once upon"], settings)[0].text


def test_closing_a_stream_early_stops_its_generation_thread(generator) -> None:
    pieces = stream(generator, "Hello", GenerationSettings(max_new_tokens=100))
    next(pieces)
    pieces.close()
    assert not [t for t in threading.enumerate() if t.name == "llmplan-generate"]


# ---- stop tokens ---------------------------------------------------------------------------------
def test_a_stop_token_from_generation_config_ends_the_completion(generator, tiny_dir: Path, tmp_path: Path) -> None:
    greedy = complete(generator, PROMPTS, GREEDY)
    tokens = greedy[1].token_ids
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    stopping_dir = Path(shutil.copytree(tiny_dir, tmp_path / "stops"))
    # generation_config.json may list several EOS ids (Llama-3 does); every one of them stops generation.
    config = json.loads((stopping_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [generator.tokenizer.eos_token_id, tokens[cut]]
    (stopping_dir / "generation_config.json").write_text(json.dumps(config))

    with setup(stopping_dir, dtype="fp32", quant="none", device="cpu") as stopping:
        batched = complete(stopping, PROMPTS, GREEDY)
        alone = complete(stopping, [PROMPTS[1]], GREEDY)[0]
    assert batched[1] == alone  # the rows that keep going pad the stopped one; it is cut at its stop token
    assert alone.finish_reason is FinishReason.STOP
    assert alone.token_ids == tokens[: cut + 1]
    assert alone.text == generator.tokenizer.decode(tokens[:cut])
    assert batched.generated_tokens == sum(c.completion_tokens for c in batched)


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_formats_with_the_template_and_adds_no_second_bos(generator) -> None:
    report = chat(generator, [DIALOG, [{"role": "user", "content": "Hello"}]], GREEDY)
    text = format_chat(generator.tokenizer, DIALOG)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    assert report[0].prompt_tokens == len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert ids(chat(generator, [DIALOG], GREEDY)) == ids(report)[:1]


def test_respond_answers_prompts_and_dialogs_in_order(generator) -> None:
    mixed = respond(generator, [PROMPTS[0], tuple(DIALOG), PROMPTS[2]], GREEDY)
    assert ids(mixed) == [
        complete(generator, [PROMPTS[0]], GREEDY)[0].token_ids,
        chat(generator, [DIALOG], GREEDY)[0].token_ids,
        complete(generator, [PROMPTS[2]], GREEDY)[0].token_ids,
    ]


# ---- quantization and adapters -------------------------------------------------------------------
@pytest.mark.parametrize(("quant", "layer"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_loading_generates_the_requested_tokens(tiny_dir: Path, quant: str, layer: str) -> None:
    pytest.importorskip("bitsandbytes")
    with setup(tiny_dir, dtype="bf16", quant=quant, device="cpu") as quantized:
        assert type(quantized.model.model.layers[0].self_attn.q_proj).__name__ == layer
        report = complete(quantized, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=2))
    assert [c.completion_tokens for c in report] == [8] * len(PROMPTS)
    assert all(c.finish_reason is FinishReason.LENGTH for c in report)


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora_adapter(tiny_dir, tmp_path_factory.mktemp("lora"))


def test_an_adapter_changes_the_output_and_equals_the_merged_weights(
    generator, tiny_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    with setup(tiny_dir, dtype="fp32", quant="none", device="cpu", adapter=adapter_dir) as adapted:
        with_adapter = complete(adapted, PROMPTS, GREEDY)
    merged_dir = save_merged(tiny_dir, adapter_dir, tmp_path / "merged")
    with setup(merged_dir, dtype="fp32", quant="none", device="cpu") as merged:
        assert ids(complete(merged, PROMPTS, GREEDY)) == ids(with_adapter)
    base = complete(generator, PROMPTS, GREEDY)
    assert all(a != b for a, b in zip(ids(with_adapter), ids(base)))


def test_an_adapter_loads_on_a_4bit_base(tiny_dir: Path, adapter_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    with setup(tiny_dir, dtype="bf16", quant="nf4", device="cpu", adapter=adapter_dir) as adapted:
        report = complete(adapted, PROMPTS[:2], GenerationSettings(max_new_tokens=5))
    assert [c.completion_tokens for c in report] == [5, 5]


# ---- measurements --------------------------------------------------------------------------------
def test_the_report_measures_tokens_per_second(generator) -> None:
    report = complete(generator, PROMPTS, GREEDY)
    assert report.generated_tokens == 40
    assert report.wall_seconds > 0
    assert report.tokens_per_second == pytest.approx(40 / report.wall_seconds)
    assert report.peak_reserved_bytes is None  # measured on CUDA only
    metrics = report.metrics()
    assert metrics["prompts"] == 4 and metrics["generated_tokens"] == 40
    assert metrics["prompt_tokens"] == sum(c.prompt_tokens for c in report)
    assert len(complete(generator, [], GREEDY)) == 0


# ---- errors that say what to do ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
        ({"temperature": -0.1}, "temperature must be 0 (greedy) or positive"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ],
)
def test_settings_refuse_impossible_values(kwargs: dict, says: str) -> None:
    with pytest.raises(InferenceError) as error:
        GenerationSettings(**kwargs)
    assert says in str(error.value)


def test_setup_says_what_it_needs(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="is not a Hugging Face model directory .no config.json in it."):
        setup(tmp_path, device="cpu")
    with pytest.raises(InferenceError, match="is not a PEFT adapter directory .no adapter_config.json"):
        setup(tiny_dir, device="cpu", adapter=tmp_path)
    with pytest.raises(InferenceError, match="unknown dtype 'float32': use bf16, fp16, fp32"):
        setup(tiny_dir, dtype="float32", device="cpu")
    with pytest.raises(InferenceError, match="unknown quant 'int4': use none, int8, nf4"):
        setup(tiny_dir, quant="int4", device="cpu")


def test_generation_refuses_what_it_cannot_run(generator) -> None:
    with pytest.raises(InferenceError, match="exceeds the model's context of 128 tokens: shorten the prompt"):
        complete(generator, ["Hello"], GenerationSettings(max_new_tokens=200))
    with pytest.raises(InferenceError, match="prompt 1 is list, not text: use chat"):
        complete(generator, ["Hello", [{"role": "user", "content": "Hi"}]], GREEDY)  # type: ignore[list-item]
    with pytest.raises(DialogError, match="dialog 1: the last message is from the assistant"):
        chat(generator, [DIALOG, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], GREEDY)
    with pytest.raises(DialogError, match="dialog 0: a dialog is a list of messages, got int"):
        respond(generator, [3], GREEDY)  # type: ignore[list-item]


def test_a_cleaned_up_generator_refuses_to_run(tiny_dir: Path) -> None:
    loaded = setup(tiny_dir, dtype="fp32", quant="none", device="cpu")
    cleanup(loaded)
    assert loaded.closed
    with pytest.raises(InferenceError, match="cleaned up: call setup"):
        complete(loaded, ["Hello"], GREEDY)
