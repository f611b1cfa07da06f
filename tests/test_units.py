"""The one size and duration grammar: what it accepts, what it refuses, and the bounds it enforces."""

from __future__ import annotations

import math

import pytest

from gguf_sandbox.units import (
    GIB,
    KIB,
    MAX_SIZE,
    MIB,
    TIB,
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64m", 64 * MIB),
        ("64M", 64 * MIB),
        ("64MiB", 64 * MIB),
        ("64mb", 64 * MIB),
        (" 64 m ", 64 * MIB),
        ("1.5g", 3 * GIB // 2),
        ("512k", 512 * KIB),
        ("2t", 2 * TIB),
        ("4096", 4096),
        ("4096b", 4096),
        (65536, 65536),
        (1.5e3, 1500),
    ],
    ids=repr,
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "64ib",  # the old matrix grammar took a bare "ib" as a unit
        "64q",
        "",
        "m",
        "-1m",
        "1e3",
        "0x40",
        "64 m b",
        True,
        None,
        [64],
        float("nan"),
        float("inf"),
    ],
    ids=repr,
)
def test_parse_size_refuses_what_is_not_a_size(value: object) -> None:
    with pytest.raises(UnitError):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "minimum", "maximum"),
    [
        ("0", 1, MAX_SIZE),
        (0, 1, MAX_SIZE),
        ("1k", 4 * MIB, 8 * GIB),  # a cgroup rounds 1k down to 0: no limit at all
        ("1t", 4 * MIB, 8 * GIB),
        ("100000000000000000000000t", 1, MAX_SIZE),  # 10^23 t: the kernel would read the overflow as 0
        (10**40, 1, MAX_SIZE),
        ("0.5", 1, MAX_SIZE),  # rounds down to 0 bytes
    ],
    ids=repr,
)
def test_parse_size_enforces_its_range(value: object, minimum: int, maximum: int) -> None:
    with pytest.raises(UnitError, match="out of range"):
        parse_size(value, minimum, maximum)


def test_parse_size_errors_stay_short() -> None:
    with pytest.raises(UnitError) as caught:
        parse_size("9" * 10_000 + "q")
    assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("nbytes", "label"),
    [(64 * MIB, "64m"), (GIB, "1g"), (1536 * KIB, "1536k"), (100, "100"), (2 * TIB, "2t")],
)
def test_format_size_round_trips(nbytes: int, label: str) -> None:
    assert format_size(nbytes) == label
    assert parse_size(label) == nbytes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), (0.5, 0.5), ("90s", 90.0), ("5m", 300.0), ("1.5h", 5400.0), ("2M", 120.0), ("45", 45.0)],
    ids=repr,
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, 0, -1, "0s", "-5m", "soon", "5d", "", True, None, 1e300, "9" * 30],
    ids=repr,
)
def test_parse_duration_is_finite_positive_and_bounded(value: object) -> None:
    with pytest.raises(UnitError):
        parse_duration(value)


def test_parse_duration_maximum() -> None:
    assert parse_duration("24h", maximum=24 * 3600) == 86400.0
    with pytest.raises(UnitError, match="at most 24h"):
        parse_duration("25h", maximum=24 * 3600)


@pytest.mark.parametrize(("seconds", "label"), [(300, "5m"), (90, "90s"), (86400, "24h"), (1.5, "1.5s")])
def test_format_duration(seconds: float, label: str) -> None:
    assert format_duration(seconds) == label
