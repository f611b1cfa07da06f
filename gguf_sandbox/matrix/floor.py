"""`gguf-sandbox floor`: bisect the smallest memory limit at which a workload or command finishes gracefully.

Each probe runs the cell at one limit `--repeat` times, each on a cold page cache where the host allows it
(the interpreter's, the packages' and the model's file pages are then charged to the cell: the worst case);
a limit counts only when every run finished (pass or degraded). The search keeps a failing limit below a
finishing one and halves the gap down to `--resolution`. Exit 0 with the floor, 1 when the cell does not
finish even at `--max`, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import FLOORS_FILE, MAX_SECONDS, Floor, record_floor
from gguf_sandbox.host import host_facts
from gguf_sandbox.matrix.runner import run_spec
from gguf_sandbox.matrix.schema import Cell
from gguf_sandbox.matrix.sizes import cell_memory, size_at
from gguf_sandbox.matrix.verdicts import Reference, Verdict
from gguf_sandbox.sandbox.base import Sandbox
from gguf_sandbox.units import format_size

FINISHED = frozenset({Verdict.PASS, Verdict.DEGRADED})
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MiB = 1 << 20


@dataclass(frozen=True)
class Run:
    """One run of a probe."""

    verdict: Verdict
    peak: int | None
    duration_s: float
    reason: str
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None  # the workload's own, from its report
    cosine: float | None = None  # a peer's smallest cosine to ours

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "peak": self.peak,
            "duration_s": round(self.duration_s, 3),
            "reason": self.reason,
            **({"seconds": self.seconds} if self.seconds is not None else {}),
            **({"cosine": self.cosine} if self.cosine is not None else {}),
        }


# How much of a failing run's reason a probe's line shows.
REASON_CHARS: Final = 200


@dataclass(frozen=True)
class Probe:
    """All runs at one limit; it finished when every run did (a failing run ends the probe early)."""

    limit: int
    runs: tuple[Run, ...]

    @property
    def finished(self) -> bool:
        return all(run.verdict in FINISHED for run in self.runs)

    @property
    def peak(self) -> int | None:
        peaks = [run.peak for run in self.runs if run.peak is not None]
        return max(peaks) if peaks else None

    @property
    def seconds(self) -> float | None:
        """The slowest run's own seconds (what its report says the work took)."""
        values = [run.seconds for run in self.runs if run.seconds is not None]
        return max(values) if values else None

    @property
    def cosine(self) -> float | None:
        """A peer's smallest cosine to ours over the runs."""
        values = [run.cosine for run in self.runs if run.cosine is not None]
        return min(values) if values else None

    def line(self) -> str:
        """The limit, finished or failed, each run's verdict and peak; for a failed probe, why (its failing
        run's reason, first line): a refusal near a floor says which reservation did not fit."""
        runs = "  ".join(f"{run.verdict.value} {_mib(run.peak)}" for run in self.runs)
        line = f"  {format_size(self.limit):>6}  {'finished' if self.finished else 'failed  '}  {runs}"
        failing = next((run for run in self.runs if run.verdict not in FINISHED), None)
        if failing is None or not failing.reason.strip():
            return line
        why = failing.reason.strip().splitlines()[0]
        return f"{line}  ({why[: REASON_CHARS - 1] + '…' if len(why) > REASON_CHARS else why})"

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "finished": self.finished,
            "peak": self.peak,
            "runs": [run.to_json() for run in self.runs],
        }


@dataclass(frozen=True)
class Search:
    """The bisection's outcome: the floor (None when even the upper bound failed) and every probe."""

    floor: Probe | None
    probes: tuple[Probe, ...]
    lower_bound_finished: bool = False


def bisect(probe: Callable[[int], Probe], low: int, high: int, resolution: int) -> Search:
    """The smallest multiple of `resolution` in [low, high] at which `probe` finishes, assuming that a
    limit which finishes stays finished above (a cell's needs do not shrink with more memory).

    `high` is probed first: when it fails there is no floor. Limits below `low` are never probed; when
    `low` itself finishes, the floor is `low` (`lower_bound_finished`: it may lie lower still).
    """
    if resolution <= 0 or low <= 0 or high < low:
        raise MatrixError(
            f"floor: need 0 < --min <= --max and --resolution > 0 (got {low}, {high}, {resolution})"
        )
    probes: list[Probe] = []

    def at(units: int) -> Probe:
        done = probe(units * resolution)
        probes.append(done)
        return done

    top = high // resolution
    bottom = -(-low // resolution)
    if top < bottom:
        raise MatrixError(f"floor: no multiple of {format_size(resolution)} between --min and --max")
    best = at(top)
    if not best.finished:
        return Search(None, tuple(probes))
    failing = bottom - 1  # assumed to fail: never probed
    finishing = top
    while finishing - failing > 1:
        middle = (failing + finishing) // 2
        done = at(middle)
        if done.finished:
            finishing, best = middle, done
        else:
            failing = middle
    return Search(best, tuple(probes), lower_bound_finished=finishing == bottom)


def drop_page_caches() -> str | None:
    """Write back and drop the page cache, so the next run starts cold; None, or why it could not."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as error:
        return f"page caches not dropped ({error.strerror}; needs root): floors may come out lower than cold"
    return None


class Prober:
    """Runs a cell at a given limit `repeat` times through its backend and keeps every run."""

    def __init__(
        self,
        sandbox: Sandbox,
        cell: Cell,
        repeat: int,
        *,
        cold: bool,
        out: Callable[[str], None],
        reference: Reference | None = None,
    ) -> None:
        self.reference = reference
        self.sandbox = sandbox
        self.cell = cell
        self.repeat = repeat
        self.cold = cold
        self.out = out
        self.cache_note: str | None = None
        self.versions: dict[str, str] = {}

    def __call__(self, limit: int) -> Probe:
        runs: list[Run] = []
        for _ in range(self.repeat):
            if self.cold:
                note = drop_page_caches()
                if note is not None and self.cache_note is None:
                    self.cache_note = note
                    self.out(note)
            spec = replace(
                self.cell.spec, memory=limit, cell_id=f"{self.cell.cell_id}-floor-{format_size(limit)}"
            )
            outcome = run_spec(
                self.sandbox,
                spec,
                self.reference,
                expect=self.cell.expect,
                host_side=self.cell.host_side,
                needs_report=self.cell.reports,
            )
            versions = (outcome.report or {}).get("versions")
            if isinstance(versions, dict):
                self.versions = {str(k): str(v) for k, v in versions.items()}
            runs.append(
                Run(
                    outcome.verdict,
                    outcome.peak,
                    outcome.duration_s,
                    outcome.reason,
                    seconds=_work_seconds(outcome.report),
                    cosine=outcome.agreement.smallest if outcome.agreement is not None else None,
                )
            )
            if outcome.verdict not in FINISHED:
                break
        done = Probe(limit, tuple(runs))
        self.out(done.line())
        return done


def _work_seconds(report: Mapping[str, Any] | None) -> float | None:
    """The seconds a report says its work took, when a number a floors file holds: the report is untrusted,
    and NaN, inf, a bool or 10**400 recorded would leave a floors file no one reads back."""
    seconds = (report or {}).get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_SECONDS:
        return None
    return float(seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gguf_sandbox.matrix.repro import add_cell_arguments

    parser.add_argument(
        "--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="the cell's Python"
    )
    add_cell_arguments(parser)
    parser.add_argument("--min", default="16m", help="lowest limit probed (default 16m)")
    parser.add_argument("--max", default="1g", help="highest limit probed, first (default 1g)")
    parser.add_argument("--resolution", default="1m", help="step of the search (default 1m)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per limit, all must finish (default 3)")
    parser.add_argument(
        "--warm", action="store_true", help="keep the page cache between runs (default: drop it, if root)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    parser.add_argument(
        "--record",
        nargs="?",
        const=str(FLOORS_FILE),
        metavar="FILE",
        help=f"record the floor of a --workload in a floors file (default {FLOORS_FILE.name} of the package)",
    )


def run(args: argparse.Namespace) -> int:
    from gguf_sandbox.matrix.repro import reference_run, request_cell

    if args.repeat < 1:
        raise MatrixError("--repeat: at least 1")
    low, high = cell_memory(args.min, "--min"), cell_memory(args.max, "--max")
    resolution = size_at(args.resolution, "--resolution")
    if args.record and not args.workload:
        raise MatrixError("--record: only the floor of a --workload can be recorded (a command has no name)")
    request = request_cell(args, high)
    cell, sandbox = request.cell, request.sandbox

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    what = f"{cell.workload}{' ' + cell.model if cell.model else ''}"
    say(
        f"floor of {what} on {sandbox.name}, Python {args.python}: {format_size(low)}…{format_size(high)} "
        f"in steps of {format_size(resolution)}, {args.repeat} run(s) per limit, "
        f"{'warm' if args.warm else 'cold'} page cache"
    )
    started = time.monotonic()
    # A peer is compared with ours at every probe: a floor where its vectors go wrong is no floor.
    reference = reference_run(sandbox, cell, request.matrix, say) if cell.min_cosine is not None else None
    prober = Prober(sandbox, cell, args.repeat, cold=not args.warm, out=say, reference=reference)
    search = bisect(prober, low, high, resolution)
    elapsed = time.monotonic() - started
    runs = sum(len(p.runs) for p in search.probes)
    context = FloorContext(
        cell,
        args.python,
        sandbox.name,
        resolution,
        args.repeat,
        cold=not args.warm and prober.cache_note is None,
    )
    summary = context.summary(search, prober.versions, elapsed)
    if args.json:
        print(json.dumps(summary))
    if search.floor is None:
        last = search.probes[0].runs[-1]
        print(
            f"gguf-sandbox floor: {what} does not finish even at --max {format_size(high)} "
            f"({last.verdict.value}: {last.reason}); raise --max or fix the cell",
            file=sys.stderr,
        )
        return 1
    floor = search.floor
    lower = (
        " (the lowest limit probed: it may finish lower still; lower --min)"
        if search.lower_bound_finished
        else ""
    )
    say(
        f"floor: {format_size(floor.limit)}{lower} — peak {_mib(floor.peak)}, "
        f"{len(search.probes)} limits, {runs} runs in {elapsed:.0f}s"
    )
    if args.record:
        table = record_floor(context.record(floor, prober.versions), Path(args.record))
        say(f"recorded in {args.record} ({len(table.floors)} floors)")
    return 0


@dataclass(frozen=True)
class FloorContext:
    """What was searched, where and how: the summary's and the floors file's shared facts."""

    cell: Cell
    python: str
    backend: str
    resolution: int
    repeat: int
    cold: bool

    def summary(self, search: Search, versions: dict[str, str], elapsed: float) -> dict[str, Any]:
        floor = search.floor
        return {
            "floor": floor.limit if floor is not None else None,
            "peak": floor.peak if floor is not None else None,
            "work_seconds": floor.seconds if floor is not None else None,
            "cosine": floor.cosine if floor is not None else None,
            "verdict": floor.runs[-1].verdict.value if floor is not None else None,
            "workload": self.cell.workload,
            "model": self.cell.model,
            "python": self.python,
            "backend": self.backend,
            "resolution": self.resolution,
            "repeat": self.repeat,
            "cold_caches": self.cold,
            "lower_bound_finished": search.lower_bound_finished,
            "seconds": round(elapsed, 1),
            "versions": versions,
            "probes": [p.to_json() for p in search.probes],
        }

    def record(self, floor: Probe, versions: dict[str, str]) -> Floor:
        host = host_facts()
        measured_on = {
            **versions,
            "kernel": host["kernel"],
            "machine": host["machine"],
            "cpus": str(os.cpu_count() or 0),
            "cold_caches": str(self.cold).lower(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
        return Floor(
            workload=self.cell.workload,
            model=self.cell.model,
            python=self.python,
            backend=self.backend,
            floor=floor.limit,
            peak=floor.peak,
            resolution=self.resolution,
            repeat=self.repeat,
            args=_workload_options(self.cell.spec.argv),
            measured_on=measured_on,
            seconds=floor.seconds,
            cosine=floor.cosine,
        )


def _workload_options(argv: Sequence[str]) -> dict[str, str]:
    """`--count 1000 --batch 16` in a cell's argv → {"count": "1000", "batch": "16"} (the model excluded)."""
    options: dict[str, str] = {}
    words = list(argv)
    for index, word in enumerate(words[:-1]):
        if word.startswith("--") and word != "--model":
            options[word[2:]] = words[index + 1]
    return options


def _mib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / MiB:.1f}M"
