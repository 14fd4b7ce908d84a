"""Meta checkpoints (params.json, model-parallel consolidated.NN.pth shards, tokenizer.model) -> HF Llama.

Each test writes a tiny random Llama in Meta's layout, split over model-parallel ranks the way Meta's
`model.py` splits it, and holds the converted model to a reference forward pass written here directly
from Meta's weights (RMSNorm, rotary embeddings in Meta's complex form, grouped-query attention, SwiGLU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sentencepiece = pytest.importorskip("sentencepiece")

import torch.nn.functional as F  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmplan.cli.main import cli  # noqa: E402
from llmplan.planner.resolve import meta_ffn_dim  # noqa: E402
from llmplan.runtime.models import meta_checkpoint  # noqa: E402
from llmplan.runtime.models.model_files import LLAMA2_CHAT_TEMPLATE  # noqa: E402
from llmplan.runtime.models.model_store import (  # noqa: E402
    ModelStoreError,
    convert_meta_checkpoint,
    ensure_model,
)

TEXT = "The quick brown fox jumps over the lazy dog. Llama model weights shard!"


@dataclass(frozen=True)
class TinyLlama:
    """Meta params.json of a tiny model, and how its checkpoint is split over model-parallel ranks."""

    params: dict
    shards: int = 2
    embedding_split: int = 1  # Llama 2's ParallelEmbedding splits the hidden dim; Llama 3's the vocabulary

    @property
    def n_kv_heads(self) -> int:
        return self.params.get("n_kv_heads") or self.params["n_heads"]

    @property
    def ffn(self) -> int:
        p = self.params
        return meta_ffn_dim(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier"))


MHA = TinyLlama({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1})
GQA = TinyLlama({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-6,
                 "rope_theta": 500000.0, "vocab_size": 320}, embedding_split=0)


def random_weights(model: TinyLlama, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsplit) Meta weights, fp32, large enough that a wrong permutation changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    p = model.params
    dim, head_dim = p["dim"], p["dim"] // p["n_heads"]

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    weights = {"tok_embeddings.weight": rand(vocab, dim, scale=1.0), "norm.weight": 1 + rand(dim),
               "output.weight": rand(vocab, dim)}
    for i in range(p["n_layers"]):
        weights.update({
            f"layers.{i}.attention.wq.weight": rand(dim, dim),
            f"layers.{i}.attention.wk.weight": rand(model.n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wv.weight": rand(model.n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wo.weight": rand(dim, dim),
            f"layers.{i}.feed_forward.w1.weight": rand(model.ffn, dim),
            f"layers.{i}.feed_forward.w2.weight": rand(dim, model.ffn),
            f"layers.{i}.feed_forward.w3.weight": rand(model.ffn, dim),
            f"layers.{i}.attention_norm.weight": 1 + rand(dim),
            f"layers.{i}.ffn_norm.weight": 1 + rand(dim),
        })
    return weights


ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
REPLICATED = ("norm.weight",)  # attention_norm, ffn_norm and the final norm all end with it


def split_dim(name: str, model: TinyLlama) -> int | None:
    """How Meta's model parallelism splits a tensor over ranks (None: every rank holds all of it)."""
    if name.endswith(REPLICATED):
        return None
    if name == "tok_embeddings.weight":
        return model.embedding_split
    return 1 if name.endswith(ROW_PARALLEL) else 0


def write_meta_checkpoint(folder: Path, model: TinyLlama, weights: dict, tokenizer: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(model.params))
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    head_dim = model.params["dim"] // model.params["n_heads"]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # Llama 2 saves rope.freqs
    for rank in range(model.shards):
        shard = {"rope.freqs": freqs}
        for name, tensor in weights.items():
            dim = split_dim(name, model)
            shard[name] = tensor.clone() if dim is None else tensor.chunk(model.shards, dim=dim)[rank].clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


def meta_forward(weights: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of Meta's Llama `model.py`, written out from its weights (no transformers involved)."""
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    head_dim, eps = dim // n_heads, params["norm_eps"]
    theta = params.get("rope_theta", 10000.0)
    batch, seq = tokens.shape
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    mask = torch.full((seq, seq), float("-inf")).triu(1)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotary(x: torch.Tensor) -> torch.Tensor:  # Meta's apply_rotary_emb: (even, odd) pairs as complex numbers
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis).flatten(3)

    h = weights["tok_embeddings.weight"][tokens]
    for i in range(n_layers):
        w = {name.removeprefix(f"layers.{i}."): t for name, t in weights.items() if name.startswith(f"layers.{i}.")}
        x = rms_norm(h, w["attention_norm.weight"])
        q = rotary((x @ w["attention.wq.weight"].T).view(batch, seq, n_heads, head_dim))
        k = rotary((x @ w["attention.wk.weight"].T).view(batch, seq, n_kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(batch, seq, n_kv_heads, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=2) for t in (k, v))  # Meta's repeat_kv
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + mask
        attention = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq, dim)
        h = h + attention @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        h = h + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) @ w["feed_forward.w2.weight"].T
    return rms_norm(h, weights["norm.weight"]) @ weights["output.weight"].T


def vocab_of(tokenizer: Path) -> int:
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()


def make_checkpoint(tmp_path: Path, model: TinyLlama, tokenizer: Path, name: str = "llama-2-tiny") -> tuple[Path, dict]:
    weights = random_weights(model, vocab_of(tokenizer))
    return write_meta_checkpoint(tmp_path / name, model, weights, tokenizer), weights


@pytest.mark.parametrize("model", [MHA, GQA], ids=["mha-embedding-split-hidden", "gqa-embedding-split-vocab"])
def test_converted_model_computes_the_logits_of_metas_forward(tmp_path: Path, sentencepiece_model: Path,
                                                              model: TinyLlama) -> None:
    src, weights = make_checkpoint(tmp_path, model, sentencepiece_model)
    out = convert_meta_checkpoint(src, tmp_path / "hf")

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(tokens).logits
    expected = meta_forward(weights, model.params, tokens)
    assert hf.config.num_key_value_heads == model.n_kv_heads
    assert hf.config.rope_parameters["rope_theta"] == model.params.get("rope_theta", 10000.0)
    assert hf.config.rms_norm_eps == model.params["norm_eps"]
    assert hf.config.vocab_size == vocab_of(sentencepiece_model)
    assert (logits - expected).abs().max().item() < 1e-4
    assert logits.std().item() > 1.0  # the comparison is not between two nearly-zero tensors


def test_the_tokenizer_round_trips_text_as_sentencepiece_does(tmp_path: Path, sentencepiece_model: Path) -> None:
    src, _ = make_checkpoint(tmp_path, MHA, sentencepiece_model)
    tokenizer = AutoTokenizer.from_pretrained(convert_meta_checkpoint(src, tmp_path / "hf"))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    for text in (TEXT, "Gpu run fast? Plan memory, 2024 tokens.", "Zürich über alles €"):  # the last needs byte fallback
        ids = tokenizer(text).input_ids
        assert ids == [reference.bos_id(), *reference.encode(text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.chat_template is None  # not a chat checkpoint


def test_chat_checkpoints_get_the_llama2_chat_template(tmp_path: Path, sentencepiece_model: Path) -> None:
    src, _ = make_checkpoint(tmp_path, MHA, sentencepiece_model, name="llama-2-tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(convert_meta_checkpoint(src, tmp_path / "hf"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]"


def test_large_models_are_written_in_several_safetensors_files(tmp_path: Path, sentencepiece_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta_checkpoint, "MAX_FILE_BYTES", 200_000)
    src, weights = make_checkpoint(tmp_path, GQA, sentencepiece_model)
    out = convert_meta_checkpoint(src, tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert (hf(tokens).logits - meta_forward(weights, GQA.params, tokens)).abs().max().item() < 1e-4


def test_ensure_model_converts_a_checkpoint_once_and_again_when_it_changes(tmp_path: Path,
                                                                          sentencepiece_model: Path) -> None:
    src, _ = make_checkpoint(tmp_path, MHA, sentencepiece_model)
    cache = tmp_path / "cache"
    first = ensure_model(str(src), cache=cache)
    again = ensure_model(str(src), cache=cache)
    assert first.source == again.source == "meta checkpoint"
    assert (first.converted_now, again.converted_now) == (True, False)
    assert first.path == again.path and first.path.parent == cache / "converted"
    assert "once" in first.note and str(src) in first.note

    shard = src / "consolidated.01.pth"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    changed = ensure_model(str(src), cache=cache)
    assert changed.converted_now and changed.path != first.path


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path, sentencepiece_model: Path) -> None:
    src, weights = make_checkpoint(tmp_path, MHA, sentencepiece_model)
    shard = torch.load(src / "consolidated.01.pth")
    shard["tok_embeddings.weight"] = shard["tok_embeddings.weight"][:, :5]  # a damaged shard
    torch.save(shard, src / "consolidated.01.pth")
    cache = tmp_path / "cache"
    with pytest.raises(ModelStoreError, match="different shapes"):
        ensure_model(str(src), cache=cache)
    assert list((cache / "converted").iterdir()) == []  # no half conversion, no hidden partial directory


@pytest.mark.parametrize("breakage, message", [
    ("tokenizer", "not a sentencepiece model"),
    ("shards", "no consolidated.NN.pth"),
    ("names", "not a Llama checkpoint"),
    ("params", "params.json does not belong to these weights"),
    ("truncated", "is the download complete"),
])
def test_broken_checkpoints_are_refused_with_what_to_do(tmp_path: Path, sentencepiece_model: Path,
                                                        breakage: str, message: str) -> None:
    src, _ = make_checkpoint(tmp_path, MHA, sentencepiece_model)
    if breakage == "tokenizer":
        (src / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's tiktoken format
    elif breakage == "shards":
        for shard in src.glob("consolidated.*.pth"):
            shard.unlink()
    elif breakage == "names":
        torch.save({"tok_embeddings.weight": torch.zeros(3, 3)}, src / "consolidated.00.pth")
    elif breakage == "truncated":
        shard = src / "consolidated.01.pth"
        shard.write_bytes(shard.read_bytes()[:5000])
    else:
        (src / "params.json").write_text(json.dumps({**MHA.params, "n_kv_heads": 2}))
    with pytest.raises(ModelStoreError, match=message):
        convert_meta_checkpoint(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_convert_command_writes_the_directory_given(tmp_path: Path, sentencepiece_model: Path) -> None:
    src, _ = make_checkpoint(tmp_path, GQA, sentencepiece_model)
    result = CliRunner().invoke(cli, ["convert", str(src), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    again = CliRunner().invoke(cli, ["convert", str(src), "--out", str(tmp_path / "hf")])
    assert again.exit_code == 2 and "not empty" in again.output
