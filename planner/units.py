"""Byte sizes: parsing what users type and formatting what we print.

Units follow the IEC/SI split, case-insensitively:

* ``KB``, ``MB``, ``GB``, ``TB`` are decimal (10^3, 10^6, 10^9, 10^12 bytes), as in vendor datasheets.
* ``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary (2^10 ... 2^40 bytes), as NVML and nvidia-smi report.
* A bare letter ``K``, ``M``, ``G``, ``T`` is binary: ``80G`` means 80 GiB, the way ``free -g``,
  Docker (``--memory 8g``) and most command-line tools read it.
* ``B`` is bytes. A number without a unit is refused: "24" could be bytes or GB, so we ask.

``gb`` is always gigabytes, never gigabits.
"""

from __future__ import annotations

import re

KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12
KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

# lower-case unit -> bytes per unit
_UNITS: dict[str, int] = {
    "b": 1,
    "kb": KB,
    "mb": MB,
    "gb": GB,
    "tb": TB,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "k": KiB,
    "m": MiB,
    "g": GiB,
    "t": TiB,
}

_SIZE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
# The largest size anyone means (1 EiB, a million times any GPU's memory); more is a typo, not a plan.
MAX_SIZE = 2**60
_LONGEST_SIZE = 40  # characters

_EXAMPLES = "24GiB, 24GB, 80G (= 80 GiB) or 16000MiB"


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"24GiB"``, ``"24GB"``, ``"80G"``, ``"16000MiB"`` or ``"1.5 TiB"``.

    An int is taken as a byte count already. Raises ValueError, naming the accepted forms, for
    anything else, for a missing unit and for sizes that are not positive.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size such as {_EXAMPLES}, got {text!r}")
    if isinstance(text, int):
        if not 0 < text <= MAX_SIZE:
            raise ValueError(f"a size must be positive and at most {MAX_SIZE} bytes, got {text} bytes")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a size such as {_EXAMPLES}, got {text!r}")
    match = _SIZE.match(text) if len(text) <= _LONGEST_SIZE else None
    if match is None:
        raise ValueError(f"cannot read {text[:_LONGEST_SIZE]!r} as a size: write a number and a unit, e.g. {_EXAMPLES}")
    number, unit = match.group("number"), match.group("unit").lower()
    if not unit:
        raise ValueError(
            f"{text!r} has no unit: say {number}GiB (binary), {number}GB (decimal) or {number}B (bytes)"
        )
    if unit not in _UNITS:
        known = ", ".join(("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "K", "M", "G", "T"))
        raise ValueError(f"unknown unit {match.group('unit')!r} in {text!r}: use one of {known}")
    size = round(float(number) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is more than {format_bytes(MAX_SIZE)}: give the size of one GPU's memory")
    return size


def to_gib(num_bytes: float) -> float:
    return num_bytes / GiB


def to_gb(num_bytes: float) -> float:
    return num_bytes / GB


def format_bytes(num_bytes: float, *, decimal: bool = False, digits: int = 1) -> str:
    """``num_bytes`` in the largest unit that keeps the number at least 1: ``"23.6 GiB"``, ``"512 B"``.

    Binary units (KiB, MiB, GiB, TiB) unless ``decimal`` asks for KB, MB, GB, TB.
    """
    base, names = (1000, ("B", "KB", "MB", "GB", "TB")) if decimal else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    sign = "-" if num_bytes < 0 else ""
    value = abs(float(num_bytes))
    for name in names[:-1]:
        if value < base:
            break
        value /= base
    else:
        name = names[-1]
    if name == "B":
        return f"{sign}{value:.0f} B"
    return f"{sign}{value:.{digits}f} {name}"


def format_gib(num_bytes: float, digits: int = 1) -> str:
    """Always in GiB: ``"79.6 GiB"``. The unit the planner's tables line up on."""
    return f"{to_gib(num_bytes):.{digits}f} GiB"


def format_gb(num_bytes: float, digits: int = 0) -> str:
    """Always in decimal GB, the way datasheets print memory: ``"80 GB"``."""
    return f"{to_gb(num_bytes):.{digits}f} GB"


def format_mib(num_bytes: float) -> str:
    """Whole MiB, the way nvidia-smi prints memory: ``"81559 MiB"``."""
    return f"{round(num_bytes / MiB)} MiB"
