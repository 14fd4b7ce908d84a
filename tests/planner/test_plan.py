from __future__ import annotations

import json

import pytest

from llmplan.planner.hardware import plan_hardware
from llmplan.planner.plan import InferenceAsk, InferencePlan, PlanError, plan_inference
from llmplan.planner.request import Precision, Quant
from llmplan.planner.resolve import resolve_model


def hardware(name: str, count: int = 1):
    return plan_hardware(count, name, None, probe=lambda: pytest.fail("a named card needs no probe"))


def ask(model: str = "7B", **kwargs) -> InferenceAsk:
    return InferenceAsk(model=model, spec=resolve_model(model).spec, **kwargs)


def test_plan_round_trips_through_json() -> None:
    plan = plan_inference(ask(batch_size=4), hardware("A100-80GB"))
    assert InferencePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_one_replica_per_gpu_when_the_model_fits_one_card() -> None:
    plan = plan_inference(ask(batch_size=8), hardware("RTX 4090", 2))
    assert (plan.device, plan.dtype, plan.quant, plan.replicas, plan.gpus_per_replica) == ("cuda", "bf16", "none", 2, 1)
    assert plan.estimated_device_bytes <= 0.9 * 24 * 10**9


def test_cards_without_bf16_get_fp16_and_the_batch_is_capped_to_what_fits() -> None:
    # (7B in fp16 no longer fits a T4 next to the fast engine's workspace: the planner takes int8 there.)
    plan = plan_inference(ask("Llama-3.2-3B", batch_size=128), hardware("T4"))
    assert (plan.dtype, plan.quant) == ("fp16", "none")
    assert plan.batch_size < 128


def test_a_model_too_large_for_one_card_is_sharded_or_quantized() -> None:
    plan = plan_inference(ask("70B", batch_size=1), hardware("A100-80GB", 2))
    assert plan.gpus_per_replica == 2 or plan.quant != "none"


def test_what_cannot_fit_says_what_would() -> None:
    with pytest.raises(PlanError, match="does not fit 1 x T4"):
        plan_inference(ask("70B", quant=Quant.NONE), hardware("T4"))


def test_no_gpu_means_the_cpu_in_fp32_unless_asked() -> None:
    plan = plan_inference(ask("smollm2-135m-instruct"), None)
    assert (plan.device, plan.dtype, plan.gpus_per_replica) == ("cpu", "fp32", 0)
    assert plan_inference(ask("smollm2-135m-instruct", precision=Precision.BF16_TRUE, quant=Quant.NF4), None).quant == "nf4"
