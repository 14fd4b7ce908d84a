"""`llmplan estimate MODEL`: the itemised per-GPU memory of one configuration."""

from __future__ import annotations

import click

from llmplan.planner.estimator import MemoryEstimate
from llmplan.planner.estimator import estimate as estimate_memory
from llmplan.planner.models import ModelSpec
from llmplan.planner.defaults import (ALL_LINEAR, DEFAULT_LORA_R, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN,
                                      DEFAULT_SEQ_LEN, lora_alpha, parse_lora_targets)
from llmplan.planner.request import (
    EstimateRequest,
    Kernels,
    LoraSpec,
    Method,
    Offload,
    Optimizer,
    Parallelism,
    Precision,
    Quant,
    RequestError,
    Task,
)
from llmplan.planner.resolve import ModelConfigError, UnknownModelError, resolve_model

from .memory_view import breakdown_table
from .options import (
    BATCH,
    GPUS,
    LORA_RANK,
    TOKENS,
    UserError,
    choice_of,
    json_option,
    model_argument,
    print_json,
    user_errors,
)

LORA_OPTIONS = ("lora_r", "lora_targets")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _check_option_combinations(ctx: click.Context, task: Task, method: Method) -> None:
    lora_given = [f"--{name.replace('_', '-')}" for name in LORA_OPTIONS if _given(ctx, name)]
    if task is Task.FINETUNE and method is Method.FULL and lora_given:
        raise UserError(f"{', '.join(lora_given)}: LoRA options need --method lora or qlora, not full fine-tuning")
    if task is Task.INFER and (lora_given or _given(ctx, "method")):
        raise UserError("--method and --lora-* describe fine-tuning: drop them or use --task finetune")
    if task is Task.FINETUNE and (_given(ctx, "prompt_len") or _given(ctx, "max_new_tokens")):
        raise UserError("--prompt-len and --max-new-tokens describe inference: use --seq-len for fine-tuning")
    if task is Task.INFER and _given(ctx, "seq_len"):
        raise UserError("--seq-len describes fine-tuning: use --prompt-len and --max-new-tokens for inference")


def render(result: MemoryEstimate, model: ModelSpec, how: str) -> None:
    from rich.console import Console

    req = result.request
    console = Console()
    console.print(f"[bold]{model.name}[/bold] ({model.params / 1e9:.2f}B params; {how}): {_describe(req)}")
    console.print(breakdown_table(result))


def _describe(req: EstimateRequest) -> str:
    gpus = f", {req.parallel.gpus} GPUs" if req.parallel.gpus > 1 else ""
    if req.task is Task.INFER:
        return (f"inference, {req.precision.value}, quant {req.quant.value}, batch {req.micro_batch_size}, "
                f"{req.prompt_len}+{req.max_new_tokens} tokens{gpus}")
    zero = f", ZeRO-{req.parallel.zero}" if req.parallel.zero else ""
    offload = f", offload {req.parallel.offload.value}" if req.parallel.offload is not Offload.NONE else ""
    gc = ", gradient checkpointing" if req.gradient_checkpointing else ""
    return (f"{req.method.value} fine-tuning, {req.precision.value}, micro-batch {req.micro_batch_size} x {req.seq_len} tokens, "
            f"{req.optimizer.value}{gc}{gpus}{zero}{offload}")


def to_json(result: MemoryEstimate, model: ModelSpec, how: str) -> dict:
    req = result.request
    return {
        "model": model.name,
        "resolved_from": how,
        "params": model.params,
        "task": req.task.value,
        "method": req.method.value if req.task is Task.FINETUNE else None,
        "precision": req.precision.value,
        "quant": req.effective_quant.value,
        "gpus": req.parallel.gpus,
        "peak_phase": result.peak_phase,
        "breakdown": result.breakdown(),
        "terms": [term.to_dict() for term in result.terms],
        "peak_bytes": result.peak_bytes,
        "cuda_context_bytes": result.cuda_context_bytes,
        "device_bytes": result.device_bytes,
    }


@click.command("estimate")
@model_argument
@click.option("--task", type=choice_of(Task), default="finetune", show_default=True)
@click.option("--method", type=choice_of(Method), default="lora", show_default=True)
@click.option("--precision", type=choice_of(Precision), default="bf16-true", show_default=True)
@click.option("--quant", type=choice_of(Quant), default="none", show_default=True, help="Weights in int8 (LLM.int8) or nf4.")
@click.option("--batch-size", type=BATCH, default=1, show_default=True, help="Per GPU (micro-batch).")
@click.option("--seq-len", type=TOKENS, default=DEFAULT_SEQ_LEN, show_default=True, help="Fine-tuning sequence length.")
@click.option("--prompt-len", type=TOKENS, default=DEFAULT_PROMPT_LEN, show_default=True, help="Inference prompt tokens.")
@click.option("--max-new-tokens", type=TOKENS, default=DEFAULT_MAX_NEW_TOKENS, show_default=True)
@click.option("--lora-r", type=LORA_RANK, default=DEFAULT_LORA_R, show_default=True)
@click.option("--lora-targets", default=ALL_LINEAR, show_default=True, help="Comma list (q_proj,v_proj) or all-linear.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True)
@click.option("--optimizer", type=choice_of(Optimizer), default="adamw", show_default=True)
@click.option("--gpus", type=GPUS, default=1, show_default=True)
@click.option("--zero", type=click.IntRange(0, 3), default=0, show_default=True, help="DeepSpeed ZeRO stage (0: DDP).")
@click.option("--offload", type=choice_of(Offload), default="none", show_default=True)
@click.option("--kernels", type=choice_of(Kernels), default="none", show_default=True,
              help="liger: Liger's fused training kernels (the runtime's default on GPUs).")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@json_option
@click.pass_context
@user_errors(RequestError, UnknownModelError, ModelConfigError, ValueError)
def estimate(ctx: click.Context, model: str, task: str, method: str, lora_r: int, lora_targets: str,
                     gpus: int, zero: int, offload: str, as_json: bool, **sizes: object) -> None:
    """Estimate the per-GPU memory of one configuration, term by term."""
    resolved = resolve_model(model)
    task_, method_ = Task(task), Method(method)
    _check_option_combinations(ctx, task_, method_)
    request = EstimateRequest(
        model=resolved.spec,
        task=task_,
        method=method_,
        precision=Precision(sizes["precision"]),
        quant=Quant(sizes["quant"]),
        micro_batch_size=sizes["batch_size"],
        seq_len=sizes["seq_len"],
        prompt_len=sizes["prompt_len"],
        max_new_tokens=sizes["max_new_tokens"],
        lora=LoraSpec(r=lora_r, alpha=lora_alpha(lora_r), targets=parse_lora_targets(lora_targets)),
        gradient_checkpointing=sizes["gradient_checkpointing"],
        optimizer=Optimizer(sizes["optimizer"]),
        parallel=Parallelism(gpus=gpus, zero=zero, offload=Offload(offload)),
        kernels=Kernels(sizes["kernels"]),
        lora_dropout=sizes["lora_dropout"],
    )
    result = estimate_memory(request)
    if as_json:
        print_json(to_json(result, resolved.spec, resolved.how))
    else:
        render(result, resolved.spec, resolved.how)

