"""`llmplan fit MODEL`: the configurations that fit the GPUs at hand, best first, and how to run them.

Planning only: nothing here imports torch. The search lives in `planner/search.py`; this module resolves
the inputs (model, hardware, DeepSpeed preflight, data set size), renders the answer with rich or as
JSON, and prints the `llmplan` command and job spec that run the recommendation.

Tests inject stand-ins through click's context object: ``obj={"nvml": fake_pynvml, "nvcc": None}``
(``nvcc``: the path DeepSpeed's preflight should see, None for "not installed").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from llmplan.planner.hardware import Hardware, HardwareError, Preflight, deepspeed_preflight, find_nvcc, plan_hardware
from llmplan.planner.defaults import (ALL_LINEAR, DEFAULT_GLOBAL_BATCH, DEFAULT_LORA_R, DEFAULT_MARGIN,
                                      DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_LEN, DEFAULT_SEQ_LEN, lora_alpha,
                                      parse_lora_targets)
from llmplan.planner.request import Kernels, LoraSpec, Method, Offload, Quant, RequestError, Task
from llmplan.planner.resolve import ModelConfigError, ResolvedModel, UnknownModelError, resolve_model
from llmplan.planner.search import (ALL_METHODS, SLOTS_MAX_BATCH, Backend, Candidate, FitError, FitRequest, FitResult,
                                    search)
from llmplan.planner.throughput import CHARS_PER_TOKEN, Throughput, approx_tokens
from llmplan.planner.units import format_gib

from .commands import DATA_PLACEHOLDER, PROMPT_PLACEHOLDER, command_line as llmplan_command, plain, weights_placeholder
from .memory_view import breakdown_table
from .options import (BATCH, DATA_TOKENS, EPOCHS, EXIT_INFEASIBLE, FRACTION, GPUS, LORA_RANK, ROWS, SIZE, TOKENS,
                      UserError, choice_of, former_spelling, json_option, model_argument, print_json, user_errors)

# A data set file larger than this is sampled: its first SAMPLE_BYTES, scaled by the file size.
SAMPLE_BYTES = 64 * 2**20


class DatasetError(ValueError):
    """A --data file that cannot be sized; the message says what to pass instead."""


# ---- inputs -------------------------------------------------------------------------------------------
def _context_obj(ctx: click.Context) -> Mapping[str, Any]:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Mapping) else {}


def _probe(ctx: click.Context):
    def run():
        from llmplan.planner.nvml_probe import probe_gpus

        return probe_gpus(_context_obj(ctx).get("nvml"))

    return run


def _preflight(ctx: click.Context, override: bool | None) -> Preflight:
    obj = _context_obj(ctx)
    nvcc = obj["nvcc"] if "nvcc" in obj else find_nvcc()
    return deepspeed_preflight(override, nvcc)


def _text_chars(value: Any) -> int:
    """Characters of text in a JSON record: every string in it, however nested."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


def dataset_tokens(path: Path, seq_len: int) -> tuple[int, str]:
    """Training tokens per epoch in a data set file, and how they were counted.

    JSON Lines or a JSON list: each record's text at CHARS_PER_TOKEN characters per token, cut at
    `seq_len` (the trainer truncates); anything else is plain text, packed into sequences.
    """
    if not path.exists():
        raise DatasetError(f"--data {path}: no such file (or give the size with --tokens N)")
    if path.is_dir():
        raise DatasetError(f"--data {path} is a directory: point to a .jsonl, .json or text file, or give --tokens N")
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(f"--data {path} is empty")
    with path.open("rb") as handle:
        sample = handle.read(SAMPLE_BYTES)
    scale = size / len(sample)
    text = sample.decode("utf-8", errors="replace")
    suffix = path.suffix.lower()
    records: list[Any] | None = None
    if suffix in (".jsonl", ".ndjson"):
        lines = text.splitlines()
        if scale > 1:
            lines = lines[:-1]  # the sample may end mid-record
        try:
            records = [json.loads(line) for line in lines if line.strip()]
        except (ValueError, RecursionError) as error:  # also nested too deeply, or a number of 5,000 digits
            raise DatasetError(f"--data {path}: not JSON Lines ({_json_problem(error)})") from error
    elif suffix == ".json":
        if scale > 1:
            raise DatasetError(f"--data {path} is a JSON file over {SAMPLE_BYTES // 2**20} MiB: convert it to "
                               "JSON Lines or give --tokens N")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise DatasetError(f"--data {path}: not JSON ({_json_problem(error)})") from error
        records = data if isinstance(data, list) else [data]
    how = f"~{CHARS_PER_TOKEN:g} characters per token"
    if records is None:
        return approx_tokens(round(len(text) * scale)), f"{path.name}: plain text, {how}"
    per_record = [min(approx_tokens(_text_chars(record)), seq_len) for record in records]
    count = round(len(records) * scale)
    tokens = round(sum(per_record) * scale)
    return max(tokens, 1), (f"{path.name}: {count:,} records, {how}, each cut at {seq_len} tokens; "
                            "times assume no padding")


def _json_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg}, line {error.lineno}"
    return "nested too deeply" if isinstance(error, RecursionError) else "a number too long to read"


def _methods(method: str) -> tuple[Method, ...]:
    return ALL_METHODS if method == "auto" else (Method(method),)


# ---- commands and job specs -----------------------------------------------------------------------------
def model_reference(resolved: ResolvedModel, typed: str) -> str:
    """What to pass as --model: the path the user typed for a checkpoint, the catalog name of a model llmplan
    pulls itself, else a placeholder for the directory of its weights (PATH/TO/Llama-2-7B)."""
    from llmplan.runtime.models.model_store import find_runnable  # light: stdlib and the planner

    if resolved.how.startswith(("config.json", "Meta params.json")):
        return typed
    if find_runnable(resolved.spec.name) is not None:
        return resolved.spec.name
    return weights_placeholder(resolved.spec.name)


def job_spec(candidate: Candidate, model: str, data: str, epochs: float | None) -> dict[str, Any]:
    """The configuration as option name -> value (the command's options; also the YAML job spec)."""
    req, strategy = candidate.request, candidate.strategy
    if req.task is Task.INFER:
        spec: dict[str, Any] = {"model": model, "precision": req.precision.value}
        if req.quant is not Quant.NONE:
            spec["quant"] = req.quant.value
        # --gpus is the total: the runtime's planner makes the same replicas-or-sharding choice from it.
        spec |= {"batch-size": req.micro_batch_size, "prompt-len": req.prompt_len, "max-new-tokens": req.max_new_tokens,
                 "gpus": strategy.gpus}
        return spec
    spec = {"model": model, "method": req.method.value, "precision": req.precision.value,
            "micro-batch": req.micro_batch_size, "grad-accum": candidate.grad_accum}
    if req.method is not Method.FULL:
        if req.lora.r != LoraSpec().r:
            spec["lora-r"] = req.lora.r
        if req.lora.targets != (ALL_LINEAR,):
            spec["lora-targets"] = ",".join(req.lora.targets)
    if req.gradient_checkpointing:
        spec["gradient-checkpointing"] = True
    if req.activation_offload:
        spec["activation-offload"] = True
    if strategy.backend is Backend.DEEPSPEED:
        spec["zero"] = strategy.zero
        if strategy.offload is not Offload.NONE:
            spec["offload"] = strategy.offload.value
    if strategy.backend is Backend.FSDP:
        spec["fsdp"] = strategy.fsdp_mode
        if strategy.offload is not Offload.NONE:
            spec["fsdp-offload"] = True
    spec |= {"gpus": strategy.gpus, "seq-len": req.seq_len}
    if epochs is not None:
        spec["epochs"] = epochs
    spec["data"] = data
    return spec


def command_line(candidate: Candidate, spec: Mapping[str, Any]) -> str:
    """`llmplan submit finetune ...`, `llmplan generate MODEL PROMPT ...` or `llmplan submit infer ... --prompt`."""
    if candidate.request.task is Task.FINETUNE:
        return llmplan_command(("submit", "finetune"), options=spec)
    if candidate.strategy.replicas > 1:
        return llmplan_command(("submit", "infer"), options={**spec, "prompt": PROMPT_PLACEHOLDER})
    options = {key: value for key, value in spec.items() if key != "model"}
    return llmplan_command(("generate",), (spec["model"], PROMPT_PLACEHOLDER), options)


def job_document(task: Task, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The job spec `llmplan submit SPEC.yaml` reads: the task, the options, and a prompt to replace (inference)."""
    prompts = {"prompt": [PROMPT_PLACEHOLDER]} if task is Task.INFER else {}
    return {"task": task.value, **{key: plain(value) for key, value in spec.items()}, **prompts}


def yaml_text(task: Task, spec: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(job_document(task, spec), sort_keys=False)


# ---- rendering ----------------------------------------------------------------------------------------
def format_seconds(seconds: float | None) -> str:
    """``42s``, ``12m``, ``3h 05m``, ``2d 04h``."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f}m"
    hours, rest = divmod(round(minutes), 60)
    if hours < 48:
        return f"{hours}h {rest:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _seconds(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} s"
    if value >= 0.01:
        return f"{value:.2f} s"
    return f"{value * 1e3:.2f} ms"


def format_rate(throughput: Throughput) -> str:
    if not throughput.known:
        return "—"
    rate = throughput.tokens_per_s
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def _row(index: int, candidate: Candidate, total_tokens: float | None) -> list[str]:
    if candidate.request.task is Task.FINETUNE:
        cells = [candidate.method.value, candidate.quant.value, candidate.precision.value, candidate.strategy.label,
                 f"{candidate.micro_batch} x {candidate.grad_accum}",
                 "offload" if candidate.activation_offload else "yes" if candidate.checkpointing else "no"]
    else:
        weights = candidate.quant.value if candidate.quant is not Quant.NONE else f"{candidate.precision.compute_bytes * 8}-bit"
        cells = [weights, candidate.precision.value, candidate.strategy.label, str(candidate.micro_batch)]
    cells += [format_gib(candidate.memory_bytes), format_gib(candidate.headroom_bytes), format_rate(candidate.throughput)]
    if total_tokens is not None:
        cells.append(format_seconds(candidate.seconds_for(total_tokens)))
    return [str(index), *cells]


FINETUNE_COLUMNS = ("#", "method", "quant", "precision", "parallelism", "micro x accum", "ckpt")
INFERENCE_COLUMNS = ("#", "weights", "precision", "parallelism", "batch")
RIGHT_ALIGNED = ("memory/GPU", "headroom", "tokens/s", "time")


def candidates_table(candidates: tuple[Candidate, ...], task: Task, total_tokens: float | None, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False)
    headers = [*(FINETUNE_COLUMNS if task is Task.FINETUNE else INFERENCE_COLUMNS), "memory/GPU", "headroom", "tokens/s"]
    if total_tokens is not None:
        headers.append("time")
    for header in headers:
        table.add_column(header, justify="right" if header in RIGHT_ALIGNED else "left")
    for index, candidate in enumerate(candidates, 1):
        table.add_row(*_row(index, candidate, total_tokens))
    return table


def time_table(throughput: Throughput, task: Task):
    from rich.table import Table

    table = Table(show_edge=False, show_header=False, padding=(0, 1))
    table.add_column("term")
    table.add_column("s", justify="right")
    table.add_column("what")
    for term in throughput.terms:
        table.add_row(term.name, _seconds(term.seconds), term.note)
    table.add_section()
    unit = "optimizer step" if task is Task.FINETUNE else "generate call (all copies)"
    table.add_row("total", _seconds(throughput.step_s), f"per {unit}: {throughput.tokens_per_step:,} tokens")
    return table


class Report:
    """Everything `llmplan fit` prints, computed once for both renderers."""

    def __init__(self, resolved: ResolvedModel, typed: str, hardware: Hardware, preflight: Preflight,
                 result: FitResult, inference: FitResult | None, data: str, data_note: str,
                 epochs: float | None, top: int) -> None:
        self.resolved, self.hardware, self.preflight = resolved, hardware, preflight
        self.result, self.inference, self.data, self.data_note = result, inference, data, data_note
        self.epochs, self.top = epochs, top
        self.model_ref = model_reference(resolved, typed)

    @property
    def fit(self) -> FitRequest:
        return self.result.request

    def spec_for(self, candidate: Candidate) -> dict[str, Any]:
        return job_spec(candidate, self.model_ref, self.data, self.epochs)

    def notes(self) -> list[str]:
        """Hardware notes, and why DeepSpeed is out of the plan (or in it without nvcc)."""
        notes = list(self.hardware.notes)
        if self.fit.task is Task.FINETUNE and (not self.preflight.deepspeed or self.preflight.nvcc is None):
            notes.append(self.preflight.reason)
        return notes

    def to_dict(self) -> dict[str, Any]:
        fit, result = self.fit, self.result
        total = fit.total_tokens
        data: dict[str, Any] = {
            "notice": self.hardware.notice or None,
            "model": {"name": fit.model.name, "resolved_from": self.resolved.how, "params": fit.model.params},
            "task": fit.task.value,
            "hardware": self.hardware.to_dict(),
            "budget_bytes": fit.budget_bytes,
            "margin": fit.margin,
            "deepspeed": self.preflight.to_dict(),
            "batch_size": fit.batch_size,
            "prompts": fit.prompts,
            "max_slots": fit.max_slots,
            "tokens_per_epoch": fit.tokens,
            "epochs": fit.epochs if fit.tokens is not None else None,
            "data": self.data_note or None,
            "feasible": result.feasible,
            "considered": result.considered,
            "candidates": [c.to_dict(total) for c in result.candidates[: self.top]],
            "warnings": list(result.warnings),
            "notes": self.notes(),
        }
        if result.best is not None:
            spec = self.spec_for(result.best)
            data["recommendation"] = {**result.best.to_dict(total), "command": command_line(result.best, spec),
                                      "job": job_document(fit.task, spec)}
        else:
            data["reasons"] = list(result.reasons)
            data["nearest"] = result.nearest.to_dict(total) if result.nearest else None
            data["suggestions"] = [s.to_dict() for s in result.suggestions]
        if self.inference is not None:
            best = self.inference.best
            data["inference"] = None if best is None else {
                **best.to_dict(), "command": command_line(best, self.spec_for(best))}
        return data


def render(report: Report, console) -> None:
    from rich.markup import escape

    fit, result, hardware = report.fit, report.result, report.hardware
    if hardware.notice:
        console.print(escape(hardware.notice), soft_wrap=True)
    what = "fine-tuning" if fit.task is Task.FINETUNE else "inference"
    console.print(f"[bold]{escape(fit.model.name)}[/bold] ({fit.model.params / 1e9:.2f}B params; "
                  f"{escape(report.resolved.how)}), {what} on {escape(hardware.describe())}")
    shape = (f"sequences of {fit.seq_len} tokens, global batch {fit.batch_size}" if fit.task is Task.FINETUNE else
             _inference_shape(fit))
    console.print(escape(f"{shape}; a plan may use {format_gib(fit.budget_bytes)} per GPU "
                         f"({1 - fit.margin:.0%} of {format_gib(hardware.memory_bytes)})"))
    if fit.tokens is not None:
        source = f" ({report.data_note})" if report.data_note else ""
        console.print(escape(f"data: {fit.tokens:,} tokens x {fit.epochs:g} epoch{'s' if fit.epochs != 1 else ''}{source}"))
    console.print()
    if result.feasible:
        _render_feasible(report, console)
    else:
        _render_infeasible(report, console)
    if report.inference is not None:
        best = report.inference.best
        console.print()
        if best is None:
            console.print("Inference on the same hardware: nothing fits.")
        else:
            command = command_line(best, report.spec_for(best))
            rate = f"~{format_rate(best.throughput)} tokens/s" if best.throughput.known else "tokens/s unknown"
            console.print(escape(f"Inference on the same hardware: {best.describe()}, "
                                 f"{format_gib(best.memory_bytes)}/GPU, {rate} ({command})"), soft_wrap=True)
    messages = list(result.warnings) + report.notes()
    if messages:
        console.print()
        for message in dict.fromkeys(messages):
            console.print(escape(f"note: {message}"), soft_wrap=True)


def _inference_shape(fit: FitRequest) -> str:
    """"1,000 prompts of 128 + 256 tokens, up to 256 at once on the slots engine (16 on others)"."""
    what = f"{fit.prompts:,} prompts" if fit.prompts is not None else "sequences"
    at_once = (f"up to {fit.max_slots} at once on the slots engine ({fit.batch_size} on others)" if fit.max_slots
               else f"{fit.batch_size} at once")
    return f"{what} of {fit.prompt_len} + {fit.max_new_tokens} tokens, {at_once}"


def _render_feasible(report: Report, console) -> None:
    from rich.markup import escape

    fit, result = report.fit, report.result
    shown = result.candidates[: report.top]
    title = f"{len(result.candidates)} configurations fit; top {len(shown)} by estimated throughput"
    if fit.task is Task.INFER:
        title = f"{len(result.candidates)} configurations fit; unquantized first, then by throughput"
    console.print(candidates_table(shown, fit.task, fit.total_tokens, title))
    best = result.best
    spec = report.spec_for(best)
    console.print()
    console.print(f"[bold]Recommended[/bold]: {escape(best.describe())}")
    console.print(escape(f"Memory per GPU (peak at {best.memory.peak_phase}):"))
    console.print(breakdown_table(best.memory, best.budget_bytes))
    if best.throughput.known:
        time = best.seconds_for(fit.total_tokens)
        when = f"; {format_seconds(time)} for the data" if time is not None else ""
        console.print(escape(f"Time: ~{format_rate(best.throughput)} tokens/s{when}"))
        console.print(time_table(best.throughput, fit.task))
    console.print()
    console.print("Run it:")
    console.print(f"  {escape(command_line(best, spec))}", soft_wrap=True)
    console.print("Job spec (YAML):")
    for line in yaml_text(fit.task, spec).splitlines():
        console.print(f"  {escape(line)}")


def _render_infeasible(report: Report, console) -> None:
    from rich.markup import escape

    result = report.result
    console.print("[bold]Nothing fits.[/bold]")
    for reason in result.reasons:
        console.print(escape(f"  {reason}"), soft_wrap=True)
    if result.nearest is not None:
        console.print(escape(f"Nearest: {result.nearest.describe()}"))
        console.print(breakdown_table(result.nearest.memory, result.nearest.budget_bytes))
    if result.suggestions:
        console.print("What would fit:")
        for suggestion in result.suggestions:
            console.print(escape(f"  - {suggestion.text}"), soft_wrap=True)


# ---- the command ------------------------------------------------------------------------------------------
@click.command("fit")
@model_argument
@click.option("--gpus", type=GPUS, default=None, help="How many GPUs [default: what NVML finds, else 1].")
@click.option("--gpu", "gpu_name", default=None, help="Plan for this card (catalog name), present or not.")
@click.option("--gpu-mem", type=SIZE, default=None, help="Plan for a card with this much memory, e.g. 24GiB.")
@click.option("--task", type=choice_of(Task), default="finetune", show_default=True)
@click.option("--method", type=click.Choice(["auto", *(m.value for m in Method)], case_sensitive=False), default="auto",
              show_default=True, help="auto: full, LoRA and QLoRA, whichever is fastest.")
@click.option("--seq-len", type=TOKENS, default=DEFAULT_SEQ_LEN, show_default=True, help="Fine-tuning sequence length.")
@click.option("--batch-size", type=BATCH, default=None,
              help=f"Global: sequences per optimizer step (fine-tuning) [default: {DEFAULT_GLOBAL_BATCH}], or at most this "
                   f"many generated at once (inference) [default: the slots engine's fastest up to {SLOTS_MAX_BATCH} "
                   f"slots, other engines {DEFAULT_GLOBAL_BATCH}].")
@click.option("--prompt-len", type=TOKENS, default=DEFAULT_PROMPT_LEN, show_default=True, help="Inference prompt tokens.")
@click.option("--max-new-tokens", type=TOKENS, default=DEFAULT_MAX_NEW_TOKENS, show_default=True)
@click.option("--prompts", type=BATCH, default=None,
              help="Inference: prompts to complete; the slots engine's batch is chosen for them (they run in waves).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Data set file (.jsonl, .json, text): sizes the run.")
@former_spelling("--dataset", "data", type=click.Path(path_type=Path))
@click.option("--tokens", type=DATA_TOKENS, default=None, help="Tokens per epoch (instead of --data).")
@click.option("--epochs", type=EPOCHS, default=1.0, show_default=True)
@click.option("--margin", type=FRACTION, default=DEFAULT_MARGIN, show_default=True, help="Share of GPU memory left free.")
@click.option("--top", type=ROWS, default=5, show_default=True, help="Rows to show.")
@click.option("--lora-r", type=LORA_RANK, default=DEFAULT_LORA_R, show_default=True)
@click.option("--lora-targets", default=ALL_LINEAR, show_default=True, help="Comma list (q_proj,v_proj) or all-linear.")
@click.option("--deepspeed/--no-deepspeed", default=None, help="Plan with or without DeepSpeed [default: if nvcc is found].")
@click.option("--kernels", type=choice_of(Kernels), default="liger", show_default=True, callback=lambda _c, _p, v: Kernels(v),
              help="Plan with Liger's fused training kernels (what the runtime uses on GPUs) or none.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--activation-offload/--no-activation-offload", default=None,
              help="Keep the checkpointed layer inputs in CPU memory [default: only where nothing fits without].")
@json_option
@click.pass_context
@user_errors(FitError, HardwareError, DatasetError, RequestError, UnknownModelError, ModelConfigError)
def fit(ctx: click.Context, model: str, gpus: int | None, gpu_name: str | None, gpu_mem: str | None, task: str,
        method: str, data: Path | None, tokens: int | None, epochs: float, margin: float, top: int, lora_r: int,
        lora_targets: str, deepspeed: bool | None, prompts: int | None, as_json: bool, **sizes: int | None) -> None:
    """Find the configurations of MODEL that fit the GPUs at hand, ranked by estimated throughput.

    Fine-tuning (default) searches method, quantization, precision, parallelism, micro-batch, gradient
    accumulation and checkpointing; --task infer searches quantization, precision, replicas and sharding.
    Exit status 1 when nothing fits (the output says what would), 2 for bad input.
    """
    report = build_report(model, probe=_probe(ctx), preflight=_preflight(ctx, deepspeed), gpus=gpus, gpu_name=gpu_name,
                          gpu_mem=gpu_mem, task=task, method=method, dataset=data, tokens=tokens, epochs=epochs,
                          margin=margin, top=top, lora_r=lora_r, lora_targets=lora_targets, prompts=prompts, sizes=sizes)
    result = report.result
    if as_json:
        print_json(report.to_dict())
    else:
        from .render import make_console

        render(report, make_console())
    if not result.feasible:
        ctx.exit(EXIT_INFEASIBLE)


def build_report(model: str, *, probe, preflight: Preflight, gpus: int | None = None, gpu_name: str | None = None,
                 gpu_mem: str | None = None, task: str = "finetune", method: str = "auto", dataset: Path | None = None,
                 tokens: int | None = None, epochs: float = 1.0, margin: float = 0.10, top: int = 5, lora_r: int = 8,
                 lora_targets: str = ALL_LINEAR, prompts: int | None = None, sizes: dict[str, int | None]) -> Report:
    """What `llmplan fit` answers (and the dashboard's plan form shows): the search and everything to print."""
    if dataset is not None and tokens is not None:
        raise UserError("--data and --tokens both size the run: give one")
    task_ = Task(task)
    if task_ is Task.INFER and method != "auto":
        raise UserError(f"--method {method} describes fine-tuning: drop it or use --task finetune")
    if task_ is Task.FINETUNE and prompts is not None:
        raise UserError("--prompts sizes inference: use --task infer (fine-tuning is sized by --data or --tokens)")
    sizes, max_slots = _batch_limits(task_, sizes)
    resolved = resolve_model(model)
    hardware = plan_hardware(gpus, gpu_name, gpu_mem, probe)
    data_note = ""
    if dataset is not None:
        tokens, data_note = dataset_tokens(dataset, sizes["seq_len"])
    fit_request = FitRequest(
        model=resolved.spec, hardware=hardware, task=task_, methods=_methods(method), lora=LoraSpec(
            r=lora_r, alpha=lora_alpha(lora_r), targets=parse_lora_targets(lora_targets)),
        tokens=tokens, epochs=epochs, margin=margin, deepspeed=preflight.deepspeed, prompts=prompts, max_slots=max_slots,
        **sizes)
    result = search(fit_request)
    inference = search(_inference_request(fit_request), advise=False) if task_ is Task.FINETUNE else None
    return Report(resolved, model, hardware, preflight, result, inference,
                  str(dataset) if dataset is not None else DATA_PLACEHOLDER, data_note,
                  epochs if tokens is not None else None, top)


def _batch_limits(task: Task, sizes: dict[str, int | None]) -> tuple[dict[str, int], int | None]:
    """--batch-size, or its default: fine-tuning's global batch; for inference the plain engines' batch, and the
    slots engine may go up to SLOTS_MAX_BATCH (the search picks its fastest). Given, it binds every engine."""
    given = sizes.get("batch_size")
    max_slots = SLOTS_MAX_BATCH if given is None and task is Task.INFER else None
    return {**sizes, "batch_size": DEFAULT_GLOBAL_BATCH if given is None else given}, max_slots


def _inference_request(fit_request: FitRequest) -> FitRequest:
    """The same model and hardware, generating --batch-size sequences of --prompt-len + --max-new-tokens."""
    from dataclasses import replace

    return replace(fit_request, task=Task.INFER, tokens=None)

