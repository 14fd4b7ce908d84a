"""The throughput model against the H200 measurements, its FLOP counts, and the P40 run it grew from.

Fitted runs: `benchmarks/results/memory-h200.jsonl` (the constants were fitted on them by
`benchmarks/fit_throughput.py`); each run the model covers must be within 25% of its measured tokens/s.
Held-out runs (`memory-h200-heldout.jsonl`, never used by the fit) are held to the same 25%, with one
recorded miss. The slots engine's runs (`engine-h200.jsonl`, the current engine's four) are held to 15%.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from llmplan.planner import throughput as tp
from llmplan.planner.calibration import load_runs, request_from_case
from llmplan.planner.gpus import lookup_gpu
from llmplan.planner.request import (
    Engine,
    EstimateRequest,
    LoraSpec,
    Method,
    Offload,
    Parallelism,
    Precision,
    Quant,
    Task,
)
from llmplan.planner.resolve import find_model

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
H200 = lookup_gpu("H200")
P40 = lookup_gpu("P40")
TARGET = 0.25

# Runs the model does not claim to cover (same list as benchmarks/fit_throughput.py).
UNCOVERED = {
    # Sliding window (2047) shorter than the 4096-token sequence: SDPA gets an explicit mask and leaves
    # the flash kernel; measured 8,023 tokens/s, modelled ~12,000. The model flags such plans instead.
    "lora-phi3-mini-gc-b4-s4096",
}
# Held-out runs the model misses by more than 25%, and why we think so.
HELD_OUT_MISSES = {
    # nf4 generate at batch 16 on Qwen2.5-1.5B: 84 ms per step against ~64 modelled. The per-layer-call
    # nf4 cost was fitted on batches 4-8 (bitsandbytes dequantizes per call above batch 1).
    "val-inf-qwen25-15b-nf4-b16": "nf4 generate at batch 16 is slower per step than the fitted per-call cost",
    # QLoRA without checkpointing at 4,096 tokens a step on Qwen2.5-3B: 12,455 tokens/s against ~9,150
    # modelled (conservative). The fitted per-call cost of the 4-bit layers weighs less at this many tokens
    # per call than the fitted runs (2,048-8,192 tokens a step, four of five with checkpointing) say.
    "val-qlora-qwen25-3b-b2-s2048": "QLoRA at 4,096 tokens a step runs faster than the fitted per-call cost says",
}

SLOTS_TARGET = 0.15


def _fit_module():
    spec = importlib.util.spec_from_file_location("fit_throughput", RESULTS.parent / "fit_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIT = _fit_module()
SLOTS_RUNS = FIT.slots_runs()
FITTED = load_runs(RESULTS / "memory-h200.jsonl")
HELD_OUT = load_runs(RESULTS / "memory-h200-heldout.jsonl")
COVERED = [run for run in FITTED if run["case"]["id"] not in UNCOVERED]


def predicted(run: dict) -> float:
    req = request_from_case(run["case"])
    if req.task is Task.INFER:
        return tp.generation_throughput(req, H200).tokens_per_s
    return tp.finetune_throughput(req, H200).tokens_per_s


def error(run: dict) -> float:
    return predicted(run) / run["tokens_per_s"] - 1


# ---- against the measurements -------------------------------------------------------------------------
def test_covers_at_least_ten_fine_tuning_and_ten_inference_runs() -> None:
    tasks = [run["case"]["task"] for run in COVERED]
    assert tasks.count("finetune") >= 10 and tasks.count("infer") >= 10
    methods = {run["case"]["method"] for run in COVERED if run["case"]["task"] == "finetune"}
    quants = {run["case"]["quant"] for run in COVERED if run["case"]["task"] == "infer"}
    assert methods == {"full", "lora", "qlora"} and quants == {"none", "int8", "nf4"}


@pytest.mark.parametrize("run", COVERED, ids=[run["case"]["id"] for run in COVERED])
def test_each_covered_run_within_25_percent(run: dict) -> None:
    assert abs(error(run)) <= TARGET, f"predicted {predicted(run):,.0f} vs measured {run['tokens_per_s']:,.0f} tokens/s"


@pytest.mark.parametrize("run", HELD_OUT, ids=[run["case"]["id"] for run in HELD_OUT])
def test_held_out_runs_within_25_percent(run: dict) -> None:
    if run["case"]["id"] in HELD_OUT_MISSES:
        pytest.xfail(HELD_OUT_MISSES[run["case"]["id"]])
    assert abs(error(run)) <= TARGET


@pytest.mark.parametrize("run_id", sorted(HELD_OUT_MISSES))
def test_recorded_held_out_misses_are_still_misses_but_within_35_percent(run_id: str) -> None:
    run = next(run for run in HELD_OUT if run["case"]["id"] == run_id)
    assert TARGET < abs(error(run)) <= 0.35  # fix the model, then drop the run from HELD_OUT_MISSES


def test_the_uncovered_run_is_flagged_as_optimistic() -> None:
    run = next(run for run in FITTED if run["case"]["id"] == "lora-phi3-mini-gc-b4-s4096")
    result = tp.finetune_throughput(request_from_case(run["case"]), H200)
    assert result.tokens_per_s > run["tokens_per_s"]
    assert any("sliding window" in note for note in result.notes)


def test_constants_are_what_the_fit_script_derives() -> None:
    module = FIT
    covered = [run for run in load_runs(module.RESULTS) if run["case"]["id"] not in module.UNCOVERED]
    assert set(module.UNCOVERED) == UNCOVERED
    fitted = {**module.fit_training([r for r in covered if r["case"]["task"] == "finetune"]),
              **module.fit_generation([r for r in covered if r["case"]["task"] == "infer"]),
              **module.fit_slots(module.slots_runs())}
    for name, value in fitted.items():
        assert getattr(tp, name) == pytest.approx(value, rel=0.05), name


# ---- the slots engine ----------------------------------------------------------------------------------------
def test_the_slots_fit_uses_the_written_out_steps_five_runs() -> None:
    """The one run of the four cases (compiled where the call is long enough) and the batch-8 case on Liger's
    kernels; not the earlier engine's runs (transformers' forward captured), nor the forced compiled run."""
    assert sorted((run["batch"], run["prompts"], run["slots_step"]) for run in SLOTS_RUNS) == [
        (8, 64, "compiled"), (8, 64, "liger"), (64, 256, "liger"), (256, 256, "liger"), (256, 2048, "compiled")]
    assert {round(run["tokens_per_s"]) for run in SLOTS_RUNS} == {1020, 1048, 7897, 13173, 14741}


def test_the_plan_compiles_the_step_where_the_engine_does() -> None:
    """The planner's term and the runtime's choice are one function (slots_compile_step)."""
    for run in SLOTS_RUNS:
        if not run.get("step_forced"):
            assert tp.slots_work(FIT.slots_request(run), run["prompts"]).compiled == (run["slots_step"] == "compiled")


@pytest.mark.parametrize("run", SLOTS_RUNS, ids=[f"{run['batch']}-slots-{run['prompts']}-prompts" for run in SLOTS_RUNS])
def test_each_slots_run_within_15_percent(run: dict) -> None:
    predicted = FIT.slots_predicted_tokens_per_s(run)
    assert abs(predicted / run["tokens_per_s"] - 1) <= SLOTS_TARGET, f"predicted {predicted:,.0f} vs {run['tokens_per_s']:,.0f}"


def test_the_slots_engine_is_not_host_bound_and_generate_stays_for_other_requests() -> None:
    shape = dict(micro_batch_size=64, prompt_len=32, max_new_tokens=256)  # the measured runs' shape
    slots = tp.generation_throughput(_infer(**shape), H200, prompts=256)
    generate = tp.generation_throughput(_infer(**shape, engine=Engine.GENERATE), H200)
    assert "decode: host overhead" not in {term.name for term in slots.terms}
    assert "decode: host overhead" in {term.name for term in generate.terms}
    assert slots.tokens_per_s > 5 * generate.tokens_per_s
    nf4 = tp.generation_throughput(_infer(micro_batch_size=64, quant=Quant.NF4), H200)
    assert "decode: host overhead" in {term.name for term in nf4.terms}  # quantized: plain generate


def test_slots_read_the_cache_positions_in_use_in_blocks_of_64() -> None:
    """30-token prompts, 100 new tokens: the steps read 64 positions until the furthest write reaches 64, then 128,
    then 192 (the cache holds 192: 130 rounded up)."""
    work = tp.slots_work(_infer(micro_batch_size=8, prompt_len=30, max_new_tokens=100), prompts=8)
    assert work.steps == 99 and work.graphs == 3
    assert work.visible == pytest.approx((34 * 64 + 64 * 128 + 1 * 192) / 99)


def test_slots_run_in_waves_so_one_prompt_past_the_slots_costs_a_wave() -> None:
    req = _infer(micro_batch_size=256, prompt_len=32, max_new_tokens=256)
    one_wave = tp.slots_work(req, prompts=256)
    two_waves = tp.slots_work(req, prompts=257)
    assert (one_wave.waves, two_waves.waves) == (1, 2) and two_waves.steps == 2 * one_wave.steps
    # 257 prompts: 129 slots do the same two waves with cheaper steps than 256 slots.
    half = tp.generation_throughput(_infer(micro_batch_size=129, prompt_len=32, max_new_tokens=256), H200, prompts=257)
    full = tp.generation_throughput(req, H200, prompts=257)
    assert half.tokens_per_s > full.tokens_per_s
    assert full.tokens_per_step == 257 * 256


def test_slots_refills_prefill_up_to_the_padded_token_budget() -> None:
    # 256 prompts of 40 tokens: 204 per forward (8,192 // 40), so two forwards a wave.
    assert tp.slots_work(_infer(micro_batch_size=256, prompt_len=40), prompts=512).prefill_forwards == 4
    assert tp.slots_work(_infer(micro_batch_size=64, prompt_len=40), prompts=100).prefill_forwards == 2


# ---- FLOPs ---------------------------------------------------------------------------------------------
LLAMA7 = find_model("Llama-2-7B")


def _finetune(method: Method = Method.LORA, **kwargs) -> EstimateRequest:
    return EstimateRequest(model=LLAMA7, method=method, **kwargs)


def test_training_flops_follow_6n_full_4n_lora_and_2n_more_when_recomputing() -> None:
    n = tp.matmul_params(LLAMA7)
    attention = tp.attention_flops_per_token(LLAMA7, 512 / 2)
    full = tp.training_flops_per_token(_finetune(Method.FULL, seq_len=512))
    assert full.total == pytest.approx(6 * n + 3 * attention)
    lora_req = _finetune(seq_len=512)
    adapters = lora_req.lora.params(LLAMA7)
    lora = tp.training_flops_per_token(lora_req)
    assert lora.total == pytest.approx(4 * n + 6 * adapters + 3 * attention)
    recomputed = tp.training_flops_per_token(_finetune(seq_len=512, gradient_checkpointing=True))
    assert recomputed.total - lora.total == pytest.approx(2 * n + 2 * adapters + attention)


def test_matmul_params_count_the_head_and_routed_experts_but_not_the_embedding() -> None:
    assert tp.matmul_params(LLAMA7) == LLAMA7.linear_params + LLAMA7.vocab_size * LLAMA7.hidden_size
    mixtral = find_model("Mixtral-8x7B")
    assert tp.matmul_params(mixtral) < 0.3 * mixtral.params  # 2 of 8 experts per token
    one_token = tp.touched_params_fraction(mixtral, 1)  # one decode step of one sequence reads 2 experts
    assert one_token < 0.35 and one_token < tp.touched_params_fraction(mixtral, 64) <= 1.0
    assert tp.touched_params_fraction(LLAMA7, 64) == 1.0


def test_qlora_adds_dequantization() -> None:
    qlora = tp.finetune_throughput(_finetune(Method.QLORA, micro_batch_size=4), H200)
    lora = tp.finetune_throughput(_finetune(Method.LORA, micro_batch_size=4), H200)
    names = {term.name for term in qlora.terms}
    assert "logits, loss, dequantization" in names and "fp32 output head" not in names  # the head stays bf16
    assert qlora.tokens_per_s < lora.tokens_per_s


def test_gradient_accumulation_amortises_only_the_optimizer_step() -> None:
    one = tp.finetune_throughput(_finetune(Method.FULL, micro_batch_size=2, seq_len=1024), H200, grad_accum=1)
    eight = tp.finetune_throughput(_finetune(Method.FULL, micro_batch_size=2, seq_len=1024), H200, grad_accum=8)
    assert eight.tokens_per_step == 8 * one.tokens_per_step
    assert one.tokens_per_s < eight.tokens_per_s < 1.2 * one.tokens_per_s


# ---- multi-GPU -----------------------------------------------------------------------------------------
def test_data_parallel_lora_scales_nearly_linearly_and_zero3_pays_for_gathering() -> None:
    a100 = lookup_gpu("A100 80GB")
    single = tp.finetune_throughput(_finetune(micro_batch_size=4), a100, grad_accum=4)
    ddp = tp.finetune_throughput(_finetune(micro_batch_size=4, parallel=Parallelism(gpus=8)), a100, grad_accum=4)
    assert 7.5 * single.tokens_per_s < ddp.tokens_per_s <= 8 * single.tokens_per_s
    zero3 = tp.finetune_throughput(_finetune(Method.FULL, micro_batch_size=4, parallel=Parallelism(gpus=8, zero=3)), a100, 4)
    assert "parameter all-gather" in {term.name for term in zero3.terms}


def test_cpu_offload_costs_pcie_transfers_and_cpu_adam() -> None:
    rtx = lookup_gpu("RTX 4090")
    offloaded = tp.finetune_throughput(
        _finetune(Method.FULL, micro_batch_size=2, parallel=Parallelism(zero=2, offload=Offload.OPTIMIZER)), rtx, 8)
    terms = {term.name: term.seconds for term in offloaded.terms}
    assert terms["CPU offload: optimizer"] > 1.0  # 6.7B gradients down and parameters up over PCIe
    assert "optimizer step" not in terms


# ---- generation ----------------------------------------------------------------------------------------
def _infer(model: str = "Llama-2-7B", **kwargs) -> EstimateRequest:
    return EstimateRequest(model=find_model(model), task=Task.INFER, **kwargs)


def test_generation_is_host_bound_on_the_h200_and_memory_bound_on_a_slow_card() -> None:
    h200 = tp.generation_throughput(_infer(micro_batch_size=1, engine=Engine.GENERATE), H200)
    terms = {term.name: term.seconds for term in h200.terms}
    assert terms["decode: host overhead"] > 5 * terms["decode: weights and KV cache"]
    t4 = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=1, precision=Precision.FP16_TRUE,
                                       engine=Engine.GENERATE), lookup_gpu("T4"))
    terms = {term.name: term.seconds for term in t4.terms}
    assert terms["decode: weights and KV cache"] > terms["decode: host overhead"]  # 26 GB at 320 GB/s


def test_int8_generation_is_much_slower_than_16_bit() -> None:
    bf16 = tp.generation_throughput(_infer(micro_batch_size=4), H200)
    int8 = tp.generation_throughput(_infer(micro_batch_size=4, quant=Quant.INT8), H200)
    assert int8.tokens_per_s < 0.5 * bf16.tokens_per_s


def test_sharding_runs_at_one_cards_speed_and_replicas_multiply() -> None:
    a100 = lookup_gpu("A100 80GB")
    one = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=8, engine=Engine.GENERATE), a100)
    sharded = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=8, parallel=Parallelism(gpus=2)), a100)
    replicas = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=8, engine=Engine.GENERATE), a100, replicas=2)
    assert sharded.tokens_per_s == pytest.approx(one.tokens_per_s)
    assert replicas.tokens_per_s == pytest.approx(2 * one.tokens_per_s)
    # The slots engine's replicas split the prompts.
    slots = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=8), a100, prompts=16)
    slots_replicas = tp.generation_throughput(_infer("Llama-2-13B", micro_batch_size=8), a100, replicas=2, prompts=16)
    assert slots_replicas.tokens_per_s == pytest.approx(2 * slots.tokens_per_s, rel=0.2)


# ---- the P40 ---------------------------------------------------------------------------------------------
# The run this project grew from: lit-llama's LoRA fine-tuning of LLaMA-7B on Alpaca, 37,500 iterations on
# one P40 in 46 hours (4.42 s per iteration). lit-llama's defaults (finetune/lora.py): micro-batch 4,
# max_seq_length 256, 37,500 = 50,000 x 3 // 4 iterations, gradient accumulation 128 / 4 = 32, LoRA r 8 on
# the query and value projections. Llama-2-7B has LLaMA-7B's shapes. Assumption: every micro-batch is 256
# tokens long (lit-llama pads to the longest sample; Alpaca's are shorter, so this is an upper bound).
P40_RUN_TOKENS = 37_500 * 4 * 256
P40_RUN_MEASURED_HOURS = 46


def _p40_run(precision: Precision, method: Method = Method.LORA, gpu=P40) -> float:
    req = EstimateRequest(model=LLAMA7, method=method, precision=precision, micro_batch_size=4, seq_len=256,
                          lora=LoraSpec(r=8, alpha=16, targets=("q_proj", "v_proj")))
    return tp.finetune_throughput(req, gpu, grad_accum=32).seconds_for(P40_RUN_TOKENS) / 3600


def test_p40_prediction_for_the_46_hour_run_is_pinned() -> None:
    # `llmplan fit 7B --gpu P40 --lora-targets q_proj,v_proj --seq-len 256 --batch-size 128 --tokens 38400000`
    # recommends QLoRA with fp32 compute (see BENCHMARKS.md); here at the run's own micro-batch of 4. Since
    # QLoRA's refit on the current recipe (issue 15: the matmul at MATMUL_EFFICIENCY plus a cost per 4-bit
    # layer call, instead of the fp32-upcast recipe's 0.45 efficiency) it is 40 h, no longer 62 h.
    assert _p40_run(Precision.FP32, Method.QLORA) == pytest.approx(40.1, rel=0.05)
    # The run as lit-llama ran it (LoRA, 16-bit weights), timed at the catalog's fp16 rate (1/64 of fp32):
    assert _p40_run(Precision.FP16_TRUE) == pytest.approx(1978, rel=0.05)
    # The measured 46 hours are far from that: they fit 16-bit weights with matmuls at the P40's fp32 rate.
    fp32_rate = dataclasses.replace(P40, fp16_tflops=P40.fp32_tflops)
    assert _p40_run(Precision.FP16_TRUE, gpu=fp32_rate) == pytest.approx(34.0, rel=0.05)
    assert _p40_run(Precision.FP16_TRUE, gpu=fp32_rate) < _p40_run(Precision.FP32, Method.QLORA) < P40_RUN_MEASURED_HOURS


def test_p40_fp16_is_timed_at_its_slow_rate() -> None:
    fp16 = tp.finetune_throughput(_finetune(precision=Precision.FP16_TRUE, micro_batch_size=4, seq_len=256), P40, 4)
    fp32 = tp.finetune_throughput(_finetune(Method.QLORA, precision=Precision.FP32, micro_batch_size=4, seq_len=256), P40, 4)
    assert fp16.tokens_per_s < fp32.tokens_per_s / 20
    assert tp.compute_tflops(P40, Precision.FP16_TRUE) == pytest.approx(P40.fp32_tflops / 64, rel=0.05)


def test_cards_without_figures_get_nominal_rates_and_say_so() -> None:
    unknown = dataclasses.replace(lookup_gpu("RTX 4090"), bf16_tflops=None, fp16_tflops=None, memory_bandwidth_gbps=None)
    result = tp.finetune_throughput(_finetune(precision=Precision.FP16_TRUE), unknown)
    assert not result.known and result.tokens_per_s > 0


def test_approx_tokens_uses_four_characters_per_token() -> None:
    assert tp.approx_tokens(4000) == 1000
    assert tp.approx_tokens(1) == 1
