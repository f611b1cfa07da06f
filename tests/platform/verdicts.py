"""Cells' verdicts from results.jsonl files, and the v1-versus-v2 comparison the platform asserts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gguf_sandbox.matrix.results import CELL, ERROR, SKIP


@dataclass(frozen=True)
class CellVerdict:
    """One cell's verdict and the OOM kill counter the cgroup reported for it (memory.events on v2)."""

    verdict: str
    oom_kills: int | None


def load_verdicts(lines: Iterable[str]) -> dict[str, CellVerdict]:
    """cell id → verdict of the cell records (the last one wins, as with --resume); a skipped or errored
    cell shows as `skip` / `error`; damaged lines are skipped."""
    found: dict[str, CellVerdict] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("cell_id"), str):
            continue
        kind = record.get("kind")
        if kind in (SKIP, ERROR):
            found[record["cell_id"]] = CellVerdict(str(kind), None)
            continue
        if kind != CELL or "verdict" not in record:
            continue
        oom = record.get("oom")
        counter = oom.get("counter") if isinstance(oom, dict) else None
        found[record["cell_id"]] = CellVerdict(
            str(record["verdict"]), counter if isinstance(counter, int) else None
        )
    return found


def read_verdicts(path: Path) -> dict[str, CellVerdict]:
    """load_verdicts of a file; {} when it does not exist (a step that never ran)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    return load_verdicts(text.splitlines())


@dataclass(frozen=True)
class Row:
    cell_id: str
    v1: CellVerdict | None
    v2: CellVerdict | None

    @property
    def same(self) -> bool:
        return self.v1 is not None and self.v2 is not None and self.v1.verdict == self.v2.verdict


def compare(v1: Mapping[str, CellVerdict], v2: Mapping[str, CellVerdict]) -> list[Row]:
    """One row per cell in either run, in v1's order then v2's extra cells."""
    ids = list(dict.fromkeys([*v1, *v2]))
    return [Row(cell_id, v1.get(cell_id), v2.get(cell_id)) for cell_id in ids]


def _show(verdict: CellVerdict | None) -> str:
    if verdict is None:
        return "(missing)"
    if verdict.oom_kills:
        return f"{verdict.verdict} (oom_kill {verdict.oom_kills})"
    return verdict.verdict


def format_rows(rows: Iterable[Row], left: str = "v1 (host)", right: str = "v2 (guest)") -> str:
    """A plain-text table: cell id, both verdicts (with the OOM kill counter when non-zero), same or DIFF."""
    rows = list(rows)
    table = [("cell", left, right, "")] + [
        (row.cell_id, _show(row.v1), _show(row.v2), "same" if row.same else "DIFF") for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:3], widths, strict=True)) + "  " + line[3]
        for line in table
    ).rstrip()
