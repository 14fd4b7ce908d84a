"""Size parsing and formatting (planner/units.py)."""

from __future__ import annotations

import pytest

from llmplan.planner.units import (
    GB,
    GiB,
    KiB,
    MiB,
    TB,
    TiB,
    format_bytes,
    format_gb,
    format_gib,
    format_mib,
    parse_size,
    to_gb,
    to_gib,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("24GB", 24 * GB),
        ("80G", 80 * GiB),  # bare G is binary
        ("80g", 80 * GiB),
        ("16000MiB", 16000 * MiB),
        ("16000M", 16000 * MiB),
        ("24 GiB", 24 * GiB),
        ("  24gib  ", 24 * GiB),
        ("24gb", 24 * GB),
        ("1.5TiB", int(1.5 * TiB)),
        ("2TB", 2 * TB),
        ("0.5GiB", GiB // 2),
        (".5GiB", GiB // 2),
        ("512KiB", 512 * KiB),
        ("512K", 512 * KiB),
        ("1000000B", 1_000_000),
        ("81559MiB", 81559 * MiB),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_takes_an_int_as_bytes() -> None:
    assert parse_size(123) == 123


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("24", "no unit"),  # ambiguous: bytes or GB?
        ("", "cannot read"),
        ("GiB", "cannot read"),
        ("24 parsecs", "unknown unit"),
        ("24GiBs", "unknown unit"),
        ("-24GiB", "cannot read"),
        ("24,5GiB", "cannot read"),
        ("0GiB", "positive"),
        ("1e9B", "cannot read"),
    ],
)
def test_parse_size_rejects_bad_input_and_says_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)  # the message quotes what the user typed


def test_parse_size_error_for_a_bare_number_suggests_units() -> None:
    with pytest.raises(ValueError) as caught:
        parse_size("24")
    assert "24GiB" in str(caught.value) and "24GB" in str(caught.value)


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, None, ["24GiB"]])
def test_parse_size_rejects_non_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


def test_format_bytes_picks_the_largest_unit() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.0 KiB"
    assert format_bytes(81559 * MiB) == "79.6 GiB"
    assert format_bytes(2 * TiB) == "2.0 TiB"
    assert format_bytes(5000 * TiB) == "5000.0 TiB"
    assert format_bytes(80 * GB, decimal=True, digits=0) == "80 GB"
    assert format_bytes(-3 * GiB) == "-3.0 GiB"


def test_fixed_unit_formatters() -> None:
    assert format_gib(24564 * MiB, 2) == "23.99 GiB"
    assert format_gib(80 * GiB) == "80.0 GiB"
    assert format_gb(80 * GB) == "80 GB"
    assert format_mib(143771 * MiB) == "143771 MiB"
    assert to_gib(GiB) == 1.0
    assert to_gb(GB) == 1.0


def test_parse_and_format_round_trip() -> None:
    assert parse_size(format_mib(parse_size("23028MiB")).replace(" ", "")) == 23028 * MiB
