"""Text grids of a matrix run: one per (workload, model, backend), Python versions × memory limits."""

from __future__ import annotations

from collections.abc import Iterable

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


def render_grids(records: Iterable[CellRecord]) -> str:
    """All grids, separated by blank lines, followed by a legend."""
    groups: dict[tuple[str, str | None, str], list[CellRecord]] = {}
    for record in records:
        groups.setdefault((record.workload, record.model, record.backend), []).append(record)
    blocks = [render_grid(title, cells) for title, cells in groups.items()]
    if not blocks:
        return "(no cells)"
    legend = (
        f"cell: verdict peak/limit in MiB; {UNEXPECTED_MARK} = outside the cell's expect; {MISSING} = not run"
    )
    return "\n\n".join([*blocks, legend])


def render_grid(title: tuple[str, str | None, str], records: list[CellRecord]) -> str:
    workload, model, backend = title
    pythons = sorted({r.python for r in records}, key=_version_key)
    memories = sorted({(r.memory, r.memory_label) for r in records})
    by_position = {(r.python, r.memory): cell_text(r) for r in records}
    header = ["python", *(label for _, label in memories)]
    rows = [
        [f"py{python}", *(by_position.get((python, memory), MISSING) for memory, _ in memories)]
        for python in pythons
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    name = " · ".join(part for part in (workload, model, backend) if part)
    return "\n".join([f"{name}", line(header), *(line(row) for row in rows)])
