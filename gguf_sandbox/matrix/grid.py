"""Text grids of a matrix run: one per (workload, model, backend), Python versions × memory limits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gguf_sandbox.matrix.results import ERROR, SKIP, CellRecord
from gguf_sandbox.matrix.verdicts import peak_over_limit

MISSING = "·"
UNEXPECTED_MARK = "!"


def cell_text(record: CellRecord) -> str:
    """`pass 41/64M`; `oom! 64/64M` when the verdict is outside the cell's expect; `skip`; `error`."""
    if record.kind == SKIP:
        return "skip"
    if record.kind == ERROR or record.verdict is None:
        return "error" + UNEXPECTED_MARK
    mark = "" if record.ok else UNEXPECTED_MARK
    limit = record.limit if record.limit else record.memory
    return f"{record.verdict.value}{mark} {peak_over_limit(record.peak, limit)}"


def _version_key(python: str) -> tuple[int, ...]:
    return tuple(int(p) for p in python.split(".") if p.isdigit())


@dataclass(frozen=True)
class Grid:
    """The cells of one (workload, model, backend): rows Python versions, columns memory limits."""

    workload: str
    model: str | None
    backend: str
    pythons: tuple[str, ...]
    memories: tuple[tuple[int, str], ...]  # (bytes, label), ascending
    cells: Mapping[tuple[str, int], CellRecord]  # (python, memory) → its record

    @property
    def name(self) -> str:
        return " · ".join(part for part in (self.workload, self.model, self.backend) if part)

    def at(self, python: str, memory: int) -> CellRecord | None:
        return self.cells.get((python, memory))


def grids(records: Iterable[CellRecord]) -> list[Grid]:
    """One grid per (workload, model, backend), in first-seen order."""
    groups: dict[tuple[str, str | None, str], list[CellRecord]] = {}
    for record in records:
        groups.setdefault((record.workload, record.model, record.backend), []).append(record)
    return [
        Grid(
            workload=workload,
            model=model,
            backend=backend,
            pythons=tuple(sorted({r.python for r in cells}, key=_version_key)),
            memories=tuple(sorted({(r.memory, r.memory_label) for r in cells})),
            cells={(r.python, r.memory): r for r in cells},
        )
        for (workload, model, backend), cells in groups.items()
    ]


LEGEND = (
    f"cell: verdict peak/limit in MiB; {UNEXPECTED_MARK} = outside the cell's expect; {MISSING} = not run"
)


def render_grids(records: Iterable[CellRecord]) -> str:
    """All grids, separated by blank lines, followed by a legend."""
    blocks = [render_grid(grid) for grid in grids(records)]
    if not blocks:
        return "(no cells)"
    return "\n\n".join([*blocks, LEGEND])


def render_grid(grid: Grid) -> str:
    header = ["python", *(label for _, label in grid.memories)]
    rows = [
        [f"py{python}", *(_text(grid.at(python, memory)) for memory, _ in grid.memories)]
        for python in grid.pythons
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([grid.name, line(header), *(line(row) for row in rows)])


def _text(record: CellRecord | None) -> str:
    return MISSING if record is None else cell_text(record)
