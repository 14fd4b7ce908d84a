"""`llmplan gpus`: the GPUs on this machine (through NVML), or the catalog of known cards.

Tests inject a stand-in for the pynvml module through click's context object
(``runner.invoke(gpus, obj={"nvml": fake})``); without one the probe imports pynvml itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmplan.planner.gpus import (
    GpuProbe,
    GpuSpec,
    ProbedGpu,
    catalog_gpus,
    default_planning_notice,
    describe_memory,
)
from llmplan.planner.nvml_probe import probe_gpus
from llmplan.planner.units import GiB, format_gib


def resolve_nvml(ctx: click.Context) -> Any | None:
    """The NVML module to probe with: ``ctx.obj["nvml"]`` when the caller set one, else None (pynvml)."""
    obj = ctx.find_root().obj
    if isinstance(obj, Mapping):
        return obj.get("nvml")
    return None


@click.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--catalog", "show_catalog", is_flag=True, help="List the GPU models llmplan knows instead of probing.")
@click.pass_context
def gpus(ctx: click.Context, as_json: bool, show_catalog: bool) -> None:
    """List this machine's NVIDIA GPUs: memory, compute capability, NVLink and the processes using them.

    Without a GPU (or without the NVIDIA driver) it says so and exits 0: planning commands then
    assume one RTX 4090 unless given --gpu NAME or --gpu-mem SIZE.
    """
    if show_catalog:
        specs = catalog_gpus()
        if as_json:
            click.echo(json.dumps([spec.to_dict() for spec in specs], indent=2))
        else:
            Console().print(catalog_table(specs))
        return
    probe = probe_gpus(resolve_nvml(ctx))
    if as_json:
        click.echo(json.dumps(probe.to_dict(), indent=2))
        return
    render_probe(probe, Console())


# ---- rendering --------------------------------------------------------------------------------
def render_probe(probe: GpuProbe, console: Console) -> None:
    if not probe.found:
        reason = probe.reason or "no GPU found"
        console.print(escape(reason[0].upper() + reason[1:] + "."))
        console.print(escape(default_planning_notice("No GPU found") + "."))
        _print_notes(probe, console)
        return
    count = len(probe.gpus)
    versions = [f"driver {probe.driver_version}" if probe.driver_version else "",
                f"CUDA {probe.cuda_version}" if probe.cuda_version else ""]
    header = ", ".join(part for part in versions if part)
    console.print(escape(f"{count} GPU{'s' if count != 1 else ''}" + (f" ({header})" if header else "")))
    console.print(device_table(probe.gpus))
    processes = process_table(probe.gpus)
    if processes is not None:
        console.print(processes)
    _print_notes(probe, console)


def _print_notes(probe: GpuProbe, console: Console) -> None:
    if probe.cuda_visible_devices is not None:
        console.print(escape(f"CUDA_VISIBLE_DEVICES={probe.cuda_visible_devices}: CUDA programs started from "
                             "this shell see only those devices; NVML lists them all."))
    for note in probe.notes:
        console.print(f"[dim]{escape(note)}[/dim]")
    for gpu in probe.gpus:
        for note in gpu.notes:
            console.print(f"[dim]GPU {gpu.index}: {escape(note)}[/dim]")


def device_table(devices: tuple[ProbedGpu, ...]) -> Table:
    table = Table(title="GPUs (NVML)", title_justify="left")
    table.add_column("#", no_wrap=True)
    table.add_column("GPU / UUID", overflow="fold")  # a UUID folds rather than losing characters
    table.add_column("Memory used / total", no_wrap=True)
    for column in ("CC", "bf16", "NVLink", "Catalog"):
        table.add_column(column)
    for gpu in devices:
        name = f"{escape(gpu.name)}\n[dim]{escape(gpu.uuid)}[/dim]" if gpu.uuid else escape(gpu.name)
        used, total = gpu.memory_used_bytes / GiB, gpu.memory_total_bytes / GiB
        memory = f"{used:.1f} / {total:.1f} GiB\n[dim]{format_gib(gpu.memory_free_bytes)} free[/dim]"
        cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
        table.add_row(str(gpu.index), name, memory, cc, _yes(gpu.bf16), _peers(gpu),
                      escape(gpu.catalog.name) if gpu.catalog else "[dim]not in catalog[/dim]")
    return table


def _peers(gpu: ProbedGpu) -> str:
    peers = ", ".join(str(index) for index in gpu.nvlink_peers) or "-"
    return f"{peers} (NVSwitch)" if gpu.nvswitch else peers


def process_table(devices: tuple[ProbedGpu, ...]) -> Table | None:
    rows = [(gpu.index, process) for gpu in devices for process in gpu.processes]
    if not rows:
        return None
    table = Table(title="Processes using GPU memory", title_justify="left")
    for column in ("GPU", "PID", "Process", "Memory"):
        table.add_column(column)
    for index, process in rows:
        used = format_gib(process.used_memory_bytes, 2) if process.used_memory_bytes is not None else "?"
        table.add_row(str(index), str(process.pid), escape(process.name or "?"), used)
    return table


def catalog_table(specs: tuple[GpuSpec, ...]) -> Table:
    table = Table(title="GPU catalog (dense TFLOP/s; ~ marks approximate memory)", title_justify="left")
    # "fp16/bf16": tensor rates with fp32 accumulation; "bnb": bitsandbytes NF4/FP4 and LLM.int8().
    for column in ("GPU", "Memory (usable)", "CC", "bf16", "fp16/bf16", "fp32", "GB/s", "Link", "bnb 4bit/int8"):
        table.add_column(column)
    for spec in specs:
        tflops = f"{_num(spec.fp16_tflops)}/{_num(spec.bf16_tflops)}"
        link = f"{spec.interconnect} {_num(spec.interconnect_gbps)}"
        bnb = f"{_yes(spec.bnb_4bit)}/{_yes(spec.bnb_int8)}"
        table.add_row(escape(spec.name), describe_memory(spec), spec.compute_capability_str, _yes(spec.bf16),
                      tflops, _num(spec.fp32_tflops), _num(spec.memory_bandwidth_gbps), link, bnb)
    return table


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _num(value: float | None) -> str:
    """Three significant figures at most, never scientific notation: 0.18, 11.8, 362, 2250."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"
