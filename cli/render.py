"""Small, shared pieces of terminal output: consoles, times, durations, ratios and sparklines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from rich.console import Console

NO_VALUE = "—"
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
# Width used when stdout is not a terminal (pipes, files): wide enough that rows are never wrapped.
PIPE_WIDTH = 200


def make_console() -> Console:
    """A console on the current stdout; full-width rows when piped, colour only on a terminal."""
    is_terminal = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if is_terminal else PIPE_WIDTH, soft_wrap=False, highlight=False)


def format_timestamp(moment: datetime | None, *, seconds: bool = True) -> str:
    """UTC, e.g. ``2025-01-31 14:05:09``; the column or label says "UTC"."""
    if moment is None:
        return NO_VALUE
    pattern = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return moment.astimezone(timezone.utc).strftime(pattern)


def format_duration(span: timedelta | None) -> str:
    """``45s``, ``3m 05s``, ``1h 02m``, ``2d 03h``."""
    if span is None:
        return NO_VALUE
    total = max(0, int(span.total_seconds()))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def format_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return NO_VALUE
    return f"{value:,.{digits}f}"


def format_ratio(measured: float | None, planned: float | None) -> str:
    """measured / planned as ``0.93x``; a dash when either side is missing."""
    if measured is None or not planned:
        return NO_VALUE
    return f"{measured / planned:.2f}x"


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """The values as one line of block characters, averaged into at most `width` buckets."""
    if not values:
        return ""
    buckets = _bucket_means(values, width)
    low, high = min(buckets), max(buckets)
    if high == low:
        return SPARK_BLOCKS[len(SPARK_BLOCKS) // 2] * len(buckets)
    scale = (len(SPARK_BLOCKS) - 1) / (high - low)
    return "".join(SPARK_BLOCKS[round((value - low) * scale)] for value in buckets)


def _bucket_means(values: Sequence[float], width: int) -> list[float]:
    if len(values) <= width:
        return list(values)
    means = []
    for bucket in range(width):
        start = bucket * len(values) // width
        end = (bucket + 1) * len(values) // width
        chunk = values[start:end]
        means.append(sum(chunk) / len(chunk))
    return means
