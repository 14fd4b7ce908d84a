"""Turn what the user typed as MODEL into a `ModelSpec`.

Accepted, in this order:
1. a path: a Hugging Face model directory or its config.json, or a Meta checkpoint directory
   (params.json, as Meta's download script leaves it);
2. a catalog name or alias, case-insensitive;
3. a size shorthand (`7B`, `70B`...), which resolves to a stated default model.
Anything else is an `UnknownModelError` with close matches ("did you mean").
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from .model_catalog import MODELS, SIZE_SHORTHANDS
from .models import ModelSpec


class UnknownModelError(LookupError):
    """MODEL is neither a path, a catalog name nor a size shorthand."""


class ModelConfigError(ValueError):
    """A config.json or params.json that cannot describe a model."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    how: str  # "catalog", "shorthand 7B", "config.json at ...", "Meta params.json at ..."


def _catalog_index() -> dict[str, ModelSpec]:
    index: dict[str, ModelSpec] = {}
    for spec in MODELS:
        for key in (spec.name, *spec.aliases):
            index[key.lower()] = spec
    return index


def find_model(name: str) -> ModelSpec | None:
    return _catalog_index().get(name.strip().lower())


def resolve_model(text: str) -> ResolvedModel:
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(path)
    key = text.strip().lower()
    spec = find_model(key)
    if spec is not None:
        return ResolvedModel(spec, "catalog")
    if key in SIZE_SHORTHANDS:
        spec = find_model(SIZE_SHORTHANDS[key])
        assert spec is not None, f"shorthand {key} names a model missing from the catalog"
        return ResolvedModel(spec, f"shorthand {text.strip().upper()} -> {spec.name}")
    raise UnknownModelError(_unknown_message(text))


def _unknown_message(text: str) -> str:
    names = [spec.name for spec in MODELS] + list(SIZE_SHORTHANDS)
    lowered = {name.lower(): name for name in names}
    lowered.update({alias: spec.name for spec in MODELS for alias in spec.aliases})
    close = difflib.get_close_matches(text.strip().lower(), list(lowered), n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(dict.fromkeys(lowered[c] for c in close))}?" if close else ""
    return (f"unknown model {text!r}{suggestion} "
            "(give a catalog name such as Llama-3.1-8B, a size such as 7B, a Hugging Face model directory, "
            "a config.json or a Meta checkpoint directory)")


# ---- paths -----------------------------------------------------------------------------------------
def _from_path(path: Path) -> ResolvedModel:
    if path.is_file():
        return ResolvedModel(spec_from_hf_config(_read_json(path), path.parent.name or path.stem), f"config.json at {path}")
    if (path / "config.json").exists():
        return ResolvedModel(spec_from_hf_config(_read_json(path / "config.json"), path.name), f"config.json at {path}")
    if (path / "params.json").exists():
        return ResolvedModel(spec_from_meta_params(_read_json(path / "params.json"), path.name), f"Meta params.json at {path}")
    raise ModelConfigError(f"{path} has neither config.json (Hugging Face) nor params.json (Meta checkpoint)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelConfigError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} does not hold a JSON object")
    return data


def _require(config: dict, *keys: str, source: str) -> int:
    for key in keys:
        if key in config and config[key] is not None:
            return int(config[key])
    raise ModelConfigError(f"{source} lacks {' / '.join(keys)}")


def spec_from_hf_config(config: dict, name: str) -> ModelSpec:
    """A `ModelSpec` from a Hugging Face config.json (text config of multimodal models included)."""
    config = config.get("text_config", config)
    source = f"config.json of {name}"
    heads = _require(config, "num_attention_heads", "n_head", source=source)
    hidden = _require(config, "hidden_size", "n_embd", "d_model", source=source)
    return ModelSpec(
        name=name,
        model_type=str(config.get("model_type", "llama")),
        hidden_size=hidden,
        intermediate_size=_require(config, "intermediate_size", "n_inner", "ffn_hidden_size", source=source),
        num_layers=_require(config, "num_hidden_layers", "n_layer", "num_layers", source=source),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=_require(config, "vocab_size", source=source),
        head_dim=int(config.get("head_dim") or 0),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
        experts_per_token=int(config.get("num_experts_per_tok") or 1),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        sliding_window=int(config.get("sliding_window") or 0) if config.get("use_sliding_window", True) else 0,
    )


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size Meta's `model.py` computes: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def spec_from_meta_params(params: dict, name: str) -> ModelSpec:
    """A `ModelSpec` from Meta's params.json (Llama 2 / 3 checkpoints)."""
    source = f"params.json of {name}"
    dim = _require(params, "dim", source=source)
    heads = _require(params, "n_heads", source=source)
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        # Llama 2's params.json says -1: the size comes from tokenizer.model, 32000 for every Llama 2.
        vocab = 32000
    return ModelSpec(
        name=name,
        model_type="llama",
        hidden_size=dim,
        intermediate_size=meta_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        num_layers=_require(params, "n_layers", source=source),
        num_heads=heads,
        num_kv_heads=int(params.get("n_kv_heads") or heads),
        vocab_size=vocab,
        max_position_embeddings=int(params.get("max_seq_len", 4096)),
    )
