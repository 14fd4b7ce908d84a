"""Regional compilation in the training recipe (issue 15's LoRA speed target): each decoder layer through
torch.compile, for LoRA on CUDA where the run pays the compile back; off on the CPU. Whether it trains as eager
does and how fast it runs was measured on an H200 (benchmarks/compile_grad_probe.py, long_context_bench.py
--group speed; BENCHMARKS.md); here, the decision and the preparation it leads to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmplan.runtime.models.modeling import (  # noqa: E402
    LoraSettings,
    compiled_layers,
    load_pretrained,
    prepare_for_training,
)
from llmplan.runtime.train.train import (  # noqa: E402
    COMPILE_BREAK_EVEN_FLOPS,
    COMPILE_BY_DEFAULT,
    compile_pays_back,
    compile_that_runs,
)
from llmplan.runtime.train.train_config import DataConfig, TrainConfig, TrainConfigError  # noqa: E402

LLAMA3_8B_PARAMETERS = 8_030_000_000
LORA_ON_CUDA = TrainConfig(model="m", data=DataConfig(path="d.jsonl"), output_dir="o", method="lora",
                           precision="bf16-true", device="cuda")


def test_lora_on_cuda_compiles_its_layers_once_the_run_pays_the_compile_back() -> None:
    break_even = COMPILE_BREAK_EVEN_FLOPS / (4 * LLAMA3_8B_PARAMETERS)  # ~1M tokens for an 8B model
    assert 0.5e6 < break_even < 2e6
    assert compile_pays_back(LLAMA3_8B_PARAMETERS, int(2 * break_even))
    assert not compile_pays_back(LLAMA3_8B_PARAMETERS, int(break_even / 2))
    assert COMPILE_BY_DEFAULT  # adopted after the H200 probe (benchmarks/results/compile-grad-h200.jsonl)
    assert compile_that_runs(LORA_ON_CUDA, LLAMA3_8B_PARAMETERS, int(2 * break_even)) == "layers"
    assert compile_that_runs(LORA_ON_CUDA, LLAMA3_8B_PARAMETERS, int(break_even / 2)) == "none"
    asked = dataclasses.replace(LORA_ON_CUDA, compile="layers")
    assert compile_that_runs(asked, LLAMA3_8B_PARAMETERS, 4096) == "layers"


@pytest.mark.parametrize("change", [
    {"compile": "none"},  # the user's choice
    {"device": "cpu"},  # Inductor's kernels are for the GPU; the CPU recipe stays eager
    {"method": "qlora"},  # not measured: 4-bit base
    {"method": "full"},  # not measured
    {"gradient_checkpointing": True},  # not measured: recomputed compiled layers
    {"precision": "fp16-mixed"},  # not measured: autocast
    {"backend": "deepspeed", "zero": 2, "workers": 2},  # not measured
])
def test_regional_compilation_stays_off_where_it_was_not_measured(change: dict) -> None:
    config = dataclasses.replace(LORA_ON_CUDA, **change)
    assert compile_that_runs(config, LLAMA3_8B_PARAMETERS, 10**9) == "none"
    if "compile" not in change:
        assert compile_that_runs(dataclasses.replace(config, compile="layers"), LLAMA3_8B_PARAMETERS, 10**9) == "none"


def test_compile_accepts_layers_or_none_only() -> None:
    with pytest.raises(TrainConfigError, match="compile must be layers or none"):
        dataclasses.replace(LORA_ON_CUDA, compile="max-autotune")


def test_compiled_preparation_wraps_every_decoder_layer_with_its_adapters(tiny_llama: Path) -> None:
    """prepare_for_training(compile_layers=True) compiles each decoder layer after PEFT has put the adapters
    in it (the graph is built at the first forward, which this test does not run: CI has no time for
    Inductor); without it nothing is compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lora = LoraSettings(4, 8, 0.0)
    eager = prepare_for_training(load_pretrained(str(tiny_llama), "fp32", "none", "cpu"), "lora", False, lora)
    compiled = prepare_for_training(load_pretrained(str(tiny_llama), "fp32", "none", "cpu"), "lora", False, lora,
                                    compile_layers=True)
    assert not compiled_layers(eager) and compiled_layers(compiled)
    layers = [m for m in compiled.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert all(any("lora_A" in name for name, _ in layer.named_parameters()) for layer in layers)


def test_the_run_summary_records_that_a_cpu_run_did_not_compile(tiny_trained: dict[str, Path]) -> None:
    summary = json.loads((tiny_trained["lora"].parent / "summary.json").read_text())
    assert summary["recipe"] == {"compile": "none"}


@pytest.mark.parametrize(("words", "expected"), [((), None), (("--compile", "none"), "none"),
                                                 (("--compile", "layers"), "layers")])
def test_submit_finetune_carries_compile_into_the_run_config(words: tuple[str, ...], expected: str | None,
                                                             tmp_path: Path) -> None:
    from llmplan.cli.submit import submit_finetune
    from llmplan.runtime.jobs.submission import FinetuneSubmission, plan_training, submission_from

    data = Path(__file__).resolve().parents[3] / "examples" / "data" / "alpaca_llmplan.jsonl"
    options = submit_finetune.make_context("finetune", ["--model", "SmolLM2-135M", "--data", str(data), *words]).params
    config = plan_training(submission_from(FinetuneSubmission, options), lambda gpus: None, None, tmp_path)[1]
    assert config.compile == expected


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@cuda
def test_cuda_compiled_lora_layers_train_like_eager_on_padded_batches_of_changing_width(tiny_llama: Path) -> None:
    """What the recipe feeds a compiled model beyond the measured dense rows: right-padded batches (an attention
    mask) whose width changes from step to step (Dynamo recompiles once, then with dynamic shapes), and the
    evaluation's no-grad forward in eval mode."""
    from llmplan.runtime.models.modeling import make_optimizer

    def run(compile_layers: bool) -> tuple[list[float], float, bool]:
        torch.manual_seed(0)
        model = prepare_for_training(load_pretrained(str(tiny_llama), "bf16", "none", "cuda"), "lora", False,
                                     LoraSettings(8, 16, 0.0), compile_layers=compile_layers)
        optimizer = make_optimizer(model, "adamw", 1e-3)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for width in (48, 64, 40, 64, 56, 48):
            ids = torch.randint(0, 320, (2, width), generator=generator).cuda()
            mask = torch.ones_like(ids)
            mask[1, width // 2:] = 0  # the second row is half padding
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            evaluated = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
        return losses, evaluated, compiled_layers(model)

    eager, eager_eval, _ = run(False)
    compiled, compiled_eval, was_compiled = run(True)
    assert was_compiled
    assert compiled == pytest.approx(eager, abs=0.05), (eager, compiled)
    assert compiled_eval == pytest.approx(eager_eval, abs=0.05)
