"""What a workload run measured: the Report every cell prints as one JSON line, and its vector checks."""

from __future__ import annotations

import hashlib
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gguf_sandbox import budget

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_BAD_INPUT = 4
FINGERPRINT_DIMS = 16
FINGERPRINT_DECIMALS = 7
# Whole vectors a report carries when asked (`--vectors N`), for the cosine of a peer's vectors to ours:
# texts spread evenly over the corpus, unit length, 6 decimals (a cosine error below 1e-9).
SAMPLE_TEXTS = 8
MAX_VECTORS = 64  # whole vectors one report line may carry: 64 × 4096 dimensions stay a few MB
# The largest options a workload runs with (the matrix's cells are bounded the same, matrix/runnables.py):
# the corpus is built whole before the work starts, so --count 10**11 would be hours of building it first.
MAX_COUNT = 1_000_000
MAX_BATCH = 4096
MAX_THREADS = 256
SAMPLE_DECIMALS = 6
# The engines a report names the versions of, read from metadata (nothing is imported).
VERSIONED = ("numpy", "gguf", "mcp", "llama-cpp-python", "torch", "sentence-transformers", "transformers")


@dataclass
class Report:
    """What one workload run measured; serialized as the cell's JSON report."""

    workload: str
    model: str
    count: int = 0
    errors: int = 0
    plan: str | None = None
    preferred_plan: str | None = None
    degraded: bool | None = None  # the engine's word (a shorter sequence limit is degraded too)
    pooling: str | None = None
    latencies_s: list[float] = field(default_factory=list)
    units: float = 0.0  # what throughput counts: items, or MB for streaming
    unit_name: str = "items"
    seconds: float = 0.0
    checksum: str = ""
    fingerprint: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        limit = budget.detect_limit()
        latencies_ms = sorted(1e3 * t for t in self.latencies_s)
        return {
            "workload": self.workload,
            "model": self.model,
            "python": platform.python_version(),
            "plan": self.plan,
            "preferred_plan": self.preferred_plan,
            "degraded": self.degraded
            if self.degraded is not None
            else self.plan is not None and self.plan != self.preferred_plan,
            "pooling": self.pooling,
            "count": self.count,
            "errors": self.errors,
            "latency_ms": {
                "p50": percentile(latencies_ms, 50),
                "p95": percentile(latencies_ms, 95),
                "p99": percentile(latencies_ms, 99),
            },
            "throughput": round(self.units / self.seconds, 3) if self.seconds else None,
            "throughput_unit": f"{self.unit_name}/s",
            "seconds": round(self.seconds, 4),
            "peak_rss": budget.peak_rss(),
            "cgroup_limit": limit.limit_bytes if limit.source != "physical" else None,
            "cgroup_peak": budget.peak_usage() if limit.source != "physical" else None,
            # What the kernel could not reclaim at the end: the cell's usage minus inactive file pages.
            "cgroup_working_set": budget.working_set() if limit.source != "physical" else None,
            "limit_source": limit.source,
            "checksum": self.checksum,
            "fingerprint": self.fingerprint,
            "versions": versions(),
            **self.extra,
        }


def versions() -> dict[str, str]:
    """The versions a cell ran with, for floors and reports (read from metadata: nothing is imported)."""
    import importlib.metadata

    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def percentile(sorted_values: Sequence[float], percent: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return round(sorted_values[0], 3)
    return round(statistics.quantiles(sorted_values, n=100, method="inclusive")[int(percent) - 1], 3)


def fingerprint(vectors: np.ndarray) -> list[float]:
    """A tolerance-comparable summary: the mean vector projected on fixed random directions."""
    projection = np.random.default_rng(0).standard_normal((vectors.shape[1], FINGERPRINT_DIMS))
    return [round(float(v), 6) for v in vectors.astype(np.float64).mean(axis=0) @ projection]


def text_fingerprints(vectors: np.ndarray) -> list[float]:
    """One number per text, in order: its vector projected on a fixed random unit direction.

    Compared with the unconstrained run's within a tolerance, it catches a wrong vector, a vector given to
    the wrong text and a missing one — a mean over all texts would not see results swapped between calls.
    Unit vectors give projections of ~1/sqrt(dimension); plans differ by ~1e-7, swaps by ~1e-2.
    """
    direction = np.random.default_rng(0).standard_normal(vectors.shape[1])
    direction /= np.linalg.norm(direction)
    return [round(float(v), FINGERPRINT_DECIMALS) for v in vectors.astype(np.float64) @ direction]


def finish_vectors(report: Report, batch_sums: np.ndarray, count: int) -> None:
    report.units = report.count
    mean = batch_sums.sum(axis=0, keepdims=True) / max(count, 1)
    report.fingerprint = fingerprint(mean)
    report.checksum = hashlib.sha256(np.round(mean, 4).tobytes()).hexdigest()[:16]


def sample_indices(count: int, wanted: int) -> list[int]:
    """`wanted` text indices spread evenly over `count` texts (all of them when there are fewer)."""
    if wanted <= 0 or count <= 0:
        return []
    taken = min(wanted, count)
    return [index * count // taken for index in range(taken)]


def sample_vector(vector: np.ndarray) -> list[float]:
    """One vector as a report carries it: unit length, SAMPLE_DECIMALS decimals."""
    values = vector.astype(np.float64)
    norm = float(np.linalg.norm(values))
    unit = values / norm if norm > 0 else values
    return [round(float(v), SAMPLE_DECIMALS) for v in unit]
