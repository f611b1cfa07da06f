"""Shards of a matrix run: each cell's expected cost, and a deterministic, balanced split over N runners."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gguf_sandbox import log
from gguf_sandbox.errors import GGUFSandboxError, MatrixError
from gguf_sandbox.floors import MAX_SECONDS
from gguf_sandbox.matrix.results import CELL, REFERENCE, scan
from gguf_sandbox.matrix.runnables import RUNNABLES, RunKind
from gguf_sandbox.matrix.schema import Cell, Matrix, WorkloadDef
from gguf_sandbox.units import show
from gguf_sandbox.workloads.command import DEFAULT_COUNTS

LOG = log.get(__name__)

# More runners than this is a typo, not a CI setup (GitHub caps a job matrix at 256 jobs).
MAX_SHARDS = 256
_SHARD = re.compile(r"(\d+)/(\d+)")
_DIGITS = len(str(MAX_SHARDS))


@dataclass(frozen=True)
class Shard:
    """Part `index` (1-based) of `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`I/N` with 1 ≤ I ≤ N ≤ MAX_SHARDS, else MatrixError."""
    match = _SHARD.fullmatch(text.strip())
    if match is None:
        raise MatrixError(f"--shard {text[:40]!r}: expected I/N, e.g. 1/4 for the first of 4 shards")
    # Compared as text first: int() of a number thousands of digits long is itself an error.
    index_text, count_text = (group.lstrip("0") or "0" for group in match.groups())
    if len(count_text) > _DIGITS or not 1 <= int(count_text) <= MAX_SHARDS:
        raise MatrixError(f"--shard {text[:40]}: N must be from 1 to {MAX_SHARDS}")
    count = int(count_text)
    if len(index_text) > _DIGITS or not 1 <= int(index_text) <= count:
        raise MatrixError(f"--shard {text[:40]}: I must be from 1 to N ({count})")
    return Shard(int(index_text), count)


@dataclass(frozen=True)
class Estimate:
    """Seconds a cell takes: `fixed` (interpreter, imports, model) plus `per_item` per embedding or call."""

    fixed: float
    per_item: float = 0.0


# Medians of full default-matrix runs on a busy 2-core host (both backends, Dec 2026): parse and stream
# ~1 s on either model; embed 1000 texts ~26 s, embed-concurrent 400 texts ~17 s; mcp 100 calls ~5 s (ci
# profile), and the README's ~70 minutes for the 1000-item embed/mcp cells puts 1000 calls near 45 s;
# naive-load ~2 s, alloc-bomb ~0.5 s, refusing-engine ~0.3 s, perturbed-engine 50 texts ~1.6 s. Only the
# ratios matter for balance; `--durations` replaces them with what a previous run measured.
ESTIMATES: Mapping[tuple[RunKind, str], Estimate] = MappingProxyType(
    {
        (RunKind.WORKLOAD, "parse"): Estimate(1.0),
        (RunKind.WORKLOAD, "stream"): Estimate(1.0),
        (RunKind.WORKLOAD, "embed"): Estimate(1.0, 0.025),
        (RunKind.WORKLOAD, "embed-concurrent"): Estimate(1.0, 0.04),
        (RunKind.WORKLOAD, "mcp"): Estimate(1.0, 0.045),
        (RunKind.CONTROL, "naive-load"): Estimate(2.0),
        (RunKind.CONTROL, "alloc-bomb"): Estimate(0.5),
        (RunKind.CONTROL, "refusing-engine"): Estimate(0.3),
        (RunKind.CONTROL, "perturbed-engine"): Estimate(0.3, 0.025),
    }
)
# A `command:` entry is the user's own program: nothing is known of it but its timeout.
UNKNOWN_FRACTION_OF_TIMEOUT = 0.1


def estimate_seconds(workload: WorkloadDef, timeout: float) -> float:
    """The expected seconds of one cell of `workload` (never above its timeout)."""
    estimate = ESTIMATES.get((workload.kind, workload.target))
    if estimate is None:
        return timeout * UNKNOWN_FRACTION_OF_TIMEOUT
    return min(timeout, estimate.fixed + estimate.per_item * _count(workload))


def _count(workload: WorkloadDef) -> int:
    """The items a cell of `workload` processes: its `count` option, else the runnable's default."""
    given = workload.options.get("count")
    if given is not None and str(given).isdigit():
        return int(given)
    runnable = RUNNABLES.get(workload.kind, {}).get(workload.target)
    option = runnable.options.get("count") if runnable is not None else None
    if option is not None and isinstance(option.default, int):
        return option.default
    return DEFAULT_COUNTS.get(workload.target, 0)


def read_durations(path: Path, warn: Callable[[str], None] | None = None) -> dict[str, float]:
    """Cell and reference id → the seconds its latest record in a previous results file took.

    A duration no run took (NaN, negative, beyond MAX_SECONDS, not a number) is left out and its cell
    estimated, said in one line through `warn`: a `1e308` placed every cell in one shard.
    """
    if not path.is_file():
        raise GGUFSandboxError(f"--durations {path}: no such results file; give a previous run's --results")
    say = warn or LOG.warning
    found = scan(path)
    found.report(path, say)
    durations: dict[str, float] = {}
    left_out: list[tuple[int, object]] = []
    for record, line in zip(found.records, found.lines, strict=True):
        seconds = record.get("duration_s")
        if record.get("kind") not in (CELL, REFERENCE) or seconds is None:
            continue
        # Compared before any float(): 10**400 is an int no float holds, and NaN fails both comparisons.
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds <= MAX_SECONDS
        ):
            left_out.append((line, seconds))
            continue
        durations[str(record["cell_id"])] = float(seconds)
    bad = ""
    if left_out:
        line, seconds = left_out[0]
        bad = (
            f"{len(left_out)} duration{'s' if len(left_out) > 1 else ''} not from 0 to {MAX_SECONDS:,.0f} s "
            f"(the first on line {line}: {show(seconds, 40)})"
        )
    if not durations:
        raise GGUFSandboxError(
            f"--durations {path}: no cell record in it has a duration" + (f"; {bad}" if bad else "")
        )
    if bad:
        say(f"--durations {path}: {bad} left out; those cells are estimated")
    return durations


@dataclass(frozen=True)
class Job:
    """A cell to place: its cost, and the reference run it needs first (run once per shard that needs it)."""

    cell_id: str
    seconds: float
    reference: str | None = None
    reference_seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Which cells each shard runs (in the order given) and its estimated seconds, references included."""

    shards: tuple[tuple[str, ...], ...]
    seconds: tuple[float, ...]
    source: str  # where the costs came from, for the summary line

    def summary(self, shard: Shard) -> str:
        """`shard 1/4: 59 of 236 cells, ~1234 s estimated (shards: 1234, 1230, … s; workload estimates)`."""
        total = sum(len(ids) for ids in self.shards)
        each = ", ".join(f"{s:.0f}" for s in self.seconds)
        return (
            f"shard {shard}: {len(self.shards[shard.index - 1])} of {total} cells, "
            f"~{self.seconds[shard.index - 1]:.0f} s estimated (shards: {each} s; {self.source})"
        )


def partition(jobs: Sequence[Job], count: int) -> Plan:
    """Greedy longest-processing-time: the costliest job first (ties by id), each onto the shard it ends
    soonest on (ties: the lowest shard) — a job whose reference that shard already runs costs it less.
    Every job lands in exactly one shard; the same jobs always give the same plan."""
    loads = [0.0] * count
    references: list[set[str]] = [set() for _ in range(count)]
    placed: dict[str, int] = {}
    for job in sorted(jobs, key=lambda j: (-(j.seconds + j.reference_seconds), j.cell_id)):

        def cost(shard: int, job: Job = job) -> float:
            needs_reference = job.reference is not None and job.reference not in references[shard]
            return job.seconds + (job.reference_seconds if needs_reference else 0.0)

        best = min(range(count), key=lambda s: (loads[s] + cost(s), s))
        loads[best] += cost(best)
        if job.reference is not None:
            references[best].add(job.reference)
        placed[job.cell_id] = best
    shards = tuple(tuple(j.cell_id for j in jobs if placed[j.cell_id] == s) for s in range(count))
    return Plan(shards, tuple(loads), "")


def plan_shards(
    matrix: Matrix,
    cells: Sequence[Cell],
    count: int,
    reference_id: Callable[[Cell], str],
    durations: Mapping[str, float] | None = None,
) -> Plan:
    """Split `cells` into `count` shards by expected cost: a previous run's `durations` where they name the
    cell (or its reference), else the workload estimates — scaled by how the measured cells compare with
    their estimates, so measured and estimated cells are weighed alike."""
    measured = durations or {}
    estimates = {cell.cell_id: cell_estimate(matrix, cell) for cell in cells}
    known = [cell.cell_id for cell in cells if cell.cell_id in measured]
    scale = 1.0
    if known and sum(estimates[c] for c in known) > 0:
        scale = sum(measured[c] for c in known) / sum(estimates[c] for c in known)
    jobs = []
    for cell in cells:
        # Capped like the measured durations: whatever the scale, no job costs more than MAX_SECONDS and no
        # shard's sum nears inf (at inf every job ties and the first shard takes them all).
        estimated = min(MAX_SECONDS, estimates[cell.cell_id] * scale)
        seconds = measured.get(cell.cell_id, estimated)
        reference = reference_id(cell) if cell.reference else None
        # A reference runs the cell's workload unconstrained: about as long as the cell when it finishes.
        reference_seconds = measured.get(reference, estimated) if reference else 0.0
        jobs.append(Job(cell.cell_id, seconds, reference, reference_seconds))
    source = f"durations of {len(known)} of {len(cells)} cells, estimates for the rest" if measured else ""
    plan = partition(jobs, count)
    return Plan(plan.shards, plan.seconds, source or "workload estimates")


def cell_estimate(matrix: Matrix, cell: Cell) -> float:
    """The expected seconds of `cell` from its workload's estimate."""
    return estimate_seconds(matrix.workloads[cell.workload], cell.spec.timeout)


def take_shard(cells: Sequence[Cell], plan: Plan, shard: Shard) -> list[Cell]:
    """The cells of `shard`, in their expansion order."""
    chosen = set(plan.shards[shard.index - 1])
    return [cell for cell in cells if cell.cell_id in chosen]
