from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmplan.planner.resolve import ModelConfigError, UnknownModelError, resolve_model


def test_names_are_case_insensitive_and_shorthands_say_what_they_resolve_to() -> None:
    assert resolve_model("LLAMA-3.1-8b").spec.name == "Llama-3.1-8B"
    seven = resolve_model("7b")
    assert seven.spec.name == "Llama-2-7B"
    assert "7B -> Llama-2-7B" in seven.how


def test_misspellings_get_did_you_mean() -> None:
    with pytest.raises(UnknownModelError, match="did you mean Mistral-7B"):
        resolve_model("mistrl-7b")
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-5'"):
        resolve_model("gpt-5")


def test_hugging_face_config_json(tmp_path: Path) -> None:
    config = {  # Qwen2.5-7B's published config.json (the fields llmplan reads)
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 131072, "use_sliding_window": False,
        "sliding_window": 131072,
    }
    model_dir = tmp_path / "my-qwen"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    resolved = resolve_model(str(model_dir))
    assert resolved.spec.name == "my-qwen"
    assert resolved.spec.params == resolve_model("Qwen2.5-7B").spec.params
    assert resolved.spec.sliding_window == 0
    assert resolve_model(str(model_dir / "config.json")).spec.kv_dim == 512


@pytest.mark.parametrize(
    ("params", "catalog_name"),
    [  # params.json as Meta's download script leaves it
        ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, "Llama-2-7B"),
        ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80,
          "norm_eps": 1e-05, "vocab_size": -1}, "Llama-2-70B"),
        ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}, "Llama-3-8B"),
    ],
)
def test_meta_checkpoint_params_json(tmp_path: Path, params: dict, catalog_name: str) -> None:
    (tmp_path / "params.json").write_text(json.dumps(params))
    spec = resolve_model(str(tmp_path)).spec
    reference = resolve_model(catalog_name).spec
    assert (spec.intermediate_size, spec.num_kv_heads, spec.params) == (
        reference.intermediate_size, reference.num_kv_heads, reference.params)


def test_a_directory_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="neither config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="cannot read"):
        resolve_model(str(tmp_path))
