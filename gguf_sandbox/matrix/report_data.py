"""What a report shows, read from results files: run headers, the latest record per cell, grids, floors."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.floors import FloorTable, load_floors
from gguf_sandbox.matrix.expand import repro_command
from gguf_sandbox.matrix.grid import Grid, grids
from gguf_sandbox.matrix.results import CELL, ERROR, RUN, SKIP, CellRecord, check_ours, read_records
from gguf_sandbox.matrix.timeline import parse_timeline
from gguf_sandbox.matrix.verdicts import Verdict
from gguf_sandbox.sandbox.base import CellSpec
from gguf_sandbox.sandbox.sampling import Timeline

# Colour by verdict: graceful ones green to blue, failures warm; the heatmaps (HTML and PNG) share them.
VERDICT_COLOURS: Mapping[Verdict, str] = {
    Verdict.PASS: "#8fd18f",
    Verdict.DEGRADED: "#f2d16b",
    Verdict.REFUSED: "#9ec5f0",
    Verdict.OOM: "#e8736b",
    Verdict.CRASH: "#c9719f",
    Verdict.TIMEOUT: "#f0a35e",
    Verdict.WRONG: "#a34747",
    Verdict.ERROR: "#b0b0b0",
}
SKIP_COLOUR = "#e6e6e6"
HARNESS_ERROR_COLOUR = "#b0b0b0"
MISSING_COLOUR = "#ffffff"
# Metadata values and reasons come from files: long ones are cut, never trusted to be short.
MAX_TEXT = 300
# A lone surrogate: what a JSON \\udXXX escape can put into a str, and UTF-8 and fonts cannot hold.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ReportCell:
    """One cell as the report shows it: its record, the raw fields, an HTML anchor and its timeline."""

    record: CellRecord
    data: Mapping[str, Any]
    anchor: str
    repro: str  # the record's repro line, else one rebuilt from its fields ("" for a cell without workload)
    repro_rebuilt: bool
    timeline: Timeline

    @property
    def label(self) -> str:
        """`pass`, `oom`, … for decided cells; `skip` or `error` for the others."""
        if self.record.kind == CELL and self.record.verdict is not None:
            return self.record.verdict.value
        return "skip" if self.record.kind == SKIP else "error"

    @property
    def colour(self) -> str:
        if self.record.kind == SKIP:
            return SKIP_COLOUR
        if self.record.verdict is None:
            return HARNESS_ERROR_COLOUR
        return VERDICT_COLOURS[self.record.verdict]

    @property
    def failed(self) -> bool:
        """Not a plain pass: the cells whose timelines are worth a picture."""
        return self.record.kind == ERROR or self.record.verdict not in (None, Verdict.PASS, Verdict.REFUSED)


@dataclass(frozen=True)
class Report:
    """Everything the HTML, PNG and Markdown outputs are written from."""

    sources: tuple[Path, ...]
    headers: tuple[Mapping[str, Any], ...]
    cells: tuple[ReportCell, ...]
    grids: tuple[Grid, ...]
    floors: FloorTable | None = None

    def cell(self, record: CellRecord) -> ReportCell:
        return self._by_id[record.cell_id]

    @cached_property
    def _by_id(self) -> Mapping[str, ReportCell]:
        return {c.record.cell_id: c for c in self.cells}

    def metadata(self) -> list[tuple[str, str]]:
        """(name, value) rows about the runs: sources, versions, host, backends, cells, duration."""
        rows = [("results", ", ".join(str(p) for p in self.sources))]
        for key in ("version", "matrix", "profile", "k", "shard"):
            values = _distinct(h.get(key) for h in self.headers)
            if values:
                rows.append(("gguf-sandbox" if key == "version" else key, values))
        backends = _distinct(
            b for h in self.headers if isinstance(h.get("backends"), list) for b in h["backends"]
        )
        rows.append(("backends", backends or _distinct(c.record.backend for c in self.cells)))
        host = [h["host"] for h in self.headers if isinstance(h.get("host"), dict)]
        for name in dict.fromkeys(k for item in host for k in item):
            rows.append((f"host {name}", _distinct(item.get(name) for item in host)))
        versions: dict[str, dict[str, None]] = {}
        for cell in self.cells:
            report = cell.data.get("report")
            found = report.get("versions") if isinstance(report, dict) else None
            if isinstance(found, dict):
                for name, value in found.items():
                    versions.setdefault(str(name), {})[str(value)] = None
        for name, seen in versions.items():
            rows.append((name, ", ".join(sorted(seen))))
        seconds = sum(_seconds(c.data.get("duration_s")) for c in self.cells)
        times = [t for r in (*self.headers, *(c.data for c in self.cells)) if (t := _seconds(r.get("time")))]
        span = f", {max(times) - min(times):.0f} s from first to last record" if len(times) > 1 else ""
        for backend in dict.fromkeys(c.record.backend for c in self.cells):
            cells = [c for c in self.cells if c.record.backend == backend]
            described = dict.fromkeys(isolation_text(c.data.get("isolation")) for c in cells)
            described.pop("", None)
            if described:
                rows.append((f"isolation ({backend})", " | ".join(described)))
        rows.append(("cells", f"{len(self.cells)} in {len(self.grids)} grids"))
        rows.append(("duration", f"{seconds:.0f} s in cells{span}"))
        return [(name, _cut(value)) for name, value in rows]


def displayable(record: dict[str, Any]) -> dict[str, Any]:
    """A record with every lone surrogate in its strings (JSON's "\\ud800" escapes) replaced by U+FFFD:
    HTML and Markdown are written as UTF-8, which cannot hold them, and fonts cannot draw them. Walked with
    a stack, not recursion: a record nests as deep as the JSON reader allowed."""
    root: list[Any] = [record]
    pending: list[tuple[Any, Any]] = [(root, 0)]
    while pending:
        container, key = pending.pop()
        value = container[key]
        if isinstance(value, str):
            container[key] = _SURROGATE.sub("\ufffd", value)
        elif isinstance(value, dict):
            copy = {_SURROGATE.sub("\ufffd", name): item for name, item in value.items()}
            container[key] = copy
            pending.extend((copy, name) for name, item in copy.items() if isinstance(item, str | dict | list))
        elif isinstance(value, list):
            items = list(value)
            container[key] = items
            pending.extend((items, i) for i, item in enumerate(items) if isinstance(item, str | dict | list))
    fixed: dict[str, Any] = root[0]
    return fixed


def load_report(
    paths: Sequence[Path], floors: Path | None = None, warn: Callable[[str], None] | None = None
) -> Report:
    """Read the results files (damaged lines reported through `warn` and skipped, as --grid does); the
    latest record of each cell wins across files. A missing file, a directory, a file that is not ours or
    files without a single cell are one-line errors."""
    headers: list[Mapping[str, Any]] = []
    latest: dict[str, tuple[Mapping[str, Any], str | None]] = {}  # cell id → (record, its run's matrix)
    for path in paths:
        if not check_ours(path, "report"):
            raise GGUFSandboxError(f"report {path}: no such results file")
        matrix: str | None = None
        for record in map(displayable, read_records(path, warn)):
            if record["kind"] == RUN:
                headers.append(record)
                matrix = str(record["matrix"]) if isinstance(record.get("matrix"), str) else None
            elif record["kind"] in (CELL, SKIP, ERROR):
                latest[str(record["cell_id"])] = (record, matrix)
    if not latest:
        names = ", ".join(str(p) for p in paths)
        raise GGUFSandboxError(
            f"report {names}: no cell records; give the --results files of `gguf-sandbox run`"
        )
    anchors: set[str] = set()
    cells = tuple(_cell(data, matrix, anchors) for data, matrix in latest.values())
    return Report(
        sources=tuple(paths),
        headers=tuple(headers),
        cells=cells,
        grids=tuple(grids(c.record for c in cells)),
        floors=load_floors(floors) if floors is not None else None,
    )


def _cell(data: Mapping[str, Any], matrix: str | None, anchors: set[str]) -> ReportCell:
    record = CellRecord.from_json(data)
    anchor = "cell-" + re.sub(r"[^A-Za-z0-9_.-]", "_", record.cell_id)[:120]
    base, n = anchor, 1
    while anchor in anchors:  # ids differing only in characters an anchor cannot hold
        n += 1
        anchor = f"{base}-{n}"
    anchors.add(anchor)
    repro, rebuilt = record.repro, False
    if not repro and record.workload and record.kind != SKIP:
        spec = CellSpec(record.cell_id, record.backend, record.python, record.memory, argv=())
        repro = repro_command(spec, record.workload, record.model, Path(matrix) if matrix else None)
        rebuilt = True
    return ReportCell(record, data, anchor, repro, rebuilt, parse_timeline(data))


def _distinct(values: Any) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v is not None and v != ""))


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def isolation_text(value: Any) -> str:
    """A record's `isolation` ({"held": [...], "missing": {property: why}}) as one line; "" when absent."""
    if not isinstance(value, dict):
        return ""
    held = value.get("held")
    missing = value.get("missing")
    text = ", ".join(str(item) for item in held) if isinstance(held, list) else ""
    if isinstance(missing, dict) and missing:
        text += "; missing: " + "; ".join(f"{item} ({why})" for item, why in missing.items())
    return text
