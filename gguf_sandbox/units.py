"""Sizes and durations: the one grammar for memory limits, steps and timeouts, with bounds."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from types import MappingProxyType

from gguf_sandbox.errors import GGUFSandboxError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

# Binary units: 64m = 64 MiB. An optional `b`/`ib` may follow a unit (64mb, 64MiB); a bare `b` means bytes.
SIZE_UNITS: Mapping[str, int] = MappingProxyType({"": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB})
_SIZE_RE = re.compile(r"\s*(\d{1,30}(?:\.\d{1,12})?)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)
DURATION_UNITS: Mapping[str, int] = MappingProxyType({"": 1, "s": 1, "m": 60, "h": 3600})
_DURATION_RE = re.compile(r"\s*(\d{1,20}(?:\.\d{1,12})?)\s*([smh]?)\s*", re.IGNORECASE)
# No size we handle comes near this; beyond it, kernels and Docker read a limit as 0 or reject it.
MAX_SIZE = 1 << 50
MAX_DURATION_S = 7 * 24 * 3600.0
SIZE_EXAMPLES = "e.g. 64m, 512m, 1g"
DURATION_EXAMPLES = "e.g. 300, 90s, 5m or 1h"


class UnitError(GGUFSandboxError, ValueError):
    """A size or duration that is malformed or out of its range (callers add where it came from)."""


def parse_size(value: object, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """`64m`, `1.5g`, `512MiB`, `65536` → bytes (binary units), between `minimum` and `maximum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(f"expected a size such as 64m or 1g, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UnitError(f"{value!r} is not a size; {SIZE_EXAMPLES}")
    if isinstance(value, (int, float)):
        exact = Fraction(value)
    else:
        match = _SIZE_RE.fullmatch(value)
        if match is None:
            raise UnitError(
                f"{show(value)} is not a size; write a number with an optional unit k/m/g/t "
                f"(binary: 64m = 64 MiB), {SIZE_EXAMPLES}"
            )
        exact = Fraction(match.group(1)) * SIZE_UNITS[(match.group(2) or "").lower()]
    size = math.floor(exact)
    if not minimum <= size <= maximum:
        raise UnitError(
            f"size {show(value)} is out of range: give {format_size(minimum)} to {format_size(maximum)}"
        )
    return size


def size_arg(minimum: int = 1, maximum: int = MAX_SIZE) -> Callable[[str], int]:
    """An argparse `type` for a size option: parse_size within [minimum, maximum], else argparse's error."""

    def parse(text: str) -> int:
        try:
            return parse_size(text, minimum, maximum)
        except UnitError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def format_size(nbytes: int) -> str:
    """Bytes → the shortest exact label: 64m, 1g, 1536k, 100 (used in cell ids)."""
    for unit in ("t", "g", "m", "k"):
        scale = SIZE_UNITS[unit]
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def parse_duration(value: object, maximum: float = MAX_DURATION_S) -> float:
    """Seconds as a number, or a string with unit s/m/h (`90s`, `5m`): finite, positive, at most `maximum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(f"expected seconds, {DURATION_EXAMPLES}; got {show(value)}")
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            raise UnitError(f"expected seconds, {DURATION_EXAMPLES}; got {show(value)}")
        seconds = float(Fraction(match.group(1)) * DURATION_UNITS[match.group(2).lower()])
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= maximum:
        raise UnitError(
            f"duration {show(value)} is out of range: give more than 0 and at most {format_duration(maximum)}"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds → the largest whole unit label: 300 → 5m, 90 → 90s, 86400 → 24h."""
    for unit in ("h", "m"):
        scale = DURATION_UNITS[unit]
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    return f"{seconds:g}s"


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, so that an error message stays one short line whatever the input."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: object, limit: int = 60) -> str:
    """repr() cut to a readable length (clip)."""
    return clip(repr(value), limit)
