"""Named workloads the matrix runs in every cell; each prints exactly one JSON report line on stdout.

Exit codes: 0 success; 3 refused by the memory budget (a JSON error is printed instead of a report);
4 bad input (missing model, malformed file); anything else, including 137 (SIGKILL by the OOM killer),
is a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from gguf_sandbox import budget
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError
from gguf_sandbox.gguf.reader import GGUFFile, LazyArray

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_BAD_INPUT = 4
FINGERPRINT_DIMS = 16
FINGERPRINT_DECIMALS = 7


@dataclass
class Report:
    """What one workload run measured; serialized as the cell's JSON report."""

    workload: str
    model: str
    count: int = 0
    errors: int = 0
    plan: str | None = None
    preferred_plan: str | None = None
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
            "degraded": self.plan is not None and self.plan != self.preferred_plan,
            "count": self.count,
            "errors": self.errors,
            "latency_ms": {
                "p50": _percentile(latencies_ms, 50),
                "p95": _percentile(latencies_ms, 95),
                "p99": _percentile(latencies_ms, 99),
            },
            "throughput": round(self.units / self.seconds, 3) if self.seconds else None,
            "throughput_unit": f"{self.unit_name}/s",
            "seconds": round(self.seconds, 4),
            "peak_rss": _peak_rss(),
            "cgroup_limit": limit.limit_bytes if limit.source != "physical" else None,
            "cgroup_peak": budget.peak_usage() if limit.source != "physical" else None,
            # What the kernel could not reclaim at the end: the cell's usage minus inactive file pages.
            "cgroup_working_set": budget.working_set() if limit.source != "physical" else None,
            "limit_source": limit.source,
            "checksum": self.checksum,
            "fingerprint": self.fingerprint,
            "versions": _versions(),
            **self.extra,
        }


def _versions() -> dict[str, str]:
    """The versions a cell ran with, for floors and reports (read from metadata: nothing is imported)."""
    import importlib.metadata

    found = {"python": platform.python_version()}
    for name in ("numpy", "gguf", "mcp"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _percentile(sorted_values: Sequence[float], percent: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return round(sorted_values[0], 3)
    return round(statistics.quantiles(sorted_values, n=100, method="inclusive")[int(percent) - 1], 3)


def _peak_rss() -> int:
    """This process's RSS high-water mark; VmHWM restarts at exec, unlike ru_maxrss (inherited from
    the forking parent on Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.Process().memory_info().rss)


# -- reader workloads --------------------------------------------------------------------------------
def parse(model: Path, options: argparse.Namespace) -> Report:
    """Open the file `count` times, touching every metadata value and array length."""
    report = Report("parse", model.name, unit_name="opens")
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(options.count):
        began = time.perf_counter()
        with GGUFFile.open(model) as gguf:
            digest = hashlib.sha256()
            for key, value in gguf.metadata.items():
                described = (
                    f"{value.element_type.name}[{len(value)}]" if isinstance(value, LazyArray) else value
                )
                digest.update(f"{key}={described!r};".encode())
            for info in gguf.tensors.values():
                digest.update(f"{info.name}:{info.type.name}:{info.ne}:{info.offset};".encode())
        report.latencies_s.append(time.perf_counter() - began)
        report.count += 1
    report.seconds = time.perf_counter() - start
    report.units = report.count
    report.checksum = digest.hexdigest()[:16]
    return report


def stream(model: Path, options: argparse.Namespace) -> Report:
    """Dequantize every tensor in ≤1 MiB row blocks; checksum the float32 values."""
    report = Report("stream", model.name, unit_name="MB")
    digest = hashlib.sha256()
    start = time.perf_counter()
    with GGUFFile.open(model) as gguf:
        for info in gguf.tensors.values():
            began = time.perf_counter()
            for _, block in gguf.iter_rows(info.name):
                digest.update(block.data)
                report.units += block.nbytes / 1e6
            report.latencies_s.append(time.perf_counter() - began)
            report.count += 1
    report.seconds = time.perf_counter() - start
    report.checksum = digest.hexdigest()[:16]
    return report


# -- embedding workloads ------------------------------------------------------------------------------
WORDS = (
    "memory",
    "limit",
    "model",
    "embedding",
    "vector",
    "server",
    "host",
    "container",
    "process",
    "kernel",
    "cgroup",
    "token",
    "sentence",
    "python",
    "numpy",
    "matrix",
    "layer",
    "attention",
    "cache",
    "swap",
    "page",
    "file",
    "stream",
    "block",
    "budget",
    "query",
    "document",
    "index",
    "search",
    "retrieval",
    "small",
    "large",
    "fast",
    "slow",
    "quiet",
    "noisy",
    "red",
    "green",
    "blue",
    "café",
    "naïve",
    "résumé",
    "東京",
    "数据",
    "🙂",
)


def corpus(count: int, seed: int = 1234) -> list[str]:
    """`count` deterministic sentences of 3–40 words, some with accents, CJK and emoji."""
    rng = np.random.default_rng(seed)
    sentences = []
    for index in range(count):
        length = int(rng.integers(3, 41))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=length)]
        sentences.append(f"{index}: " + " ".join(words) + ".")
    return sentences


def _fingerprint(vectors: np.ndarray) -> list[float]:
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


Opener = Callable[[Path, argparse.Namespace], Any]


def _open_embedder(model: Path, options: argparse.Namespace) -> Any:
    from gguf_sandbox.embed.engine import Embedder

    return Embedder.open(model, plan=options.plan, batch_size=options.batch)


def embed(model: Path, options: argparse.Namespace, opener: Opener = _open_embedder) -> Report:
    """Embed `count` sentences in batches of `batch`, one call per batch (`opener`: controls replace it)."""
    report = Report("embed", model.name, unit_name="embeddings")
    texts = corpus(options.count)
    with opener(model, options) as embedder:
        report.plan, report.preferred_plan = embedder.plan, embedder.preferred_plan
        start = time.perf_counter()
        for first in range(0, len(texts), options.batch):
            began = time.perf_counter()
            vectors = embedder.embed(texts[first : first + options.batch])
            report.latencies_s.append(time.perf_counter() - began)
            report.count += len(vectors)
            report.fingerprint += text_fingerprints(vectors)
            if first == 0:
                report.extra["dimension"] = int(vectors.shape[1])
        report.seconds = time.perf_counter() - start
    report.units = report.count
    return report


def embed_concurrent(model: Path, options: argparse.Namespace, opener: Opener = _open_embedder) -> Report:
    """`threads` callers share one Embedder; each text's vector must equal what a sequential run gives."""
    import concurrent.futures

    report = Report("embed-concurrent", model.name, unit_name="embeddings")
    texts = corpus(options.count)
    batches = [texts[i : i + options.batch] for i in range(0, len(texts), options.batch)]
    with opener(model, options) as embedder:
        report.plan, report.preferred_plan = embedder.plan, embedder.preferred_plan

        def timed(batch: list[str]) -> tuple[float, list[float]]:
            began = time.perf_counter()
            vectors = embedder.embed(batch)
            return time.perf_counter() - began, text_fingerprints(vectors)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=options.threads) as pool:
            results = list(pool.map(timed, batches))
        report.seconds = time.perf_counter() - start
    report.latencies_s = [latency for latency, _ in results]
    report.fingerprint = [value for _, values in results for value in values]
    report.count = report.units = len(report.fingerprint)
    report.extra["threads"] = options.threads
    return report


def _finish_vectors(report: Report, batch_sums: np.ndarray, count: int) -> None:
    report.units = report.count
    mean = batch_sums.sum(axis=0, keepdims=True) / max(count, 1)
    report.fingerprint = _fingerprint(mean)
    report.checksum = hashlib.sha256(np.round(mean, 4).tobytes()).hexdigest()[:16]


def mcp(model: Path, options: argparse.Namespace) -> Report:
    """`count` embed calls from a real MCP client to `gguf-sandbox serve` started as a plain child.

    In matrix cells the client runs on the host and the server in the cell (mcp_client.run_cell).
    """
    from gguf_sandbox.mcp_client import local_workload

    return local_workload(model, options)


WORKLOADS: dict[str, Callable[[Path, argparse.Namespace], Report]] = {
    "parse": parse,
    "stream": stream,
    "embed": embed,
    "embed-concurrent": embed_concurrent,
    "mcp": mcp,
}
DEFAULT_COUNTS = {"parse": 20, "stream": 1, "embed": 1000, "embed-concurrent": 400, "mcp": 1000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(WORKLOADS), help="the workload")
    parser.add_argument("--model", required=True, type=Path, help="the GGUF file")
    parser.add_argument("--count", type=int, help="repetitions / embeddings (default per workload)")
    parser.add_argument("--threads", type=int, default=8, help="callers for embed-concurrent")
    parser.add_argument("--batch", type=int, default=1, help="texts per embed call")
    parser.add_argument("--plan", default="auto", help="weight plan for embedding workloads")


def run(args: argparse.Namespace) -> int:
    if args.count is None:
        args.count = DEFAULT_COUNTS[args.name]
    if args.count < 1 or args.batch < 1 or args.threads < 1:
        return _fail(EXIT_BAD_INPUT, "ValueError", "--count, --batch and --threads must be at least 1")
    if not args.model.is_file():
        return _fail(
            EXIT_BAD_INPUT, "FileNotFoundError", f"model {args.model} does not exist; pass --model PATH"
        )
    try:
        report = WORKLOADS[args.name](args.model, args)
    except BudgetExceeded as error:
        return _fail(EXIT_REFUSED, "BudgetExceeded", str(error))
    except GGUFSandboxError as error:
        return _fail(EXIT_BAD_INPUT, type(error).__name__, str(error))
    print(json.dumps(report.as_json()), flush=True)
    return EXIT_OK


def _fail(code: int, kind: str, message: str) -> int:
    limit = budget.detect_limit()
    print(
        json.dumps(
            {
                "error": message,
                "kind": kind,
                "limit": limit.limit_bytes,
                "limit_source": limit.source,
                "peak_rss": _peak_rss(),
            }
        ),
        flush=True,
    )
    print(f"gguf-sandbox workload: {kind}: {message}", file=sys.stderr)
    return code
