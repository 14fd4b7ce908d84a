"""`merge_adapter`: a LoRA adapter folded into its base computes what the PEFT model computes."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer  # noqa: E402

from llmplan.planner.model_catalog import MODELS  # noqa: E402
from llmplan.runtime.models.model_store import ModelStoreError, merge_adapter  # noqa: E402
from llmplan.runtime.models.modeling import LoraSettings, apply_lora, build_random_model  # noqa: E402

TINY = dataclasses.replace(
    next(m for m in MODELS if m.name == "SmolLM2-135M"), name="tiny-llama", hidden_size=64, intermediate_size=96,
    num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=320, head_dim=0,
)


def save_base(folder: Path, tokenizer_model: Path, spec=TINY) -> Path:
    torch.manual_seed(0)
    build_random_model(spec, "fp32", "cpu").save_pretrained(folder)
    with_tokenizer = folder.parent / f"{folder.name}-tokenizer"
    with_tokenizer.mkdir()
    shutil.copyfile(tokenizer_model, with_tokenizer / "tokenizer.model")
    LlamaTokenizer.from_pretrained(with_tokenizer).save_pretrained(folder)
    return folder


def trained_adapter(base: Path, folder: Path):
    """A LoRA adapter whose B matrices are not zero (fresh LoRA is the identity, which proves nothing)."""
    torch.manual_seed(1)
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    peft_model.save_pretrained(folder)
    return peft_model


def test_merged_model_computes_the_peft_models_logits(tmp_path: Path, sentencepiece_model: Path) -> None:
    base = save_base(tmp_path / "base", sentencepiece_model)
    peft_model = trained_adapter(base, tmp_path / "adapter")
    out = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = peft_model(tokens).logits, merged(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(tokens).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (plain - expected).abs().max().item() > 1e-2  # the adapter changes the model
    assert not any("lora" in name for name in merged.state_dict())
    text = "The quick brown fox"  # the base's tokenizer came along
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(base).encode(text)


def test_merging_refuses_what_is_not_an_adapter_for_this_base(tmp_path: Path, sentencepiece_model: Path) -> None:
    base = save_base(tmp_path / "base", sentencepiece_model)
    with pytest.raises(ModelStoreError, match="no adapter_config.json"):
        merge_adapter(str(base), base, tmp_path / "merged")

    wider = save_base(tmp_path / "wider", sentencepiece_model, dataclasses.replace(TINY, hidden_size=128))
    trained_adapter(wider, tmp_path / "wider-adapter")
    with pytest.raises(ModelStoreError, match="cannot apply the adapter"):
        merge_adapter(str(base), tmp_path / "wider-adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


MERGE_STEPS = ("loading torch, transformers and peft", "loading base (", "applying the adapter adapter (",
               "merging the adapter into the weights", "saving the merged model (")


def test_llmplan_merge_says_each_step_prints_no_library_output_and_keeps_the_template(
        tmp_path: Path, sentencepiece_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step of a merge (1.5 min on a CPU) on stderr as it starts and with its time when it ends; what
    transformers, peft, bitsandbytes and DeepSpeed print (warnings, progress bars) goes to the log."""
    from llmplan.runtime.text.prompt_templates import TEMPLATE_FILE, write_template

    from ..conftest import run_llmplan

    base = save_base(tmp_path / "base", sentencepiece_model)
    trained_adapter(base, tmp_path / "adapter")
    write_template(tmp_path / "adapter", "alpaca", "alpaca", "Preamble.\n\n### Instruction:\n{instruction}\n\n")
    monkeypatch.setenv("LLMPLAN_JOBS_DIR", str(tmp_path / "jobs"))
    result = run_llmplan("merge", str(base), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for step in MERGE_STEPS:
        started = next(i for i, line in enumerate(lines) if line.startswith(step) and line.endswith("..."))
        assert re.fullmatch(rf"done {re.escape(step)}.* \([0-9.]+ s\)", lines[started + 1]), result.stderr
    assert len(lines) == 2 * len(MERGE_STEPS), result.stderr  # nothing but llmplan's own lines
    assert re.search(r"saving the merged model \([0-9.]+ KiB\)", result.stderr), result.stderr  # its size
    assert result.stdout == f"{tmp_path / 'merged'}\n"
    assert "Loading weights" in (tmp_path / "logs" / "merge.log").read_text()  # transformers' bar, kept
    assert (tmp_path / "merged" / TEMPLATE_FILE).read_text() == (tmp_path / "adapter" / TEMPLATE_FILE).read_text()


def test_on_a_terminal_a_step_spins_and_leaves_what_libraries_print_where_it_was_sent(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`merge` on a terminal: a spinner per step, then its `done` line; what a library prints meanwhile (to
    sys.stderr, which `library_output_to` sends to the merge log) must not be drawn on the terminal above it."""
    import os
    import sys

    from llmplan.runtime.models.model_files import Steps

    controller, terminal_end = os.openpty()
    with os.fdopen(terminal_end, "w", buffering=1) as terminal:
        with Steps(True, terminal).step("saving the merged model"):
            print("Writing model shards: 100%", file=sys.stderr)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", _read_all(controller).decode())  # colours, cursor moves
    os.close(controller)
    assert "done saving the merged model" in shown and "⠋" in shown  # the spinner ran: it is a terminal
    assert "Writing model shards" not in shown
    assert "Writing model shards: 100%" in capsys.readouterr().err


def _read_all(controller: int) -> bytes:
    """Everything the terminal received: one read returns only what one write put there (a loaded machine splits
    the spinner's frames and the done line over several); after the terminal's end closes, a read raises EIO."""
    import os

    received = b""
    while True:
        try:
            chunk = os.read(controller, 1 << 16)
        except OSError:
            return received
        if not chunk:
            return received
        received += chunk
