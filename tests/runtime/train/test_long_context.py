"""Long-context training (issue 15): QLoRA keeps its non-quantized weights in the compute dtype, so attention
stays 16-bit and SDPA takes a fused kernel; Liger's kernels on CUDA only.

The CPU tests run in CI. The CUDA tests skip without a GPU; they ran on an H200 through the device machine
(result recorded in benchmarks/results/long-context-tests-h200.txt)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmplan.planner.model_catalog import MODELS  # noqa: E402
from llmplan.runtime.models.modeling import (  # noqa: E402
    LoraSettings,
    build_random_model,
    kernels_that_run,
    load_pretrained,
    prepare_for_training,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _seeded_adapters(model) -> None:
    """PEFT starts lora_B at zero, which leaves lora_A's gradient zero: give both the same random start."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(_lora_tensors(model).items()):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype) * 0.02)


def _kbit_upcast_path(model, gradient_checkpointing: bool, lora: LoraSettings):
    """The recipe before issue 15: PEFT's k-bit preparation upcasts every non-quantized weight to fp32."""
    from peft import prepare_model_for_kbit_training

    from llmplan.runtime.models.modeling import apply_lora

    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, lora)
    model.train()
    return model


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    _seeded_adapters(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.float().flatten() for name, p in _lora_tensors(model).items()}


def _assert_close(new: tuple[float, dict], old: tuple[float, dict], loss_rtol: float, min_cosine: float) -> None:
    (new_loss, new_grads), (old_loss, old_grads) = new, old
    assert new_loss == pytest.approx(old_loss, rel=loss_rtol)
    assert new_grads.keys() == old_grads.keys()
    for name in new_grads:
        cosine = torch.nn.functional.cosine_similarity(new_grads[name], old_grads[name], dim=0)
        assert cosine > min_cosine, (name, float(cosine))
        assert float(new_grads[name].norm()) == pytest.approx(float(old_grads[name].norm()), rel=0.05), name


# ---- CPU (CI) ---------------------------------------------------------------------------------------
def test_qlora_keeps_the_non_quantized_weights_in_the_compute_dtype(tiny_llama, tiny_alpaca, tmp_path: Path) -> None:
    from llmplan.runtime.train.train import PRECISIONS, build_model
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    config = TrainConfig(model=str(tiny_llama), data=DataConfig(path=str(tiny_alpaca)), output_dir=str(tmp_path),
                         method="qlora", device="cpu", gradient_checkpointing=True)
    model = build_model(config, PRECISIONS["bf16-true"], torch.device("cpu"))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    adapters = {dtype for name, dtype in dtypes.items() if "lora_" in name}
    base = {dtype for name, dtype in dtypes.items() if "lora_" not in name and dtype.is_floating_point}
    assert adapters == {torch.float32}  # PEFT's autocast_adapter_dtype: the adapters train in fp32
    assert base == {torch.bfloat16}  # PEFT's k-bit preparation made the norms and embeddings fp32
    hidden = model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert {h.dtype for h in hidden} == {torch.bfloat16}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_bf16_qlora_matches_the_fp32_norm_path_on_cpu(tiny_llama, gradient_checkpointing: bool) -> None:
    lora = LoraSettings(r=8, alpha=16)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    new = prepare_for_training(load_pretrained(str(tiny_llama), "bf16", "nf4", "cpu"), "qlora",
                               gradient_checkpointing, lora)
    old = _kbit_upcast_path(load_pretrained(str(tiny_llama), "bf16", "nf4", "cpu"), gradient_checkpointing, lora)
    assert old.base_model.model.model.norm.weight.dtype == torch.float32  # the two paths do differ
    _assert_close(_loss_and_grads(new, ids), _loss_and_grads(old, ids), loss_rtol=1e-2, min_cosine=0.99)


def test_liger_runs_only_on_cuda_and_supported_architectures() -> None:
    assert kernels_that_run(None, "llama", "cpu") == "none"
    assert kernels_that_run("liger", "llama", "cpu") == "none"
    assert kernels_that_run(None, "llama", "cuda") == "liger"
    assert kernels_that_run(None, "phi3", "cuda") == "none"
    assert kernels_that_run("none", "qwen2", "cuda") == "none"
    assert kernels_that_run("liger", "llama", "cuda", (6, 1)) == "none"  # a P40: Triton needs 7.0+
    assert kernels_that_run("liger", "llama", "cuda", (7, 5)) == "liger"
    with pytest.raises(ValueError, match="liger or none"):
        kernels_that_run("triton", "llama", "cuda")


def test_without_the_liger_package_a_default_run_goes_without_and_an_explicit_ask_says_what_to_install() -> None:
    assert kernels_that_run(None, "llama", "cuda", liger_installed=False) == "none"
    assert kernels_that_run("none", "llama", "cuda", liger_installed=False) == "none"
    with pytest.raises(ValueError, match=r"pip install 'llmplan\[gpu\]'"):
        kernels_that_run("liger", "llama", "cuda", liger_installed=False)
    assert kernels_that_run("liger", "llama", "cpu", liger_installed=False) == "none"  # never on the CPU anyway


# ---- CUDA (device machine) --------------------------------------------------------------------------
def _small_gqa_llama(root: Path) -> Path:
    """A 4-layer grouped-query Llama (8 query heads, 2 KV heads), saved in bf16 for the NF4 loader."""
    spec = dataclasses.replace(next(m for m in MODELS if m.name == "Llama-3-8B"), name="gqa-small", hidden_size=512,
                               intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                               vocab_size=2048)
    torch.manual_seed(0)
    build_random_model(spec, "bf16", "cuda").save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return _small_gqa_llama(tmp_path_factory.mktemp("gqa-llama"))


def _fused_sdpa_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _cuda_ids() -> torch.Tensor:
    return torch.randint(0, 2048, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()


@cuda
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_cuda_qlora_step_takes_a_fused_sdpa_kernel_and_matches_the_fp32_norm_path(
        gqa_llama: Path, gradient_checkpointing: bool) -> None:
    lora = LoraSettings(r=16, alpha=32)
    ids = _cuda_ids()
    new = prepare_for_training(load_pretrained(str(gqa_llama), "bf16", "nf4", "cuda"), "qlora",
                               gradient_checkpointing, lora)
    with _fused_sdpa_only():  # the math kernel is off: a fallback raises "No available kernel"
        fused = _loss_and_grads(new, ids)
    old = _kbit_upcast_path(load_pretrained(str(gqa_llama), "bf16", "nf4", "cuda"), gradient_checkpointing, lora)
    with _fused_sdpa_only(), pytest.raises(RuntimeError):  # the old path's fp32 GQA needs the math kernel
        old(input_ids=ids, labels=ids).loss.backward()
    old.zero_grad(set_to_none=True)
    _assert_close(fused, _loss_and_grads(old, ids), loss_rtol=1e-2, min_cosine=0.99)


@cuda
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_cuda_lora_step_takes_a_fused_sdpa_kernel_and_matches_fp32(gqa_llama: Path,
                                                                    gradient_checkpointing: bool) -> None:
    lora = LoraSettings(r=16, alpha=32)
    ids = _cuda_ids()
    new = prepare_for_training(load_pretrained(str(gqa_llama), "bf16", "none", "cuda"), "lora",
                               gradient_checkpointing, lora)
    with _fused_sdpa_only():
        fused = _loss_and_grads(new, ids)
    reference = prepare_for_training(load_pretrained(str(gqa_llama), "fp32", "none", "cuda"), "lora",
                                     gradient_checkpointing, lora)
    _assert_close(fused, _loss_and_grads(reference, ids), loss_rtol=1e-2, min_cosine=0.99)


@cuda
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cuda_liger_kernels_match_the_plain_modules(gqa_llama: Path, method: str) -> None:
    pytest.importorskip("liger_kernel")
    lora = LoraSettings(r=16, alpha=32)
    ids = _cuda_ids()
    quant = "nf4" if method == "qlora" else "none"
    with _fused_sdpa_only():
        liger = _loss_and_grads(prepare_for_training(load_pretrained(str(gqa_llama), "bf16", quant, "cuda"), method,
                                                     True, lora, kernels="liger"), ids)
        plain = _loss_and_grads(prepare_for_training(load_pretrained(str(gqa_llama), "bf16", quant, "cuda"), method,
                                                     True, lora, kernels="none"), ids)
    _assert_close(liger, plain, loss_rtol=1e-2, min_cosine=0.99)


# ---- activation offload (CPU: CI) -------------------------------------------------------------------
def test_activation_offload_keeps_loss_and_gradients_and_checkpoints_every_layer_through_it(tiny_llama) -> None:
    from llmplan.runtime.models.modeling import checkpoint_offloading_inputs

    lora = LoraSettings(r=8, alpha=16)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for offload in (False, True):
        model = prepare_for_training(load_pretrained(str(tiny_llama), "fp32", "none", "cpu"), "lora", True, lora,
                                     activation_offload=offload)
        layers = model.base_model.model.model.layers
        assert all((layer._gradient_checkpointing_func is checkpoint_offloading_inputs) == offload for layer in layers)
        results[offload] = _loss_and_grads(model, ids)
    (loss, grads), (offloaded_loss, offloaded_grads) = results[False], results[True]
    assert offloaded_loss == loss
    assert offloaded_grads.keys() == grads.keys()
    assert all(torch.equal(offloaded_grads[name], grads[name]) for name in grads)


def test_activation_offload_needs_gradient_checkpointing(tiny_llama) -> None:
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        prepare_for_training(load_pretrained(str(tiny_llama), "fp32", "none", "cpu"), "lora", False,
                             LoraSettings(r=8, alpha=16), activation_offload=True)


@cuda
def test_cuda_activation_offload_moves_the_checkpointed_inputs_off_the_gpu(gqa_llama: Path) -> None:
    lora = LoraSettings(r=16, alpha=32)
    ids = torch.randint(0, 2048, (1, 8192), generator=torch.Generator().manual_seed(0)).cuda()
    kept_after_forward, results = {}, {}
    for offload in (False, True):
        model = prepare_for_training(load_pretrained(str(gqa_llama), "bf16", "none", "cuda"), "lora", True, lora,
                                     activation_offload=offload)
        _seeded_adapters(model)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        kept_after_forward[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
        results[offload] = loss.item(), {name: p.grad.float().flatten() for name, p in _lora_tensors(model).items()}
        del model, loss
    checkpointed_inputs = 4 * 8192 * 512 * 2  # layers x tokens x hidden x bf16
    assert kept_after_forward[False] - kept_after_forward[True] >= 0.9 * checkpointed_inputs
    _assert_close(results[True], results[False], loss_rtol=1e-3, min_cosine=0.999)


def test_train_config_activation_offload_needs_gradient_checkpointing(tmp_path: Path) -> None:
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig, TrainConfigError

    data = DataConfig(path=str(tmp_path / "data.jsonl"))
    assert TrainConfig(model="m", data=data, output_dir=str(tmp_path), gradient_checkpointing=True,
                       activation_offload=True).activation_offload
    with pytest.raises(TrainConfigError, match="needs gradient_checkpointing"):
        TrainConfig(model="m", data=data, output_dir=str(tmp_path), activation_offload=True)


def test_the_recipe_offloads_activations_when_its_config_says_so(tiny_llama, tiny_alpaca, tmp_path: Path) -> None:
    from llmplan.runtime.models.modeling import checkpoint_offloading_inputs
    from llmplan.runtime.train.train import PRECISIONS, build_model
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    config = TrainConfig(model=str(tiny_llama), data=DataConfig(path=str(tiny_alpaca)), output_dir=str(tmp_path),
                         method="lora", device="cpu", gradient_checkpointing=True, activation_offload=True)
    model = build_model(config, PRECISIONS["fp32"], torch.device("cpu"))
    layers = model.base_model.model.model.layers
    assert all(layer._gradient_checkpointing_func is checkpoint_offloading_inputs for layer in layers)


def test_generation_takes_liger_layer_kernels_on_cuda_for_16_bit_weights_only() -> None:
    from llmplan.runtime.models.modeling import inference_kernels_that_run

    assert inference_kernels_that_run("llama", "cuda", "none", (9, 0), liger_installed=True) == "liger"
    assert inference_kernels_that_run("llama", "cuda", "nf4", (9, 0), liger_installed=True) == "none"
    assert inference_kernels_that_run("llama", "cuda", "int8", (9, 0), liger_installed=True) == "none"
    assert inference_kernels_that_run("llama", "cuda", "none", (9, 0), liger_installed=False) == "none"
    assert inference_kernels_that_run("llama", "cpu", "none", None, liger_installed=True) == "none"
    assert inference_kernels_that_run("phi3", "cuda", "none", (9, 0), liger_installed=True) == "none"
    assert inference_kernels_that_run("llama", "cuda", "none", (6, 1), liger_installed=True) == "none"
