"""The fit search with catalog GPUs: what fits, what is recommended, and what to do when nothing fits."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from llmplan.planner.estimator import estimate
from llmplan.planner.gpus import GpuProbe, GpuSpec, ProbedGpu, lookup_gpu, match_nvml_name
from llmplan.planner.hardware import (
    Hardware,
    HardwareError,
    deepspeed_preflight,
    find_nvcc,
    plan_hardware,
)
from llmplan.planner.request import EstimateRequest, Kernels, Method, Offload, Precision, Quant, Task
from llmplan.planner.resolve import find_model
from llmplan.planner.search import (
    SLOTS_MAX_BATCH,
    Backend,
    FitError,
    FitRequest,
    finetune_strategies,
    precisions_for,
    search,
    slow_precisions,
)
from llmplan.planner.units import GiB

LLAMA7, LLAMA70 = find_model("Llama-2-7B"), find_model("Llama-2-70B")


def hardware(gpu: str, count: int = 1) -> Hardware:
    spec = lookup_gpu(gpu)
    return Hardware(spec, count, spec.memory_bytes, "catalog")


def fit(model=LLAMA7, gpu: str = "RTX 4090", count: int = 1, **kwargs) -> FitRequest:
    kwargs.setdefault("deepspeed", False)
    return FitRequest(model=model, hardware=hardware(gpu, count), **kwargs)


# ---- 7B on one 24 GB card -----------------------------------------------------------------------------
def test_7b_inference_in_16_bit_fits_one_24gb_card() -> None:
    best = search(fit(task=Task.INFER)).best
    assert best.quant is Quant.NONE and best.precision is Precision.BF16_TRUE
    assert best.strategy.label == "1 GPU"


def test_7b_full_fine_tuning_does_not_fit_one_24gb_card() -> None:
    result = search(fit(methods=(Method.FULL,)))
    assert not result.feasible
    assert result.nearest.method is Method.FULL and result.nearest.memory_bytes > 2 * result.request.budget_bytes
    # With DeepSpeed it fits only by moving state to the CPU.
    with_offload = search(fit(deepspeed=True)).candidates
    full = [c for c in with_offload if c.method is Method.FULL]
    assert full and all(c.strategy.offload is not Offload.NONE for c in full)


def test_7b_lora_needs_checkpointing_or_small_micro_batches() -> None:
    result = search(fit(methods=(Method.LORA,), batch_size=16, seq_len=512))
    assert result.feasible
    for candidate in result.candidates:
        assert candidate.checkpointing or candidate.micro_batch <= 2
    whole_batch = EstimateRequest(model=LLAMA7, method=Method.LORA, micro_batch_size=16, seq_len=512)
    assert estimate(whole_batch).device_bytes > result.request.budget_bytes


def test_7b_qlora_fits_one_24gb_card() -> None:
    result = search(fit(methods=(Method.QLORA,)))
    assert result.feasible and result.best.quant is Quant.NF4


def test_7b_auto_recommends_the_fastest_method_that_fits() -> None:
    result = search(fit())
    speeds = [c.tokens_per_s for c in result.candidates]
    assert speeds == sorted(speeds, reverse=True)
    assert result.best.method is Method.LORA  # 4N FLOPs beat QLoRA's dequantization; full does not fit


# ---- 70B -------------------------------------------------------------------------------------------------
def test_70b_on_one_80gb_card_is_qlora_only() -> None:
    result = search(fit(LLAMA70, "A100 80GB"))
    assert result.feasible and {c.method for c in result.candidates} == {Method.QLORA}
    with_deepspeed = search(fit(LLAMA70, "A100 80GB", deepspeed=True))
    assert with_deepspeed.best.method is Method.QLORA
    on_gpu = [c for c in with_deepspeed.candidates if c.strategy.offload is Offload.NONE]
    assert {c.method for c in on_gpu} == {Method.QLORA}


def test_70b_inference_on_two_80gb_cards_is_sharded_16_bit() -> None:
    result = search(fit(LLAMA70, "H100 SXM", 2, task=Task.INFER))
    best = result.best
    assert best.quant is Quant.NONE and best.strategy.shard == 2 and best.strategy.replicas == 1
    assert not any(c.quant is Quant.NONE and c.strategy.replicas == 2 for c in result.candidates)
    assert estimate(best.request).device_bytes <= result.request.budget_bytes


# ---- the slots engine's batch: the fastest that fits ------------------------------------------------------------
def _slots_fit(gpu: str = "H200", count: int = 1, **kwargs) -> FitRequest:
    return fit(LLAMA7, gpu, count, task=Task.INFER, **{"prompt_len": 32, "max_new_tokens": 256, **kwargs})


def test_slots_batch_is_the_fastest_for_the_prompts_not_the_largest() -> None:
    """257 prompts: two waves on 256 slots or on 129, and 129 slots step faster (the throughput model's waves)."""
    result = search(_slots_fit(max_slots=SLOTS_MAX_BATCH, prompts=257))
    best = result.best
    assert best.request.slots_engine and best.micro_batch == 129
    assert best.throughput.tokens_per_step == 257 * 256
    assert any("batch 129 is the slots engine's slots" in w and "2 waves" in w for w in result.warnings)
    # 300 prompts: 150 slots, two waves.
    assert search(_slots_fit(max_slots=SLOTS_MAX_BATCH, prompts=300)).best.micro_batch == 150


def test_slots_batch_without_a_prompt_count_is_the_cap_or_what_memory_allows() -> None:
    assert search(_slots_fit(max_slots=SLOTS_MAX_BATCH)).best.micro_batch == 256
    small = search(_slots_fit("RTX 4090", max_slots=SLOTS_MAX_BATCH, prompt_len=512))
    slots = small.best.micro_batch
    assert 1 < slots < 256  # 24 GB: the cache of 256 slots does not fit beside 13 GB of weights
    doubled = replace(small.best.request, micro_batch_size=2 * slots)  # the next slot count tried
    assert estimate(doubled).device_bytes > small.request.budget_bytes


def test_batch_size_given_binds_the_slots_and_plain_engines_keep_powers_of_two() -> None:
    assert search(_slots_fit(batch_size=64, prompts=100)).best.micro_batch == 50  # two waves of 50
    assert search(_slots_fit(batch_size=16)).best.micro_batch == 16
    quantized = [c for c in search(_slots_fit(max_slots=SLOTS_MAX_BATCH)).candidates if c.quant is not Quant.NONE]
    assert quantized and all(c.micro_batch == 16 and not c.request.slots_engine for c in quantized)


def test_slots_replicas_each_take_their_share_of_the_prompts() -> None:
    result = search(_slots_fit("H100 SXM", 2, max_slots=SLOTS_MAX_BATCH, prompts=600))
    best = result.best
    assert best.strategy.replicas == 2 and best.micro_batch == 150  # 300 prompts a copy, two waves
    assert any("300 prompts per GPU run in 2 waves" in w for w in result.warnings)


# ---- 7B LoRA on 8 GPUs: DeepSpeed or not ------------------------------------------------------------------
def _eight_t4(deepspeed: bool):
    # A 16 GB T4 cannot hold the 7B fp16 base plus 2048-token activations: the weights must be sharded.
    return search(fit(gpu="T4", count=8, methods=(Method.LORA,), seq_len=2048, batch_size=16, deepspeed=deepspeed))


def test_7b_lora_on_8_gpus_with_deepspeed_shards_with_zero3() -> None:
    result = _eight_t4(deepspeed=True)
    assert result.best.strategy.backend is Backend.DEEPSPEED and result.best.strategy.zero == 3
    assert all(c.precision is Precision.FP16_TRUE for c in result.candidates)  # T4: no bf16


def test_7b_lora_on_8_gpus_without_nvcc_uses_fsdp() -> None:
    result = _eight_t4(deepspeed=False)
    assert result.feasible
    assert not any(c.strategy.uses_deepspeed for c in result.candidates)
    assert result.best.strategy.backend is Backend.FSDP and result.best.strategy.fsdp_mode == "full-shard"


def test_lora_that_fits_one_card_runs_plain_ddp_on_eight() -> None:
    result = search(fit(gpu="A100 80GB", count=8, methods=(Method.LORA,), batch_size=64, deepspeed=True))
    assert result.best.strategy.backend is Backend.DDP


def test_strategies_offer_deepspeed_only_when_it_can_run() -> None:
    assert not any(s.uses_deepspeed for s in finetune_strategies(8, deepspeed=False))
    assert {s.backend for s in finetune_strategies(8, deepspeed=True)} == {Backend.DDP, Backend.DEEPSPEED}
    assert [s.backend for s in finetune_strategies(1, deepspeed=False)] == [Backend.SINGLE]


# ---- precision per card ------------------------------------------------------------------------------------
def test_p40_never_gets_bf16_and_plans_fp32_compute() -> None:
    for task in (Task.FINETUNE, Task.INFER):
        result = search(fit(gpu="P40", task=task))
        assert not any(c.precision.uses_bf16 for c in result.candidates)
        assert result.best.precision is Precision.FP32
    assert search(fit(gpu="P40")).best.method is Method.QLORA  # 7B fp32 weights do not fit 24 GB


def test_liger_is_planned_only_on_cards_whose_compute_capability_triton_compiles_for() -> None:
    """Liger's kernels are Triton (compute capability 7.0+): a P40 (6.1) plans without them, a T4 (7.5) with."""
    for gpu, kernels in (("P40", Kernels.NONE), ("T4", Kernels.LIGER)):
        best = search(fit(gpu=gpu, kernels=Kernels.LIGER, methods=(Method.QLORA,))).best
        assert best.request.kernels is kernels, gpu


def test_p40_time_estimate_reflects_its_slow_fp16() -> None:
    result = search(fit(gpu="P40", methods=(Method.LORA,), tokens=1_000_000))
    fp16 = [c for c in result.candidates if c.precision is Precision.FP16_TRUE]
    assert fp16, "LoRA with 16-bit weights fits a P40; it is just slow"
    qlora = search(fit(gpu="P40", methods=(Method.QLORA,), tokens=1_000_000)).best
    assert qlora.precision is Precision.FP32
    assert fp16[0].seconds_for(1e6) > 20 * qlora.seconds_for(1e6)
    assert any("1/65" in warning or "1/64" in warning for warning in result.warnings)


@pytest.mark.parametrize(("gpu", "expected"), [("V100 16GB", Precision.FP16_TRUE), ("T4", Precision.FP16_TRUE),
                                                ("A100 80GB", Precision.BF16_TRUE)])
def test_16_bit_precision_per_card(gpu: str, expected: Precision) -> None:
    assert precisions_for(lookup_gpu(gpu), Method.LORA) == (expected,)
    assert not slow_precisions(lookup_gpu(gpu))


def test_full_fine_tuning_gets_mixed_precision_too() -> None:
    assert precisions_for(lookup_gpu("H100"), Method.FULL) == (Precision.BF16_TRUE, Precision.BF16_MIXED)
    assert precisions_for(lookup_gpu("V100 32GB"), Method.FULL) == (Precision.FP16_MIXED,)


def test_no_int8_inference_where_bitsandbytes_cannot_run_it() -> None:
    result = search(fit(gpu="V100 32GB", task=Task.INFER))
    assert not any(c.quant is Quant.INT8 for c in result.candidates)
    assert any("LLM.int8()" in warning for warning in result.warnings)


# ---- invariants over many plans -----------------------------------------------------------------------------
SCENARIOS = [
    dict(),
    dict(task=Task.INFER),
    dict(model=LLAMA70, gpu="A100 80GB"),
    dict(model=LLAMA70, gpu="H100 SXM", count=2, task=Task.INFER),
    dict(gpu="T4", count=8, methods=(Method.LORA,), seq_len=2048, deepspeed=True),
    dict(gpu="P40"),
    dict(gpu="A10", count=4, batch_size=32, seq_len=1024, deepspeed=True),
    dict(model=find_model("Mixtral-8x7B"), gpu="H100 SXM", count=8, batch_size=64, deepspeed=True),
    dict(model=find_model("Qwen2.5-7B"), gpu="L4", task=Task.INFER, batch_size=8),
    dict(gpu="RTX 4090", margin=0.3),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=range(len(SCENARIOS)))
def test_every_candidate_fits_in_the_budget_and_covers_the_global_batch(scenario: dict) -> None:
    scenario = dict(scenario)
    args = {key: scenario.pop(key) for key in ("model", "gpu", "count") if key in scenario}
    request = fit(**args, **scenario)
    result = search(request)
    assert result.feasible
    budget = int(request.hardware.memory_bytes * (1 - request.margin))
    for candidate in result.candidates:
        assert estimate(candidate.request).device_bytes == candidate.memory_bytes <= budget
        if request.task is Task.FINETUNE:
            ranks = request.hardware.count
            assert candidate.micro_batch * candidate.grad_accum * ranks == request.batch_size


def test_the_largest_fitting_micro_batch_is_found_without_estimating_every_one() -> None:
    request = fit(gpu="H100 SXM", methods=(Method.LORA,), batch_size=256, seq_len=256)
    result = search(request)
    families = 2  # LoRA bf16 on one GPU, with and without checkpointing
    divisors = 9  # of 256
    assert result.considered < families * divisors
    best = result.best
    bigger = replace(best.request, micro_batch_size=best.micro_batch * 2)
    assert best.micro_batch == 256 or estimate(bigger).device_bytes > result.request.budget_bytes


def test_search_is_fast() -> None:
    started = time.perf_counter()
    search(fit(gpu="A10", count=8, batch_size=64, deepspeed=True))
    assert time.perf_counter() - started < 0.5


def test_dominated_offload_and_zero_variants_are_not_listed() -> None:
    result = search(fit(methods=(Method.LORA,), deepspeed=True))
    assert all(c.strategy.backend is Backend.SINGLE for c in result.candidates)


# ---- nothing fits ----------------------------------------------------------------------------------------------
def test_nothing_fits_says_how_close_and_what_would() -> None:
    result = search(fit(LLAMA70, "RTX 4090"))
    assert not result.feasible and result.best is None
    assert result.nearest.method is Method.QLORA and result.nearest.checkpointing
    assert any("nothing fits" in reason for reason in result.reasons)
    changes = {s.change: s for s in result.suggestions}
    more = changes["gpus"]
    assert more.candidate is not None and "--gpus 2" in more.text
    assert "deepspeed" in changes and "memory" in changes
    needed = float(changes["memory"].text.split("at least ")[1].split(" GiB")[0])
    assert needed * GiB * (1 - result.request.margin) >= result.nearest.memory_bytes


def test_nothing_fits_can_suggest_a_shorter_sequence_or_qlora() -> None:
    result = search(fit(gpu="T4", methods=(Method.LORA,), seq_len=4096, batch_size=1))
    changes = {s.change: s for s in result.suggestions}
    assert "--seq-len" in changes["seq_len"].text and changes["seq_len"].candidate.request.seq_len < 4096
    assert changes["method"].candidate.method is Method.QLORA


def test_qlora_on_a_card_bitsandbytes_cannot_use_says_so() -> None:
    old = Hardware(GpuSpec(name="K80", compute_capability=(3, 7), memory_gb=12), 1, 12 * 10**9, "catalog")
    result = search(FitRequest(model=LLAMA7, hardware=old, methods=(Method.QLORA,)))
    assert not result.feasible and "bitsandbytes" in result.reasons[0]


def test_a_global_batch_must_split_over_the_gpus() -> None:
    with pytest.raises(FitError, match="multiple of 4"):
        fit(count=4, batch_size=10)
    with pytest.raises(FitError, match="--margin"):
        fit(margin=1.0)


# ---- hardware -----------------------------------------------------------------------------------------------
def _probed(name: str, total_gib: float, free_gib: float, index: int = 0, cc=(9, 0)) -> ProbedGpu:
    total, free = int(total_gib * GiB), int(free_gib * GiB)
    return ProbedGpu(index=index, name=name, uuid=f"GPU-{index}", memory_total_bytes=total, memory_used_bytes=total - free,
                     memory_free_bytes=free, compute_capability=cc, catalog=match_nvml_name(name))


def test_hardware_from_nvml_plans_with_the_free_memory_of_the_fullest_gpu() -> None:
    probe = GpuProbe(gpus=(_probed("NVIDIA H100 80GB HBM3", 79.6, 70.0), _probed("NVIDIA H100 80GB HBM3", 79.6, 60.0, 1)))
    found = plan_hardware(None, None, None, lambda: probe)
    assert (found.gpu.name, found.count, found.memory_bytes, found.source) == ("H100 SXM", 2, int(60.0 * GiB), "nvml")
    assert any("in use by other processes" in note for note in found.notes)
    one = plan_hardware(1, None, None, lambda: probe)
    assert one.memory_bytes == int(70.0 * GiB)


def test_hardware_without_nvml_is_the_default_card_with_a_notice() -> None:
    found = plan_hardware(None, None, None, lambda: GpuProbe(reason="no NVIDIA driver found"))
    assert found.source == "default" and found.count == 1 and found.gpu.name == "RTX 4090"
    assert found.notice.startswith("no GPU found: planning for 1 x RTX 4090")
    assert plan_hardware(4, None, None, lambda: GpuProbe()).notice.startswith("no GPU found: planning for 4 x")


def test_named_hardware_never_probes() -> None:
    def probe() -> GpuProbe:
        raise AssertionError("NVML must not be asked when the card is named")

    assert plan_hardware(2, "A100 80GB", None, probe).memory_bytes == lookup_gpu("A100 80GB").memory_bytes
    sized = plan_hardware(1, None, "16GiB", probe)
    assert sized.memory_bytes == 16 * GiB and sized.source == "user" and sized.gpu.bf16
    like = plan_hardware(1, "T4", "12GiB", probe)
    assert like.gpu.compute_capability == (7, 5) and like.memory_bytes == 12 * GiB


@pytest.mark.parametrize(("gpus", "name", "mem", "message"), [
    (1, "A100", None, "more than one card"),
    (1, "Z9000", None, "unknown GPU"),
    (1, None, "24", "no unit"),
    (0, "H100", None, "at least 1"),
])
def test_bad_hardware_options_say_what_to_pass(gpus, name, mem, message) -> None:
    with pytest.raises(HardwareError, match=message):
        plan_hardware(gpus, name, mem, lambda: GpuProbe())


def test_nvcc_is_found_on_path_or_in_cuda_home() -> None:
    assert find_nvcc(lambda _: "/usr/bin/nvcc", {}, lambda _: False) == "/usr/bin/nvcc"
    assert find_nvcc(lambda _: None, {"CUDA_HOME": "/opt/cuda"}, lambda path: path == "/opt/cuda/bin/nvcc") == "/opt/cuda/bin/nvcc"
    assert find_nvcc(lambda _: None, {"CUDA_HOME": "/opt/cuda"}, lambda _: False) is None
    assert find_nvcc(lambda _: None, {}, lambda _: True) is None


def test_deepspeed_preflight_follows_nvcc_unless_overridden() -> None:
    assert deepspeed_preflight(None, "/usr/bin/nvcc").deepspeed
    missing = deepspeed_preflight(None, None)
    assert not missing.deepspeed and "nvcc" in missing.reason and "DDP and FSDP" in missing.reason
    assert deepspeed_preflight(True, None).deepspeed
    assert not deepspeed_preflight(False, "/usr/bin/nvcc").deepspeed
