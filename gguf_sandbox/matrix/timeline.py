"""A cell's memory timeline in a report: read from its record's `timeline` fields, drawn as an inline SVG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gguf_sandbox.sandbox.sampling import MAX_POINTS, MemorySample, Timeline

# A backend writes ≤ MAX_POINTS points; ten times that in a record is damage, not a timeline.
MAX_READ_POINTS = 10 * MAX_POINTS
WIDTH, HEIGHT = 640, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 12, 12, 30
MIB = 1 << 20
USAGE_COLOUR, WORKING_SET_COLOUR, LIMIT_COLOUR = "#1f77b4", "#2ca02c", "#d62728"


def parse_timeline(record: Mapping[str, Any]) -> Timeline:
    """A record's `timeline` ([[t_s, usage_bytes, working_set_bytes], …], put in time order) and
    `oom_kill_s`; no samples when the field is absent, too long, or any sample is not three finite
    non-negative numbers, no kill moment when that is not one such number."""
    value = record.get("timeline")
    moment = record.get("oom_kill_s")
    oom_kill_s = float(moment) if isinstance(moment, int | float) and _number(moment) else None
    if not isinstance(value, list) or not value or len(value) > MAX_READ_POINTS:
        return Timeline((), oom_kill_s)
    samples = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3 or not all(_number(x) for x in item):
            return Timeline((), oom_kill_s)
        samples.append(MemorySample(float(item[0]), int(item[1]), int(item[2])))
    return Timeline(tuple(sorted(samples, key=lambda s: s.t_s)), oom_kill_s)


def _number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
        and value < 1 << 62
    )


def timeline_svg(timeline: Timeline, limit: int, title: str = "") -> str:
    """An SVG of usage and working set over time, with the limit as a red dashed line and the moment of
    an OOM kill as a red vertical line (both labelled).

    Everything in it is numbers and fixed words except `title`, which the caller must have escaped."""
    samples = timeline.samples
    top_value = max([limit, *(s.usage for s in samples), *(s.working_set for s in samples), 1])
    end = max([s.t_s for s in samples] + [timeline.oom_kill_s or 0.0]) or 1.0
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(t: float) -> float:
        return MARGIN_LEFT + plot_w * t / end

    def y(nbytes: float) -> float:
        return MARGIN_TOP + plot_h * (1 - nbytes / (top_value * 1.05))

    def path(values: Sequence[tuple[float, int]]) -> str:
        return " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in values)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f"<title>{title or 'memory timeline'}</title>",
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="#fafafa" stroke="#999"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = top_value * fraction
        parts.append(
            f'<text x="{MARGIN_LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="10">'
            f"{value / MIB:.0f}M</text>"
        )
    parts.append(
        f'<text x="{MARGIN_LEFT}" y="{HEIGHT - 8}" font-size="10">0 s</text>'
        f'<text x="{WIDTH - MARGIN_RIGHT}" y="{HEIGHT - 8}" text-anchor="end" font-size="10">'
        f"{end:.2f} s</text>"
    )
    if limit > 0:
        parts.append(
            f'<line class="limit" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y(limit):.1f}" '
            f'y2="{y(limit):.1f}" stroke="{LIMIT_COLOUR}" stroke-dasharray="6 3"/>'
            f'<text x="{WIDTH - MARGIN_RIGHT - 4}" y="{y(limit) - 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="{LIMIT_COLOUR}">limit {limit / MIB:.0f}M</text>'
        )
    if timeline.oom_kill_s is not None:
        at = x(timeline.oom_kill_s)
        parts.append(
            f'<line class="oom-kill" x1="{at:.1f}" x2="{at:.1f}" y1="{MARGIN_TOP}" '
            f'y2="{HEIGHT - MARGIN_BOTTOM}" stroke="{LIMIT_COLOUR}" stroke-width="2"/>'
            f'<text x="{at - 4:.1f}" y="{MARGIN_TOP + 24}" text-anchor="end" font-size="10" '
            f'fill="{LIMIT_COLOUR}">OOM kill {timeline.oom_kill_s:.2f} s</text>'
        )
    for name, colour, values in (
        ("usage", USAGE_COLOUR, [(s.t_s, s.usage) for s in samples]),
        ("working set", WORKING_SET_COLOUR, [(s.t_s, s.working_set) for s in samples]),
    ):
        if values:
            parts.append(
                f'<polyline class="{name.replace(" ", "-")}" fill="none" stroke="{colour}" '
                f'stroke-width="1.5" points="{path(values)}"/>'
            )
    parts.append(
        f'<text x="{MARGIN_LEFT + 6}" y="{MARGIN_TOP + 12}" font-size="10" fill="{USAGE_COLOUR}">usage</text>'
        f'<text x="{MARGIN_LEFT + 46}" y="{MARGIN_TOP + 12}" font-size="10" fill="{WORKING_SET_COLOUR}">'
        "working set</text></svg>"
    )
    return "".join(parts)
