"""The report's index.html: self-contained (inline CSS and SVG, no script), file-borne text escaped."""

from __future__ import annotations

from html import escape

from gguf_sandbox.floors import FloorTable, per_thousand
from gguf_sandbox.matrix.grid import LEGEND, Grid
from gguf_sandbox.matrix.report_data import VERDICT_COLOURS, Report, ReportCell, isolation_text
from gguf_sandbox.matrix.results import CELL
from gguf_sandbox.matrix.timeline import timeline_svg
from gguf_sandbox.matrix.verdicts import Outcome, peak_over_limit
from gguf_sandbox.units import format_size

# Log lines are whatever a crashing cell printed: shown cut to this many lines of this many characters.
MAX_LOG_LINES = 40
MAX_LOG_LINE = 2_000
MAX_REASON = 2_000

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
table.grid td { text-align: center; font-family: ui-monospace, monospace; font-size: 12px; min-width: 6em; }
table.grid td a { color: #111; text-decoration: none; display: block; }
table.grid td.outside { outline: 3px solid #b00020; outline-offset: -3px; font-weight: bold; }
.mark { color: #b00020; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 4px; border: 1px solid #aaa; }
details { margin: .3em 0; border: 1px solid #ddd; padding: .3em .6em; }
details.outside { border-color: #b00020; }
details:target { background: #fff8dc; }
pre { background: #f5f5f5; padding: .5em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
code { font-family: ui-monospace, monospace; }
"""


def render_html(report: Report) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>gguf-sandbox matrix report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>gguf-sandbox matrix report</h1>",
        _metadata(report),
        _counts(report),
        _legend(),
        "<h2>Grids</h2>",
        *(_grid(report, grid) for grid in report.grids),
    ]
    if report.floors is not None and report.floors.floors:
        parts.append(_floors(report.floors))
    parts.append("<h2>Cells</h2>")
    parts += [_detail(cell) for cell in report.cells]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _metadata(report: Report) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in report.metadata())
    return f'<h2>Run</h2><table class="meta">{rows}</table>'


def _counts(report: Report) -> str:
    counts: dict[str, int] = {}
    for cell in report.cells:
        counts[cell.label] = counts.get(cell.label, 0) + 1
    outside = [c for c in report.cells if not c.record.ok]
    items = ", ".join(f"{n} {escape(label)}" for label, n in sorted(counts.items()))
    links = " ".join(f'<a href="#{c.anchor}">{escape(c.record.cell_id)}</a>' for c in outside[:200]) + (
        f" … and {len(outside) - 200} more" if len(outside) > 200 else ""
    )
    verdict = (
        f'<p class="mark"><strong>{len(outside)} outside expect</strong>: {links}</p>'
        if outside
        else "<p>every decided cell is within its expect</p>"
    )
    return f"<p>{len(report.cells)} cells: {items}</p>{verdict}"


def _legend() -> str:
    swatches = "".join(
        f'<span style="background:{colour}">{verdict.value}</span>'
        for verdict, colour in VERDICT_COLOURS.items()
    )
    return f'<p class="legend">{swatches}</p><p>{escape(LEGEND)}; outlined cells are outside expect.</p>'


def _grid(report: Report, grid: Grid) -> str:
    header = "".join(f"<th>{escape(label)}</th>" for _, label in grid.memories)
    rows = []
    for python in grid.pythons:
        tds = []
        for memory, _ in grid.memories:
            record = grid.at(python, memory)
            if record is None:
                tds.append('<td class="missing">·</td>')
                continue
            cell = report.cell(record)
            outside = not record.ok
            mark = '<span class="mark">!</span>' if outside else ""
            text = escape(cell.label) + mark
            if record.kind == CELL:
                text += "<br>" + escape(peak_over_limit(record.peak, record.limit or record.memory))
            tds.append(
                f'<td class="{"outside" if outside else "inside"}" style="background:{cell.colour}" '
                f'title="{escape(record.cell_id)}"><a href="#{cell.anchor}">{text}</a></td>'
            )
        rows.append(f"<tr><th>py{escape(python)}</th>{''.join(tds)}</tr>")
    return (
        f"<h3>{escape(grid.name)}</h3>"
        f'<table class="grid"><tr><th>python</th>{header}</tr>{"".join(rows)}</table>'
    )


def _or_dash(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _floors(table: FloorTable) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(str(v))}</td>"
            for v in (
                f.workload,
                f.model or "",
                f.python,
                f.backend,
                format_size(f.floor),
                format_size(f.peak) if f.peak else "?",
                _or_dash(per_thousand(f), ".1f"),
                _or_dash(f.cosine, ".5f"),
                f"{f.repeat}× at {format_size(f.resolution)} steps",
            )
        )
        + "</tr>"
        for f in table.floors
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "workload",
            "model",
            "Python",
            "backend",
            "floor",
            "peak",
            "s / 1000 texts",
            "cosine to ours",
            "probes",
        )
    )
    return f'<h2>Floors</h2><table class="floors"><tr>{head}</tr>{rows}</table>{floors_svg(table)}'


BAR_HEIGHT = 18
LABEL_WIDTH = 360
BAR_WIDTH = 420


def floors_svg(table: FloorTable) -> str:
    """A horizontal bar per floor, longest = the largest floor: how small a box each engine needs."""
    if not table.floors:
        return ""
    largest = max(f.floor for f in table.floors)
    bars = []
    for row, f in enumerate(table.floors):
        y = row * BAR_HEIGHT
        width = max(1, round(BAR_WIDTH * f.floor / largest))
        label = escape(f"{f.workload} {f.model or ''} py{f.python} {f.backend}")
        bars.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 13}" text-anchor="end">{label}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{width}" height="{BAR_HEIGHT - 6}" fill="#4a7bb7"/>'
            f'<text x="{LABEL_WIDTH + width + 4}" y="{y + 13}">{escape(format_size(f.floor))}</text>'
        )
    height = BAR_HEIGHT * len(table.floors)
    return (
        f'<svg class="floors" role="img" aria-label="floors" width="{LABEL_WIDTH + BAR_WIDTH + 60}" '
        f'height="{height}" font-size="12" font-family="system-ui, sans-serif">{"".join(bars)}</svg>'
    )


def _detail(cell: ReportCell) -> str:
    record = cell.record
    outside = not record.ok
    expected = "|".join(sorted(v.value for v in record.expected)) or "?"
    summary = f"<code>{escape(record.cell_id)}</code> — {escape(cell.label)}" + (
        ' <span class="mark">! outside expect</span>' if outside else ""
    )
    rows = [("verdict", cell.label), ("expect", expected), ("reason", _cut(record.reason, MAX_REASON))]
    tail: tuple[str, ...] = ()
    if record.kind == CELL and record.verdict is not None:
        outcome = Outcome.from_json(cell.data, repro=cell.repro, expected=record.expected)
        rows += [
            ("limit", _mib(outcome.limit or record.memory)),
            ("peak", _mib(outcome.peak)),
            ("OOM signals", outcome.oom.describe()),
            ("plan", outcome.plan or "not reported"),
            ("exit code", str(outcome.exit_code)),
            ("duration", f"{outcome.duration_s:.1f} s"),
        ]
        if cell.timeline.oom_kill_s is not None:
            rows.append(("OOM kill at", f"{cell.timeline.oom_kill_s:.2f} s"))
        isolation = isolation_text(cell.data.get("isolation"))
        if isolation:
            rows.append(("isolation", isolation))
        tail = outcome.log_tail
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    parts = [
        f'<details id="{cell.anchor}" class="{"outside" if outside else "inside"}"'
        f"{' open' if outside else ''}><summary>{summary}</summary><table>{table}</table>"
    ]
    if cell.repro:
        note = " (rebuilt: the record predates repro lines)" if cell.repro_rebuilt else ""
        parts.append(f"<p>reproduce{note}:</p><pre><code>{escape(cell.repro)}</code></pre>")
    if tail:
        shown = [_cut(line, MAX_LOG_LINE) for line in tail[-MAX_LOG_LINES:]]
        parts.append(f"<p>last {len(shown)} log lines:</p><pre>{escape(chr(10).join(shown))}</pre>")
    if cell.timeline.samples:
        limit = record.limit or record.memory
        parts.append(timeline_svg(cell.timeline, limit, title=escape(f"memory of {record.cell_id}")))
    parts.append("</details>")
    return "".join(parts)


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / (1 << 20):.1f} MiB"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
