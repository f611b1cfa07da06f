"""The report's PNG images (matplotlib, Agg, imported only here): one heatmap per grid, failed timelines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gguf_sandbox.matrix.grid import Grid
from gguf_sandbox.matrix.report_data import MISSING_COLOUR, Report, ReportCell
from gguf_sandbox.matrix.results import CELL
from gguf_sandbox.matrix.timeline import LIMIT_COLOUR, USAGE_COLOUR, WORKING_SET_COLOUR
from gguf_sandbox.matrix.verdicts import peak_over_limit

INSTALL_HINT = "PNG images need matplotlib: pip install 'gguf-sandbox[report]'"
MIB = 1 << 20


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(text: str) -> str:
    """File-borne text for matplotlib, which would read `$…$` as math (and fail on bad math)."""
    return text.replace("$", r"\$")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:100] or "cells"


def write_pngs(report: Report, directory: Path, plt: Any) -> list[Path]:
    """Every image, named after its grid or cell; the paths written."""
    written: list[Path] = []
    names: set[str] = set()
    for index, grid in enumerate(report.grids):
        written.append(
            _heatmap(report, grid, _unique(f"grid-{slug(grid.name)}", names, index), directory, plt)
        )
    for cell in report.cells:
        if cell.timeline.samples and cell.failed:
            name = _unique(f"timeline-{slug(cell.record.cell_id)}", names, len(names))
            written.append(_timeline(cell, directory / f"{name}.png", plt))
    return written


def _unique(name: str, names: set[str], index: int) -> str:
    if name in names:
        name = f"{name}-{index}"
    names.add(name)
    return name


def _heatmap(report: Report, grid: Grid, name: str, directory: Path, plt: Any) -> Path:
    columns, rows = len(grid.memories), len(grid.pythons)
    figure, axes = plt.subplots(figsize=(1.3 + 1.15 * columns, 0.9 + 0.55 * rows))
    try:
        for row, python in enumerate(grid.pythons):
            for column, (memory, _) in enumerate(grid.memories):
                record = grid.at(python, memory)
                cell = report.cell(record) if record is not None else None
                outside = record is not None and not record.ok
                axes.add_patch(
                    plt.Rectangle(
                        (column, row),
                        1,
                        1,
                        facecolor=cell.colour if cell else MISSING_COLOUR,
                        edgecolor="#b00020" if outside else "#888888",
                        linewidth=2.5 if outside else 0.5,
                    )
                )
                if cell is not None and record is not None:
                    text = cell.label + ("!" if outside else "")
                    if record.kind == CELL:
                        text += "\n" + peak_over_limit(record.peak, record.limit or record.memory)
                    axes.text(column + 0.5, row + 0.5, plain(text), ha="center", va="center", fontsize=7)
        axes.set_xlim(0, columns)
        axes.set_ylim(rows, 0)
        axes.set_xticks([c + 0.5 for c in range(columns)], [plain(label) for _, label in grid.memories])
        axes.set_yticks([r + 0.5 for r in range(rows)], [plain(f"py{p}") for p in grid.pythons])
        axes.tick_params(length=0, labelsize=8)
        axes.set_title(plain(grid.name), fontsize=9)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path


def _timeline(cell: ReportCell, path: Path, plt: Any) -> Path:
    record = cell.record
    limit = record.limit or record.memory
    figure, axes = plt.subplots(figsize=(6.4, 2.6))
    try:
        samples = cell.timeline.samples
        times = [s.t_s for s in samples]
        # Usage drawn wide underneath: where it equals the working set (anonymous memory) both show.
        axes.plot(times, [s.usage / MIB for s in samples], color=USAGE_COLOUR, linewidth=3, label="usage")
        axes.plot(
            times, [s.working_set / MIB for s in samples], color=WORKING_SET_COLOUR, label="working set"
        )
        axes.axhline(limit / MIB, color=LIMIT_COLOUR, linestyle="--", label=f"limit {limit / MIB:.0f}M")
        kill = cell.timeline.oom_kill_s
        if kill is not None:
            axes.axvline(kill, color=LIMIT_COLOUR, linewidth=2, label=f"OOM kill {kill:.2f} s")
        axes.set_xlabel("seconds", fontsize=8)
        axes.set_ylabel("MiB", fontsize=8)
        axes.set_title(plain(f"{record.cell_id}: {cell.label}"), fontsize=8)
        axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path
