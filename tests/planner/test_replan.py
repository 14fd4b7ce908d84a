"""The ladder of headroom after an out-of-memory failure, and the margin a failure teaches."""

from __future__ import annotations

import dataclasses

from llmplan.planner.hardware import hardware_from_dict, plan_hardware
from llmplan.planner.plan import FinetuneAsk, plan_finetune
from llmplan.planner.replan import learned_margin, replan_after_oom, rungs
from llmplan.planner.request import Method
from llmplan.planner.resolve import resolve_model


def a100_plan(micro_batch: int = 8, method: Method = Method.LORA):
    spec = resolve_model("Llama-2-7B").spec
    hardware = plan_hardware(1, "A100-80GB", None, lambda: None)
    ask = FinetuneAsk(model="Llama-2-7B", spec=spec, methods=(method,), seq_len=512, batch_size=16,
                      micro_batch=micro_batch, gradient_checkpointing=False)
    return plan_finetune(ask, hardware), spec, hardware


def test_the_ladder_halves_the_micro_batch_then_checkpoints_then_quantizes() -> None:
    plan, _, _ = a100_plan()
    assert [r.reason for r in rungs(plan)] == [
        "micro-batch 4 x 4 accumulation", "micro-batch 2 x 8 accumulation", "micro-batch 1 x 16 accumulation",
        "gradient checkpointing", "QLoRA (4-bit base weights)",
    ]
    last = rungs(plan)[-1]
    assert (last.micro_batch, last.gradient_checkpointing, last.method) == (1, True, "qlora")


def test_a_replan_keeps_the_global_batch_and_needs_less_memory() -> None:
    plan, spec, hardware = a100_plan()
    replanned, rung = replan_after_oom(plan, spec, hardware, learned_margin(1))
    assert rung.reason == "micro-batch 4 x 4 accumulation"
    assert (replanned.micro_batch, replanned.grad_accum) == (4, 4)
    assert replanned.micro_batch * replanned.grad_accum == plan.micro_batch * plan.grad_accum
    assert replanned.estimated_device_bytes < plan.estimated_device_bytes
    assert replanned.notes[-1] == "re-planned after out of memory: micro-batch 4 x 4 accumulation"


def test_rungs_that_no_longer_fit_with_the_larger_margin_are_skipped() -> None:
    plan, spec, _ = a100_plan(micro_batch=1)
    tight = dataclasses.replace(plan_hardware(1, "A100-80GB", None, lambda: None), memory_bytes=15 * 2**30)
    replanned, rung = replan_after_oom(plan, spec, tight, learned_margin(2))
    assert rung.method == "qlora"  # 7B LoRA does not fit 15 GiB even with checkpointing; QLoRA does
    assert replanned.method == "qlora"


def test_an_exhausted_ladder_gives_none() -> None:
    plan, spec, hardware = a100_plan(micro_batch=1, method=Method.QLORA)
    top = dataclasses.replace(plan, gradient_checkpointing=True)
    assert rungs(top) == []
    assert replan_after_oom(top, spec, hardware, 0.1) is None


def test_each_failure_buys_five_points_of_margin_up_to_thirty() -> None:
    assert [round(learned_margin(n), 6) for n in (0, 1, 2, 6)] == [0.10, 0.15, 0.20, 0.30]


def test_recorded_hardware_reads_back() -> None:
    hardware = plan_hardware(2, "A100-80GB", None, lambda: None)
    again = hardware_from_dict(hardware.to_dict())
    assert (again.gpu.name, again.count, again.memory_bytes) == (hardware.gpu.name, 2, hardware.memory_bytes)
    custom = plan_hardware(1, None, "24GiB", lambda: None)
    assert hardware_from_dict(custom.to_dict()).memory_bytes == 24 * 2**30


def test_a_replan_keeps_the_kernels_and_the_lora_dropout_asked_for() -> None:
    """The retry's config is its plan's (TrainConfig.from_plan): the plan must not fall back to the defaults."""
    from llmplan.planner.request import Kernels

    plan, spec, hardware = a100_plan()
    asked = plan_finetune(FinetuneAsk(model="Llama-2-7B", spec=spec, methods=(Method.LORA,), batch_size=16,
                                      micro_batch=8, gradient_checkpointing=False, kernels=Kernels.NONE,
                                      lora_dropout=0.1), hardware)
    replanned, _ = replan_after_oom(asked, spec, hardware, learned_margin(1))
    assert (replanned.kernels, replanned.lora_dropout) == ("none", 0.1)
    assert plan.kernels == "liger"  # the default the re-plan used to fall back to
