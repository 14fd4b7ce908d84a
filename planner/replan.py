"""After an out-of-memory failure: the next plan up the ladder of headroom, and the margin learned.

The ladder, one rung per retry, each keeping the global batch (sequences per optimizer step):

1. halve the micro-batch, doubling gradient accumulation (activations scale with the micro-batch);
2. gradient checkpointing (activations of one layer instead of all);
3. LoRA -> QLoRA (4-bit base weights); full fine-tuning under DeepSpeed -> optimizer states offloaded to
   the CPU.

Each rung is planned again with the learned margin (`learned_margin`), so the estimate that failed is
not trusted as it was: a rung the planner finds infeasible is skipped for the next one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .defaults import lora_alpha
from .hardware import Hardware
from .models import ModelSpec
from .plan import FinetuneAsk, FinetunePlan, PlanError, plan_finetune
from .request import Kernels, LoraSpec, Method, Offload, Precision

BASE_MARGIN = 0.10  # the planner's default headroom (request.DEFAULT_MARGIN)
MARGIN_PER_OOM = 0.05  # each recorded OOM of a model on a card adds this much headroom to its next plans
MAX_MARGIN = 0.30


@dataclass(frozen=True)
class Rung:
    """One step up the ladder: the knobs it changes, and why (recorded with the retry)."""

    reason: str
    micro_batch: int
    gradient_checkpointing: bool
    method: str
    offload: str


def learned_margin(oom_failures: int) -> float:
    """Headroom for a model on a card that ran out of memory `oom_failures` times before."""
    return min(BASE_MARGIN + MARGIN_PER_OOM * oom_failures, MAX_MARGIN)


def rungs(plan: FinetunePlan) -> list[Rung]:
    """The rungs above `plan`, in the order they are tried (each builds on the one before)."""
    found: list[Rung] = []
    micro, checkpointing, method, offload = plan.micro_batch, plan.gradient_checkpointing, plan.method, plan.offload
    while micro > 1:
        micro //= 2
        found.append(Rung(f"micro-batch {micro} x {plan.grad_accum * plan.micro_batch // micro} accumulation",
                          micro, checkpointing, method, offload))
    if not checkpointing:
        checkpointing = True
        found.append(Rung("gradient checkpointing", micro, checkpointing, method, offload))
    if method == Method.LORA.value:
        found.append(Rung("QLoRA (4-bit base weights)", micro, checkpointing, Method.QLORA.value, offload))
    elif method == Method.FULL.value and plan.backend == "deepspeed" and offload == Offload.NONE.value:
        found.append(Rung("optimizer states offloaded to the CPU", micro, checkpointing, method,
                          Offload.OPTIMIZER.value))
    return found


def replan_after_oom(plan: FinetunePlan, spec: ModelSpec, hardware: Hardware | None,
                     margin: float) -> tuple[FinetunePlan, Rung] | None:
    """The first rung above `plan` the planner finds feasible with `margin`; None when the ladder is exhausted."""
    global_batch = plan.micro_batch * plan.grad_accum * plan.workers
    for rung in rungs(plan):
        ask = FinetuneAsk(
            model=plan.model, spec=spec, methods=(Method(rung.method),), seq_len=plan.seq_len, batch_size=global_batch,
            lora=LoraSpec(r=plan.lora_r, alpha=lora_alpha(plan.lora_r), targets=plan.lora_targets),
            precision=Precision(plan.precision), micro_batch=rung.micro_batch,
            gradient_checkpointing=rung.gradient_checkpointing, zero=plan.zero if plan.device == "cuda" else None,
            offload=Offload(rung.offload), workers=plan.workers, margin=margin,
            deepspeed=plan.backend == "deepspeed", kernels=Kernels(plan.kernels), lora_dropout=plan.lora_dropout,
        )
        try:
            replanned = plan_finetune(ask, hardware)
        except PlanError:
            continue
        return dataclasses.replace(replanned, notes=(*replanned.notes, f"re-planned after out of memory: {rung.reason}")), rung
    return None
