"""Estimator terms with pinned numbers (trainable counts from PEFT on the H200 runs, config arithmetic)."""

from __future__ import annotations

import pytest

from llmplan.planner.estimator import estimate, kv_cache_term, optimizer_bytes, weight_bytes
from llmplan.planner.request import (
    EstimateRequest,
    LoraSpec,
    Method,
    Offload,
    Parallelism,
    Precision,
    Quant,
    RequestError,
    Task,
)
from llmplan.planner.resolve import find_model

LLAMA2_7B = find_model("Llama-2-7B")


def finetune(model: str = "Llama-2-7B", **kwargs) -> EstimateRequest:
    return EstimateRequest(model=find_model(model), task=Task.FINETUNE, **kwargs)


def infer(model: str = "Llama-2-7B", **kwargs) -> EstimateRequest:
    return EstimateRequest(model=find_model(model), task=Task.INFER, **kwargs)


@pytest.mark.parametrize(
    ("model", "lora", "trainable"),
    [  # trainable parameter counts PEFT reported in benchmarks/results/memory-h200.jsonl
        ("Llama-2-7B", LoraSpec(r=8), 19_988_480),
        ("Mistral-7B", LoraSpec(r=8, targets=("q_proj", "v_proj")), 3_407_872),
        ("Llama-3.2-1B", LoraSpec(r=64), 45_088_768),
        ("Phi-3-mini", LoraSpec(r=8), 12_582_912),
    ],
)
def test_lora_parameter_count_matches_peft(model: str, lora: LoraSpec, trainable: int) -> None:
    assert lora.params(find_model(model)) == trainable


def test_weights_in_bf16_are_two_bytes_per_parameter() -> None:
    assert weight_bytes(infer()).bytes == 13_476_831_232


def test_nf4_weights_quantize_only_the_linear_layers() -> None:
    # 6.476B linear params x 0.5159 bytes + 0.262B embedding/head/norm params x 2 bytes
    assert weight_bytes(infer(quant=Quant.NF4)).bytes == 3_865_591_808
    qlora = weight_bytes(finetune(method=Method.QLORA)).bytes
    assert qlora == 3_865_591_808  # the runtime keeps the rest in bf16 (no prepare_model_for_kbit_training upcast)


def test_kv_cache_scales_with_kv_heads() -> None:
    llama2 = kv_cache_term(infer(micro_batch_size=8), 1024).bytes
    assert llama2 == 4_362_076_160  # 2 x 32 layers x 4096 x 1024 tokens x 8 x 2 bytes, plus one K being concatenated
    llama3 = kv_cache_term(infer("Llama-3.1-8B", micro_batch_size=8), 1024).bytes
    assert llama3 * 4 == llama2  # 8 KV heads instead of 32


def test_sliding_window_caps_the_cache_of_windowed_layers() -> None:
    short = kv_cache_term(infer("Mistral-7B"), 4096).bytes
    long = kv_cache_term(infer("Mistral-7B"), 16384).bytes
    assert long < 1.3 * short


def test_zero_partitions_optimizer_states_and_offload_removes_them() -> None:
    ddp = optimizer_bytes(finetune(method=Method.FULL, parallel=Parallelism(gpus=8))).bytes
    zero3 = optimizer_bytes(finetune(method=Method.FULL, parallel=Parallelism(gpus=8, zero=3))).bytes
    assert ddp == LLAMA2_7B.params * 4  # bf16 Adam moments, replicated
    assert zero3 == LLAMA2_7B.params * 12 // 8  # fp32 master + moments, one eighth each
    offloaded = finetune(method=Method.FULL, parallel=Parallelism(gpus=8, zero=3, offload=Offload.OPTIMIZER))
    assert optimizer_bytes(offloaded).bytes == 0


def test_peak_phase_depends_on_what_dominates() -> None:
    assert estimate(finetune(method=Method.FULL, gradient_checkpointing=True)).peak_phase == "end of backward"
    assert estimate(finetune(micro_batch_size=8, seq_len=2048)).peak_phase == "loss backward"
    # Quantized (the plain generate path): the prompt's prefill; 16-bit Gemma-2 (transformers' fast engines): their
    # cache and workspace; 16-bit Llama (the slots engine): a refill, its prompts' cache beside the whole static one.
    assert estimate(infer(micro_batch_size=1, prompt_len=2048, max_new_tokens=16, quant=Quant.NF4)).peak_phase == "prefill"
    assert estimate(infer("Gemma-2-9B", micro_batch_size=1, prompt_len=2048, max_new_tokens=16)).peak_phase == "last token"
    assert estimate(infer(micro_batch_size=1, prompt_len=2048, max_new_tokens=16)).peak_phase == "refill"


def test_the_fast_engines_workspace_is_planned_where_they_run() -> None:
    """One GPU, 16-bit weights of a family the slots engine does not run (Gemma-2): the fp32 logits of a 2,048-token
    continuous-batching step; quantized or sharded models, and the CPU, run on the plain generate path, which has
    none."""
    terms = {t.name: t.bytes for t in estimate(infer("Gemma-2-9B", micro_batch_size=64, prompt_len=64)).terms}
    assert terms["engine workspace"] == 2048 * find_model("Gemma-2-9B").vocab_size * 4
    for other in (infer(micro_batch_size=64, quant=Quant.NF4), infer(micro_batch_size=64, parallel=Parallelism(gpus=2)),
                  infer(micro_batch_size=64, on_cuda=False), infer(micro_batch_size=64)):
        assert "engine workspace" not in {t.name for t in estimate(other).terms}


def test_the_slots_engine_plans_its_whole_static_cache_and_a_refill_beside_it() -> None:
    """Llama-2-7B, 64 slots, 34-token prompts, 256 new tokens: 64 x 320 positions (290 rounded up to blocks of 64)
    x 512 KiB a position; a refill of 64 x 34 = 2,176 prompt tokens keeps their own cache too (H200: 24.34 GiB
    reserved, planned 24.42; benchmarks/results/engine-h200.jsonl)."""
    req = infer(micro_batch_size=64, prompt_len=34, max_new_tokens=256)
    assert req.slots_engine
    result = estimate(req)
    terms = {t.name: t.bytes for t in result.terms}
    assert result.peak_phase == "refill"
    assert terms["kv cache (static slots)"] == 64 * 320 * 512 * 1024
    assert terms["prefill cache"] == 2176 * 512 * 1024
    assert terms["decode step logits"] == 64 * 32000 * 2
    assert "kv cache" not in terms and "engine workspace" not in terms
    # A large batch of long prompts refills SLOTS_PREFILL_TOKENS at a time.
    big = {t.name: t.bytes for t in estimate(infer(micro_batch_size=256, prompt_len=1024)).terms}
    assert big["prefill cache"] == 8192 * 512 * 1024
    for other in (infer(micro_batch_size=64, quant=Quant.NF4), infer("Gemma-2-9B", micro_batch_size=64),
                  infer("Mistral-7B", micro_batch_size=64), infer(micro_batch_size=64, on_cuda=False)):
        assert not other.slots_engine


def test_checkpointing_trades_activations_for_recompute() -> None:
    plain = estimate(finetune(micro_batch_size=8, seq_len=1024))
    checkpointed = estimate(finetune(micro_batch_size=8, seq_len=1024, gradient_checkpointing=True))
    assert checkpointed.peak_bytes < 0.6 * plain.peak_bytes
    assert "checkpointed layer inputs" in checkpointed.breakdown()


def test_mixed_precision_holds_fp32_master_weights_and_16_bit_copies() -> None:
    result = estimate(finetune("Llama-3.2-1B", method=Method.FULL, precision=Precision.BF16_MIXED, micro_batch_size=8, seq_len=1024))
    assert result.breakdown()["weights"] == find_model("Llama-3.2-1B").params * 4
    assert result.breakdown()["autocast weight copies"] > 0


def test_sharded_inference_splits_weights_and_cache() -> None:
    single = estimate(infer("Llama-2-70B"))
    sharded = estimate(infer("Llama-2-70B", parallel=Parallelism(gpus=2)))
    assert 0.49 < sharded.breakdown()["weights"] / single.breakdown()["weights"] < 0.52


def test_device_bytes_add_the_cuda_context() -> None:
    result = estimate(finetune())
    assert result.device_bytes - result.peak_bytes == result.cuda_context_bytes > 100 * 2**20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method=Method.FULL, quant=Quant.NF4), "use --method qlora"),
        (dict(method=Method.QLORA, quant=Quant.INT8), "nf4"),
        (dict(micro_batch_size=0), "--batch-size must be positive"),
        (dict(seq_len=-5), "--seq-len must be positive"),
        (dict(method=Method.LORA, precision=Precision.BF16_MIXED), "bf16-true"),
        (dict(parallel=Parallelism(gpus=1, zero=0, offload=Offload.NONE), lora=LoraSpec(targets=("w_in",))), "no linear layer named w_in"),
    ],
)
def test_contradictory_requests_are_refused_with_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        estimate(finetune(**kwargs))


def test_offload_without_zero_is_refused() -> None:
    with pytest.raises(RequestError, match="--zero"):
        Parallelism(gpus=2, offload=Offload.OPTIMIZER)
    with pytest.raises(RequestError, match="--zero 3"):
        Parallelism(gpus=2, zero=2, offload=Offload.PARAMS)


def test_fp32_grouped_query_attention_keeps_the_softmax() -> None:
    # PyTorch's fused kernels refuse fp32 GQA, so fp32 activations take the math kernel, which keeps
    # 4 bytes x heads x seq per token (benchmarks/results/sdpa-fp32-h200.json: 671 MB for Qwen2.5-3B, 2 x 2048).
    # QLoRA keeps its activations bf16 now (issue 15) and stays on a fused kernel, like LoRA.
    from llmplan.planner.estimator import _attention_bytes_per_token

    fp32 = finetune("Qwen2.5-3B", method=Method.LORA, precision=Precision.FP32, seq_len=2048)
    assert _attention_bytes_per_token(fp32) == 4 * 3 * 2048 + 4 * 16 * 2048
    for method in (Method.LORA, Method.QLORA):
        assert _attention_bytes_per_token(finetune("Qwen2.5-3B", method=method, seq_len=2048)) == 2 * (2 * 2048 + 2 * 256)
    mha = finetune("Llama-2-7B", method=Method.LORA, precision=Precision.FP32, seq_len=2048)  # fused kernels take fp32 without GQA
    assert _attention_bytes_per_token(mha) == 4 * (2 * 4096 + 2 * 4096)
