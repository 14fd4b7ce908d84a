"""Plans that offload (issue 15): the host memory they need is stated, checked against the node's, and
activation offload is planned only where nothing fits the GPU without it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmplan.planner.gpus import GpuProbe, ProbedGpu, lookup_gpu, match_nvml_name
from llmplan.planner.hardware import Hardware, host_memory_from_meminfo, plan_hardware
from llmplan.planner.model_catalog import MODELS
from llmplan.planner.plan import FinetuneAsk, FinetunePlan, PlanError, plan_finetune
from llmplan.planner.request import Kernels, Method
from llmplan.planner.search import FitRequest, search

GIB = 2**30
SPECS = {spec.name: spec for spec in MODELS}
RTX_4090 = lookup_gpu("RTX 4090")


def _hardware(host_gib: float | None = None) -> Hardware:
    host = None if host_gib is None else int(host_gib * GIB)
    return Hardware(RTX_4090, 1, RTX_4090.memory_bytes, "catalog", host_memory_bytes=host)


def _zero3_ask() -> FinetuneAsk:
    """Llama-2-13B, full fine-tuning, on one 24 GB card: only ZeRO-3 with its parameters in CPU memory fits."""
    return FinetuneAsk("Llama-2-13B", SPECS["Llama-2-13B"], methods=(Method.FULL,), seq_len=512, batch_size=16,
                       deepspeed=True)


def _long_qlora(seq_len: int, host_gib: float | None = None, offload: bool | None = None) -> FitRequest:
    return FitRequest(SPECS["Llama-3-8B"], _hardware(host_gib), methods=(Method.QLORA,), seq_len=seq_len, batch_size=1,
                      kernels=Kernels.LIGER, activation_offload=offload)


# ---- host memory (item 1) ---------------------------------------------------------------------------------
def test_a_zero3_offload_plan_states_its_host_memory() -> None:
    plan = plan_finetune(_zero3_ask(), _hardware())
    params = SPECS["Llama-2-13B"].params
    assert (plan.zero, plan.offload) == (3, "params")
    assert plan.host_bytes == params * 16 + params * 2  # fp32 master, Adam m, v, gradient + bf16 weights
    assert plan.host_bytes == pytest.approx(218.2 * GIB, abs=0.05 * GIB)
    assert "+ 218.2 GiB of host memory" in plan.summary()
    assert FinetunePlan.from_dict(plan.to_dict()) == plan


def test_a_zero3_offload_plan_is_infeasible_where_the_node_has_less_host_memory() -> None:
    with pytest.raises(PlanError) as refused:
        plan_finetune(_zero3_ask(), _hardware(host_gib=23))
    assert str(refused.value) == (
        "Llama-2-13B fine-tuning (16 x 512 tokens) does not fit 1 x RTX 4090: full, bf16-true, ZeRO-3 + offload "
        "params, micro-batch 1 x 16 fits the GPUs but needs 218.2 GiB of host memory for ZeRO-3 offload (params), "
        "this node has 23.0 GiB; what would fit: 16 x RTX 4090 (--gpus 16): full, bf16-true, ZeRO-3 x16, "
        "micro-batch 1 x 1, 17.4 GiB per GPU; QLoRA (--method qlora): qlora, bf16-true, 1 GPU, micro-batch 2 x 8, "
        "18.9 GiB")
    assert plan_finetune(_zero3_ask(), _hardware(host_gib=256)).host_bytes < 256 * GIB


def test_a_node_with_enough_host_memory_is_suggested() -> None:
    result = search(_long_qlora(32768, host_gib=4))
    assert not result.feasible
    assert result.reasons[0] == ("qlora, bf16-true, 1 GPU, micro-batch 1 x 1, gradient checkpointing, activation "
                                 "offload fits the GPUs but needs 8.0 GiB of host memory for activation offload, this "
                                 "node has 4.0 GiB")
    host = [s for s in result.suggestions if s.change == "host_memory"]
    assert host and host[0].text.startswith("a node with at least 8.0 GiB of host memory: qlora")


def test_local_host_memory_is_read_from_meminfo_for_the_gpus_found_here() -> None:
    meminfo = "MemTotal:       32594852 kB\nMemFree:         1000000 kB\nMemAvailable:   24117248 kB\n"
    assert host_memory_from_meminfo(meminfo) == 23 * GIB
    assert host_memory_from_meminfo("MemTotal: 1 kB\n") is None
    total = 24 * GIB
    gpu = ProbedGpu(index=0, name="NVIDIA GeForce RTX 4090", uuid="GPU-0", memory_total_bytes=total,
                    memory_used_bytes=0, memory_free_bytes=total, compute_capability=(8, 9),
                    catalog=match_nvml_name("NVIDIA GeForce RTX 4090"))
    found = plan_hardware(None, None, None, lambda: GpuProbe(gpus=(gpu,)), host_memory=lambda: 23 * GIB)
    assert found.host_memory_bytes == 23 * GIB and found.to_dict()["host_memory_bytes"] == 23 * GIB
    named = plan_hardware(1, "RTX 4090", None, lambda: pytest.fail("no probe"), host_memory=lambda: pytest.fail("no"))
    assert named.host_memory_bytes is None  # a card named for another machine: its host memory is not this one's


# ---- activation offload (item 2) ----------------------------------------------------------------------------
def test_activation_offload_is_planned_only_where_nothing_fits_without_it() -> None:
    at_16k = search(_long_qlora(16384)).best
    assert at_16k.checkpointing and not at_16k.activation_offload and at_16k.host_bytes == 0
    at_32k = search(_long_qlora(32768)).best
    assert at_32k.activation_offload and at_32k.describe().endswith("gradient checkpointing, activation offload")
    assert at_32k.host_bytes == 32 * 32768 * 4096 * 2 == 8 * GIB  # every layer's input, bf16
    assert at_32k.memory.breakdown()["checkpointed layer inputs"] == 3 * 32768 * 4096 * 2
    assert at_32k.memory_bytes <= at_32k.budget_bytes
    assert not search(_long_qlora(32768, offload=False)).feasible
    assert search(_long_qlora(16384, offload=True)).best.activation_offload


def test_the_plan_says_it_offloads_activations() -> None:
    ask = FinetuneAsk("Llama-3-8B", SPECS["Llama-3-8B"], methods=(Method.QLORA,), seq_len=32768, batch_size=1)
    plan = plan_finetune(ask, _hardware(host_gib=64))
    assert plan.activation_offload and plan.host_bytes == 8 * GIB
    assert "gradient checkpointing, activation offload, Liger kernels" in plan.summary()
    assert "+ 8.0 GiB of host memory" in plan.summary()
    with pytest.raises(PlanError, match="activation offload False"):
        plan_finetune(replace(ask, activation_offload=False), _hardware(host_gib=64))
