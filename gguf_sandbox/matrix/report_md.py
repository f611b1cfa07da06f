"""The report's summary.md: counts, cells outside expect with repro lines, the grids — under a size bound."""

from __future__ import annotations

from html import escape

from gguf_sandbox.matrix.grid import LEGEND, MISSING, Grid, cell_text
from gguf_sandbox.matrix.report_data import Report

# GitHub's step summary takes up to 1 MiB per step, and a summary that large is unreadable: stay far below.
MAX_SUMMARY_BYTES = 60 << 10
# Room kept for the truncation note.
NOTE_RESERVE = 512


def md_text(value: str) -> str:
    """A file-borne string inside a Markdown table or line: HTML escaped, pipes and backticks neutral."""
    return escape(value).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def render_summary(report: Report, limit: int = MAX_SUMMARY_BYTES) -> str:
    """The summary, whole blocks only: when the next block would pass `limit` bytes, a note ends it."""
    counts: dict[str, int] = {}
    for cell in report.cells:
        counts[cell.label] = counts.get(cell.label, 0) + 1
    outside = [c for c in report.cells if not c.record.ok]
    blocks = [
        "## gguf-sandbox matrix report",
        f"{len(report.cells)} cells: " + ", ".join(f"{n} {md_text(k)}" for k, n in sorted(counts.items())),
    ]
    if outside:
        blocks.append(f"### {len(outside)} outside expect")
        for cell in outside:
            expected = "|".join(sorted(v.value for v in cell.record.expected)) or "?"
            line = (
                f"- `{md_text(cell.record.cell_id)}`: {md_text(cell_text(cell.record))} (expected {expected})"
            )
            if cell.repro:
                line += f"\n  `{md_text(cell.repro)}`"
            blocks.append(line)
    else:
        blocks.append("Every decided cell is within its expect.")
    blocks.append("### Grids")
    blocks += [_grid(grid) for grid in report.grids]
    blocks.append(md_text(LEGEND))
    out: list[str] = []
    size = 0
    for index, block in enumerate(blocks):
        cost = len(block.encode("utf-8", "backslashreplace")) + 2
        if size + cost > limit - NOTE_RESERVE:
            out.append(
                f"**Truncated**: {len(blocks) - index} more blocks (of {len(blocks)}) do not fit the "
                f"{limit >> 10} KiB bound; index.html in the report directory has every cell."
            )
            break
        out.append(block)
        size += cost
    return "\n\n".join(out) + "\n"


def _grid(grid: Grid) -> str:
    header = "| python | " + " | ".join(md_text(label) for _, label in grid.memories) + " |"
    rule = "|---" * (len(grid.memories) + 1) + "|"
    rows = []
    for python in grid.pythons:
        texts = []
        for memory, _ in grid.memories:
            record = grid.at(python, memory)
            text = MISSING if record is None else md_text(cell_text(record))
            texts.append(f"**{text}**" if record is not None and not record.ok else text)
        rows.append(f"| py{md_text(python)} | " + " | ".join(texts) + " |")
    return "\n".join([f"**{md_text(grid.name)}**", "", header, rule, *rows])
