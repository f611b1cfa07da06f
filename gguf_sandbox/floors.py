"""Measured memory floors: the smallest limit at which a workload finished, and what it was measured on.

`gguf-sandbox floor --record` writes them into floors.json (next to this module by default); the matrix
derives its expectations from them (below a cell's floor `refused` is expected, at and above it
`pass|degraded`), and `serve` refuses to start below the MCP floor. Only json is imported here: `serve`
reads the file inside a cell before it imports anything large.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf_sandbox.atomic import write_atomic
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.units import MIB, show

FLOORS_FILE = Path(__file__).with_name("floors.json")
SCHEMA_VERSION = 1
# A floors file is a few kilobytes; anything far larger is not one (and is not read whole).
MAX_FILE_BYTES = 4 << 20
# Bounds of a record's numbers: a limit or peak beyond 1 EiB (as results records), or work lasting beyond
# ~32 years (as a results record's duration, for --durations), is no measurement (and would overflow the
# table's arithmetic: 10**400 bytes has no float in MiB).
MAX_BYTES = 1 << 60
MAX_SECONDS = 1e9
# A cosine is at most 1; records written before cosines were clamped may hold 1 + a rounding error.
MAX_COSINE = 1.0 + 1e-9
# A name or fact (workload, model, an argument, a version) longer than this is no measurement's.
MAX_TEXT_CHARS = 200


class FloorsError(GGUFSandboxError):
    """The floors file is unreadable or malformed."""


@dataclass(frozen=True)
class Floor:
    """One measured floor: workload × model × Python minor × backend → the smallest limit that finished."""

    workload: str
    model: str | None
    python: str
    backend: str
    floor: int  # bytes
    peak: int | None  # bytes, the highest peak of the repeats at the floor
    resolution: int  # bytes between probes of the bisection
    repeat: int  # runs per probe; the floor is the smallest limit where all of them finished
    args: Mapping[str, str] = field(default_factory=dict)  # workload options it ran with
    measured_on: Mapping[str, str] = field(default_factory=dict)  # versions, kernel, date, cold caches
    # What the runs at the floor reported: the workload's own seconds (slowest run), and for a peer the
    # smallest cosine of its vectors to ours. None where not measured (older records).
    seconds: float | None = None
    cosine: float | None = None

    @property
    def key(self) -> tuple[str, str | None, str, str]:
        return (self.workload, self.model, self.python, self.backend)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["args"] = dict(self.args)
        data["measured_on"] = dict(self.measured_on)
        for optional in ("seconds", "cosine"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> Floor:
        if not isinstance(data, Mapping):
            raise FloorsError(f"{where}: expected an object, got {type(data).__name__}")
        try:
            floor = cls(
                workload=_text(data["workload"], f"{where}.workload"),
                model=None if data.get("model") is None else _text(data["model"], f"{where}.model"),
                python=_python(data["python"], f"{where}.python"),
                backend=_text(data["backend"], f"{where}.backend"),
                floor=_size(data["floor"], f"{where}.floor"),
                peak=None if data.get("peak") is None else _size(data["peak"], f"{where}.peak"),
                resolution=_size(data.get("resolution", 1 << 20), f"{where}.resolution"),
                repeat=_positive(data.get("repeat", 1), f"{where}.repeat"),
                args=_strings(data.get("args", {}), f"{where}.args"),
                measured_on=_strings(data.get("measured_on", {}), f"{where}.measured_on"),
                seconds=_optional_number(data.get("seconds"), f"{where}.seconds", MAX_SECONDS),
                cosine=_optional_number(data.get("cosine"), f"{where}.cosine", MAX_COSINE),
            )
        except KeyError as missing:
            raise FloorsError(f"{where}: missing key {missing}") from None
        return floor


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise FloorsError(f"{where}: expected a non-empty string, got {show(value)}")
    _printable(value, where)
    return value


def _printable(text: str, where: str) -> None:
    """Names and facts go into tables, reports and images: no control characters or lone surrogates."""
    if len(text) > MAX_TEXT_CHARS or not text.isprintable():
        raise FloorsError(
            f"{where}: expected printable text of at most {MAX_TEXT_CHARS} characters, got {show(text)}"
        )


def _python(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise FloorsError(f"{where}: expected a non-empty string, got {show(value)}")
    text = value
    parts = text.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts):
        raise FloorsError(f"{where}: expected a Python version such as 3.12, got {text[:40]!r}")
    return text


def _positive(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FloorsError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _size(value: object, where: str) -> int:
    size = _positive(value, where)
    if size > MAX_BYTES:
        raise FloorsError(
            f"{where}: expected a positive integer ≤ {MAX_BYTES:,}, got a {len(str(size))}-digit one"
        )
    return size


def _optional_number(value: object, where: str, maximum: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= maximum:
        raise FloorsError(f"{where}: expected a finite number ≥ 0 and ≤ {maximum:g}, got {value!r}")
    return float(value)


def _strings(value: object, where: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise FloorsError(f"{where}: expected an object of strings")
    strings = {k: str(v) for k, v in value.items()}
    for key, text in strings.items():
        _printable(key, where)
        _printable(text, f"{where}.{key}")
    return MappingProxyType(strings)


@dataclass(frozen=True)
class FloorTable:
    """Every recorded floor; lookups fall back from the exact cell to its nearest measured relatives."""

    floors: tuple[Floor, ...] = ()

    def find(self, workload: str, model: str | None, python: str, backend: str) -> Floor | None:
        """The floor recorded for this exact cell, else the highest one of the same workload and model on
        the same Python, else on any Python (a neighbour's floor is a better guess than none)."""
        same = [f for f in self.floors if f.workload == workload and f.model == model]
        for candidates in (
            [f for f in same if f.python == python and f.backend == backend],
            [f for f in same if f.python == python],
            same,
        ):
            if candidates:
                return max(candidates, key=lambda f: f.floor)
        return None

    def lowest_floor(self, workload: str, python: str) -> Floor | None:
        """The lowest floor recorded for `workload` on `python` (else on any Python), over models and
        backends: below it the workload has never been seen to run. A gate read where the backend and
        model are unknown (serve) must not refuse a cell that a floor measured for it lets run."""
        measured = self.for_workload(workload)
        for candidates in ([f for f in measured if f.python == python], list(measured)):
            if candidates:
                return min(candidates, key=lambda f: f.floor)
        return None

    def for_workload(self, workload: str) -> tuple[Floor, ...]:
        return tuple(f for f in self.floors if f.workload == workload)

    def with_floor(self, floor: Floor) -> FloorTable:
        """This table with `floor` replacing the record of the same cell."""
        kept = [f for f in self.floors if f.key != floor.key]
        return FloorTable(tuple(sorted([*kept, floor], key=_sort_key)))


# The packages whose versions a floors table names (those a record measured with).
TABLE_VERSIONS = ("python", "numpy", "gguf", "mcp", "llama-cpp-python", "torch", "sentence-transformers")


def markdown_table(
    table: FloorTable, workloads: Collection[str] | None = None, pythons: Collection[str] | None = None
) -> str:
    """The floors (of `workloads` on `pythons` only, when given) as the README shows them
    (tests/test_readme.py keeps the two equal): the limit, the peak there, what the work took per 1000
    texts and, for a peer, its smallest cosine to ours."""
    rows = [
        "| workload | model | Python | backend | floor | peak at the floor | s / 1000 texts | cosine to ours "
        "| probes | versions | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in table.floors:
        if (workloads is not None and f.workload not in workloads) or (
            pythons is not None and f.python not in pythons
        ):
            continue
        versions = ", ".join(
            f"{name} {f.measured_on[name]}" for name in TABLE_VERSIONS if name in f.measured_on
        )
        peak = f"{f.peak / MIB:.1f} MiB" if f.peak is not None else "—"
        args = " ".join(f"{name}={value}" for name, value in sorted(f.args.items()))
        cosine = f"{f.cosine:.5f}" if f.cosine is not None else "—"
        rows.append(
            f"| {f.workload}{f' ({args})' if args else ''} | {f.model or '—'} | {f.python} | {f.backend} "
            f"| {f.floor / MIB:g} MiB | {peak} | {_per_thousand(f)} | {cosine} "
            f"| {f.resolution / MIB:g} MiB steps × {f.repeat} runs "
            f"| {versions} | {f.measured_on.get('date', '?')}, {f.measured_on.get('kernel', '?')} |"
        )
    return "\n".join(rows)


def per_thousand(floor: Floor) -> float | None:
    """Seconds the work at the floor took per 1000 texts (scaled from its `count`), None if not recorded."""
    count = floor.args.get("count", "")
    # isdigit() alone admits '²' (which int() refuses) and 5,000 digits (over int()'s limit).
    if (
        floor.seconds is None
        or not (count.isascii() and count.isdigit() and len(count) <= 12)
        or int(count) == 0
    ):
        return None
    return floor.seconds * 1000 / int(count)


def _per_thousand(floor: Floor) -> str:
    seconds = per_thousand(floor)
    return "—" if seconds is None else f"{seconds:.1f}"


def _sort_key(floor: Floor) -> tuple[str, str, tuple[int, ...], str]:
    version = tuple(int(p) for p in floor.python.split(".") if p.isdigit())
    return (floor.workload, floor.model or "", version, floor.backend)


def load_floors(path: Path = FLOORS_FILE) -> FloorTable:
    """The floors recorded in `path`; an absent file records none."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return FloorTable()
    except OSError as error:
        raise FloorsError(f"{path}: cannot read the floors file ({error.strerror})") from error
    if len(raw) > MAX_FILE_BYTES:
        raise FloorsError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; not a floors file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FloorsError(f"{path}: not a JSON floors file ({error})") from error
    if not isinstance(data, Mapping) or data.get("version") != SCHEMA_VERSION:
        raise FloorsError(f"{path}: expected {{'version': {SCHEMA_VERSION}, 'floors': [...]}}")
    entries = data.get("floors")
    if not isinstance(entries, list):
        raise FloorsError(f"{path}: 'floors' must be a list")
    floors = [Floor.from_json(entry, f"{path.name}: floors[{i}]") for i, entry in enumerate(entries)]
    return FloorTable(tuple(sorted(floors, key=_sort_key)))


def save_floors(table: FloorTable, path: Path = FLOORS_FILE) -> None:
    """Write the table atomically (a reader never sees half a file)."""
    entries = [f.to_json() for f in table.floors]
    data = {"version": SCHEMA_VERSION, "floors": entries}
    for index, entry in enumerate(entries):
        # What load_floors would refuse (a peak of 0 a report claimed) is never written: the file stays
        # readable.
        Floor.from_json(entry, f"{path.name}: not written, floors[{index}]")
    try:
        # NaN or inf written would make the whole file unreadable (load_floors refuses them).
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as error:
        raise FloorsError(f"{path}: not written, a floor holds a number JSON has not ({error})") from None
    try:
        write_atomic(path, (text + "\n").encode("utf-8"))
    except OSError as error:
        raise FloorsError(f"{path}: cannot write the floors file ({error.strerror})") from error


def record_floor(floor: Floor, path: Path = FLOORS_FILE) -> FloorTable:
    """Add or replace `floor` in the file at `path`; returns the new table."""
    table = load_floors(path).with_floor(floor)
    save_floors(table, path)
    return table
