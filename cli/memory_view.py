"""The memory breakdown table, shared by `llmplan estimate` and `llmplan fit`."""

from __future__ import annotations

from typing import Any

from llmplan.planner.estimator import MemoryEstimate
from llmplan.planner.units import format_gib


def breakdown_table(memory: MemoryEstimate, usable_bytes: int | None = None) -> Any:
    """Each term, the predicted peak reservation, the CUDA context and what nvidia-smi will show."""
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("what it counts")
    for term in memory.terms:
        table.add_row(term.name, format_gib(term.bytes), term.note)
    table.add_section()
    table.add_row("peak reserved", format_gib(memory.peak_bytes), f"at {memory.peak_phase} (torch.cuda.max_memory_reserved)")
    table.add_row("cuda context", format_gib(memory.cuda_context_bytes), "outside PyTorch's allocator")
    usable = f"; {format_gib(usable_bytes)} usable" if usable_bytes is not None else ""
    table.add_row("[bold]device total[/bold]", f"[bold]{format_gib(memory.device_bytes)}[/bold]",
                  f"per GPU, as nvidia-smi shows it{usable}")
    return table
