"""Meta checkpoints (`params.json`, `consolidated.NN.pth` model-parallel shards, `tokenizer.model`) as
Hugging Face Llama directories: shards merged the way Meta split them, rotary layout permuted for HF,
config and sentencepiece tokenizer written. `model_store.ensure_model` converts once into its cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmplan.planner.resolve import spec_from_meta_params

from llmplan.runtime.models.architectures import hf_config_dict
from llmplan.runtime.models.model_files import (
    CONVERTER_VERSION,
    LLAMA2_CHAT_TEMPLATE,
    ModelStoreError,
    Steps,
    building,
    gist,
    require_new_directory,
    write_provenance,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ---- Meta checkpoints -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaCheckpoint:
    """The files of a Meta checkpoint directory, as Meta's download script leaves them."""

    folder: Path
    params: dict
    shards: tuple[Path, ...]  # consolidated.00.pth, consolidated.01.pth ... in model-parallel rank order
    tokenizer: Path

    @property
    def is_chat(self) -> bool:
        return "chat" in self.folder.name.lower()


def read_meta_checkpoint(folder: Path) -> MetaCheckpoint:
    folder = folder.resolve()
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelStoreError(f"cannot read {params_path}: {error}") from error
    shards = tuple(sorted(folder.glob("consolidated.*.pth"), key=_shard_rank))
    if not shards:
        raise ModelStoreError(f"{folder} has params.json but no consolidated.NN.pth weights: "
                              "copy the checkpoint's .pth files in")
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.exists():
        parent = folder.parent / "tokenizer.model"  # Meta's llama-2 download puts it next to the model folders
        if not parent.exists():
            raise ModelStoreError(f"{folder} has no tokenizer.model (nor has its parent folder): copy Meta's "
                                  "tokenizer.model next to params.json")
        tokenizer = parent
    return MetaCheckpoint(folder, params, shards, tokenizer)


def _shard_rank(path: Path) -> int:
    match = re.fullmatch(r"consolidated\.(\d+)\.pth", path.name)
    if match is None:
        raise ModelStoreError(f"unexpected checkpoint file {path.name}: Meta names its shards consolidated.NN.pth")
    return int(match.group(1))


def checkpoint_key(checkpoint: MetaCheckpoint) -> str:
    """What identifies one conversion: the absolute path, each file's size and mtime, the converter."""
    digest = hashlib.sha256(f"{checkpoint.folder}\nconverter {CONVERTER_VERSION}\n".encode())
    for path in (checkpoint.folder / "params.json", checkpoint.tokenizer, *checkpoint.shards):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def convert_meta_checkpoint(src: Path, dst: Path, *, progress: bool = False) -> Path:
    """Write a Meta Llama checkpoint (model-parallel shards) as a Hugging Face Llama directory at `dst`."""
    require_new_directory(dst)
    checkpoint = read_meta_checkpoint(src)
    sentencepiece = _load_sentencepiece(checkpoint.tokenizer)
    steps = Steps(progress)
    with building(dst) as tmp:
        with steps.step(f"converting the weights of {checkpoint.folder.name} ({len(checkpoint.shards)} shards)"):
            dtype, vocab, ffn = write_meta_weights(checkpoint, tmp)
        with steps.step("writing config.json and the tokenizer"):
            _write_meta_config(checkpoint, tmp, dtype, vocab, ffn, sentencepiece)
            _write_meta_tokenizer(checkpoint, tmp)
            write_provenance(tmp, name=checkpoint.folder.name, source="meta checkpoint",
                              origin=str(checkpoint.folder))
    return dst


def _load_sentencepiece(path: Path) -> Any:
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise ModelStoreError(
            f"{path} is not a sentencepiece model (Llama 3 ships a tiktoken file instead): llmplan converts "
            "Llama 2-style checkpoints with a sentencepiece tokenizer.model") from error


# Meta name (within a layer) -> (HF name, how model parallelism split it). Meta's model.py builds wq, wk,
# wv, w1, w3 and `output` as ColumnParallelLinear (split along the output features, dim 0), wo and w2 as
# RowParallelLinear (split along the input features, dim 1); norms are replicated on every rank.
_LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "column"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "column"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "column"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "row"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "column"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "row"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "column"),
    "attention_norm.weight": ("input_layernorm.weight", "replicated"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "replicated"),
}
_TOP_TENSORS: dict[str, tuple[str, str]] = {
    # Llama 2 splits the embedding along the hidden dim (fairscale ParallelEmbedding), Llama 3 along the
    # vocabulary (VocabParallelEmbedding): `embedding` reads which from the shard shapes.
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),
    "norm.weight": ("model.norm.weight", "replicated"),
    "output.weight": ("lm_head.weight", "column"),
}
_IGNORED = frozenset({"rope.freqs"})  # Llama 2 stores its rotary frequencies; HF recomputes them
MAX_FILE_BYTES = 4 << 30  # one safetensors file per ~4 GiB, as Hugging Face repositories shard theirs


@dataclass(frozen=True)
class _Tensor:
    """One HF tensor to write: its name, byte size, and how to build it from the shards."""

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    build: Callable[[], "torch.Tensor"]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def write_meta_weights(checkpoint: MetaCheckpoint, dst: Path) -> tuple["torch.dtype", int, int]:
    """Merge the shards into HF Llama safetensors at `dst`; returns (dtype, vocab size, FFN size).

    The shards are memory-mapped, so a tensor is read only when its output file is written, and one
    output file (at most ~4 GiB) is held in memory at a time.
    """
    shards = [_load_shard(path) for path in checkpoint.shards]
    plan = _meta_tensor_plan(checkpoint, shards)
    _write_safetensors(plan, dst)
    shapes = {item.name: item.shape for item in plan}
    vocab = shapes["model.embed_tokens.weight"][0]
    ffn = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    return plan[0].dtype, vocab, ffn


def _load_shard(path: Path) -> dict:
    """Memory-map a shard (read lazily); files in torch's pre-1.6 format cannot be mapped and load whole."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as error:
        raise ModelStoreError(f"cannot read {path} ({gist(error)}): is the download complete?") from error


def _meta_tensor_plan(checkpoint: MetaCheckpoint, shards: list[dict]) -> list[_Tensor]:
    params = checkpoint.params
    n_layers, n_heads, hidden = int(params["n_layers"]), int(params["n_heads"]), int(params["dim"])
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    _check_names(shards[0], n_layers, checkpoint.shards[0])
    heads_of = {"attention.wq.weight": n_heads, "attention.wk.weight": n_kv_heads}
    expected = _expected_shapes(hidden, n_heads, n_kv_heads)
    plan = [_merged_tensor(shards, meta, hf, split, hidden, None) for meta, (hf, split) in _TOP_TENSORS.items()]
    for layer in range(n_layers):
        for meta, (hf, split) in _LAYER_TENSORS.items():
            plan.append(_merged_tensor(shards, f"layers.{layer}.{meta}", f"model.layers.{layer}.{hf}", split,
                                       hidden, heads_of.get(meta)))
    for item in plan:
        want = expected.get(item.name.split(".", 3)[-1] if item.name.startswith("model.layers.") else item.name)
        if want is not None and item.shape != want:
            raise ModelStoreError(f"{item.name} has shape {item.shape} but params.json (dim {hidden}, n_heads "
                                  f"{n_heads}, n_kv_heads {n_kv_heads}) needs {want}: params.json does not "
                                  "belong to these weights")
    return plan


def _expected_shapes(hidden: int, n_heads: int, n_kv_heads: int) -> dict[str, tuple[int, ...]]:
    """The HF shapes params.json fixes (the FFN width and the vocabulary come from the weights)."""
    kv = n_kv_heads * (hidden // n_heads)
    return {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "model.norm.weight": (hidden,),
    }


def _check_names(shard: dict, n_layers: int, path: Path) -> None:
    expected = set(_TOP_TENSORS) | {f"layers.{i}.{name}" for i in range(n_layers) for name in _LAYER_TENSORS}
    present = set(shard) - _IGNORED
    if present != expected:
        missing, unexpected = sorted(expected - present)[:3], sorted(present - expected)[:3]
        raise ModelStoreError(f"{path} is not a Llama checkpoint of params.json's shape (missing {missing}, "
                              f"unexpected {unexpected}): llmplan converts Meta Llama 2-style checkpoints")


def _merged_tensor(shards: list[dict], meta: str, hf: str, split: str, hidden: int,
                   rotary_heads: int | None) -> _Tensor:
    """The full tensor `hf`, concatenated from every rank's piece of `meta` along the dim they split."""
    pieces = [shard[meta] for shard in shards]
    if len({tuple(piece.shape) for piece in pieces}) > 1:
        shapes = ", ".join(str(tuple(piece.shape)) for piece in pieces)
        raise ModelStoreError(f"the shards hold {meta} in different shapes ({shapes}): model-parallel ranks split "
                              "tensors evenly, so a shard is damaged or from another checkpoint")
    dim = _split_dim(pieces, split, hidden, meta)
    shape = list(pieces[0].shape)
    if dim is not None:
        shape[dim] = sum(piece.shape[dim] for piece in pieces)

    def build() -> "torch.Tensor":
        import torch

        tensor = pieces[0].clone() if dim is None else torch.cat(pieces, dim=dim)
        return rotary_to_hf(tensor, rotary_heads) if rotary_heads else tensor.contiguous()

    return _Tensor(hf, tuple(shape), pieces[0].dtype, build)


def _split_dim(pieces: list, split: str, hidden: int, meta: str) -> int | None:
    """The dim the model-parallel ranks split this tensor along (None: replicated, or a single shard)."""
    if len(pieces) == 1 or split == "replicated":
        return None
    if split == "column":
        return 0
    if split == "row":
        return 1
    # The embedding: Llama 2's ParallelEmbedding splits the hidden dim, Llama 3's VocabParallelEmbedding
    # the vocabulary.
    width = pieces[0].shape[1]
    if width * len(pieces) == hidden:
        return 1
    if width == hidden:
        return 0
    raise ModelStoreError(f"{meta} has shards of shape {tuple(pieces[0].shape)}, which do not add up to "
                          f"params.json's dim {hidden}: the checkpoint is incomplete or not a Llama")


def rotary_to_hf(weight: "torch.Tensor", n_heads: int) -> "torch.Tensor":
    """Meta rotates (even, odd) pairs of each head; HF rotates its two halves: reorder the rows to match.

    The `permute` of transformers' `convert_llama_weights_to_hf.py`.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def _write_safetensors(plan: list[_Tensor], dst: Path) -> None:
    from safetensors.torch import save_file

    groups = _group_by_size(plan, MAX_FILE_BYTES)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups):
        save_file({item.name: item.build() for item in group}, str(dst / file_name), metadata={"format": "pt"})
        weight_map.update({item.name: file_name for item in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(item.nbytes for item in plan)}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _group_by_size(plan: list[_Tensor], limit: int) -> list[list[_Tensor]]:
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for item in plan:
        if groups[-1] and size + item.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def _write_meta_config(checkpoint: MetaCheckpoint, dst: Path, dtype: "torch.dtype", vocab: int, ffn: int,
                       sentencepiece: Any) -> None:
    from transformers import AutoConfig

    params = checkpoint.params
    spec = replace(spec_from_meta_params(params, checkpoint.folder.name), vocab_size=vocab, intermediate_size=ffn)
    config = AutoConfig.for_model(
        "llama",
        **hf_config_dict(spec),
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        bos_token_id=sentencepiece.bos_id(),
        eos_token_id=sentencepiece.eos_id(),
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )
    config.save_pretrained(dst)


def _write_meta_tokenizer(checkpoint: MetaCheckpoint, dst: Path) -> None:
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(checkpoint.tokenizer, Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)
    if checkpoint.is_chat:
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(dst)
    shutil.copyfile(checkpoint.tokenizer, dst / "tokenizer.model")
