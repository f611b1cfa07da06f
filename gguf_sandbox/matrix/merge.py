"""`gguf-sandbox merge`: shard results files joined into one, refusing conflicts and naming missing cells."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_sandbox.atomic import path_argument, write_atomic
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.grid import cell_text
from gguf_sandbox.matrix.junit import check_junit_path, write_junit
from gguf_sandbox.matrix.results import (
    CELL,
    ERROR,
    MAX_RECORD_BYTES,
    REFERENCE,
    RUN,
    SKIP,
    CellRecord,
    check_ours,
    escaped,
    has_control,
    scan,
    summarize,
)

MISSING_EXIT_CODE = 1
SHOWN_MISSING = 20
# A run header lists its cells; more than this many is no header of ours (matrix.yaml allows 10,000).
MAX_SELECTED = 100_000


@dataclass(frozen=True)
class Located:
    """A record and where it was read."""

    record: Mapping[str, Any]
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Merged:
    """What the files hold together: the records to write, and the cells the runs selected but none ran."""

    records: tuple[Mapping[str, Any], ...]
    cells: tuple[CellRecord, ...]
    # Every cell the runs selected (before sharding), or None when a file's runs did not record it.
    selected: tuple[str, ...] | None
    missing: tuple[str, ...]
    unlisted: tuple[Path, ...]  # files without a run header listing their selection


def read_strict(path: Path) -> list[Located]:
    """Every record of a results file; any damaged or torn line is a one-line error naming file:line."""
    if not path.is_file():
        raise GGUFSandboxError(f"{path}: no such results file")
    found = scan(path)
    if found.damaged:
        first = found.damaged[0]
        more = f" (and {len(found.damaged) - 1} more damaged lines)" if len(found.damaged) > 1 else ""
        raise GGUFSandboxError(f"{path}:{first.line}: {first.problem}{more}; not a complete results file")
    if found.torn_bytes:
        line = len(found.records) + 1
        raise GGUFSandboxError(
            f"{path}:{line}: a torn last line ({found.torn_bytes} bytes without a newline): the run was "
            "killed while writing; rerun that shard with --resume, then merge"
        )
    if not found.records:
        raise GGUFSandboxError(f"{path}: holds no records; give the --results files of `gguf-sandbox run`")
    located = [Located(r, path, n) for r, n in zip(found.records, found.lines, strict=True)]
    for item in located:
        if item.record["kind"] == RUN:
            _check_header(item)
    return located


def _check_header(item: Located) -> None:
    selected = item.record.get("selected")
    if selected is None:
        return
    if not isinstance(selected, list) or not all(isinstance(c, str) for c in selected):
        raise GGUFSandboxError(f"{item.where}: run header: 'selected' is not a list of cell ids")
    if len(selected) > MAX_SELECTED:
        raise GGUFSandboxError(f"{item.where}: run header: {len(selected):,} selected cells is too many")
    if any(has_control(cell_id) for cell_id in selected):  # merge prints the ones no file has
        raise GGUFSandboxError(f"{item.where}: run header: a selected cell id has control characters")


def merge(paths: Sequence[Path]) -> Merged:
    """Join the files: the latest record of each cell within a file (what --resume left), equal across
    files or refused; references once each (every shard that needs one runs it); run headers kept."""
    headers: dict[str, Mapping[str, Any]] = {}
    references: dict[str, Mapping[str, Any]] = {}
    cells: dict[str, Located] = {}
    selected: dict[str, None] = {}
    unlisted: list[Path] = []
    for path in paths:
        latest: dict[str, Located] = {}
        listed = False
        for item in read_strict(path):
            kind, cell_id = item.record["kind"], str(item.record["cell_id"])
            if kind == RUN:
                headers.setdefault(json.dumps(item.record, sort_keys=True), item.record)
                if isinstance(item.record.get("selected"), list):
                    listed = True
                    selected.update(dict.fromkeys(item.record["selected"]))
            elif kind == REFERENCE:
                references.setdefault(cell_id, item.record)
            elif kind in (CELL, SKIP, ERROR):
                latest[cell_id] = item
        if not listed:
            unlisted.append(path)
        for cell_id, item in latest.items():
            earlier = cells.setdefault(cell_id, item)
            if earlier is not item and _content(earlier.record) != _content(item.record):
                raise GGUFSandboxError(_conflict(cell_id, earlier, item))
    order = list(selected) + [c for c in cells if c not in selected]
    records = [*headers.values(), *references.values(), *(cells[c].record for c in order if c in cells)]
    return Merged(
        records=tuple(records),
        cells=tuple(CellRecord.from_json(cells[c].record) for c in order if c in cells),
        selected=None if unlisted else tuple(selected),
        missing=tuple(c for c in selected if c not in cells),
        unlisted=tuple(unlisted),
    )


def _content(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record without its write time: the same record appended twice is one record."""
    return {k: v for k, v in record.items() if k != "time"}


def _conflict(cell_id: str, first: Located, second: Located) -> str:
    a, b = (CellRecord.from_json(item.record) for item in (first, second))
    said = f"{first.where} says {_said(a)}, {second.where} says {_said(b)}"
    if (a.kind, a.verdict) == (b.kind, b.verdict):
        keys = sorted(
            k
            for k in _content(first.record).keys() | _content(second.record).keys()
            if first.record.get(k) != second.record.get(k)
        )
        said += f" (the records differ in {', '.join(keys[:6])})"
    return f"cell {cell_id}: conflicting records: {said}; keep one run of it (drop or rerun a shard)"


def _said(record: CellRecord) -> str:
    return f"{cell_text(record)}{f' ({escaped(record.reason[:80])})' if record.kind != CELL else ''}"


def write_merged(path: Path, merged: Merged) -> None:
    """The merged records as one results file, written atomically (refusing a path that is not ours)."""
    check_ours(path, "-o")
    lines = []
    for record in merged.records:
        line = json.dumps(record, sort_keys=True)
        if len(line) > MAX_RECORD_BYTES:  # cannot happen for records read back, but never write damage
            raise GGUFSandboxError(f"-o {path}: a record of {record.get('cell_id')!r} is too long")
        lines.append(line + "\n")
    try:
        write_atomic(path, "".join(lines).encode("utf-8"))
    except OSError as error:
        raise GGUFSandboxError(f"-o {path}: cannot write ({error.strerror})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", metavar="RESULTS", help="results files of `run` (e.g. its shards)"
    )
    parser.add_argument("-o", "--output", required=True, metavar="ALL", help="the merged results file")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even when selected cells are in no file (or a file does not say what was selected)",
    )
    parser.add_argument("--junit", metavar="FILE", help="also write the merged cells as JUnit XML to FILE")


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.files]
    output = path_argument(args.output, "-o")
    junit = path_argument(args.junit, "--junit") if args.junit is not None else None
    if junit is not None:
        if os.path.abspath(junit) == os.path.abspath(output):
            raise GGUFSandboxError(f"--junit {junit}: is the merged results file (-o); give another path")
        check_junit_path(junit)
    merged = merge(paths)
    write_merged(output, merged)
    if junit is not None:
        write_junit(junit, merged.records)
    counts = summarize(merged.cells)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.verdicts.items())) or "none decided"
    print(
        f"merged {len(paths)} file{'s' if len(paths) != 1 else ''}: {len(merged.cells)} cells "
        f"({verdicts}; {len(counts.skipped)} skipped, "
        f"{len(counts.errors)} errors, {len(counts.unexpected)} outside expect) → {output}"
    )
    complete = True
    if merged.unlisted:
        names = ", ".join(str(p) for p in merged.unlisted[:5])
        print(
            f"cannot tell which cells are missing: no run header in {names} lists the cells it selected "
            "(written by an older gguf-sandbox)",
            file=sys.stderr,
        )
        complete = False
    if merged.missing:
        shown = ", ".join(merged.missing[:SHOWN_MISSING])
        more = (
            f" and {len(merged.missing) - SHOWN_MISSING} more" if len(merged.missing) > SHOWN_MISSING else ""
        )
        print(
            f"{len(merged.missing)} of {len(merged.selected or ())} selected cells are in no file: "
            f"{shown}{more}; run their shard (with --resume) and merge again",
            file=sys.stderr,
        )
        complete = False
    if complete or args.allow_missing:
        return 0
    print("exit 1: cells missing (pass --allow-missing to accept that)", file=sys.stderr)
    return MISSING_EXIT_CODE
