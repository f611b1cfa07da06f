"""The embedding workloads: sequential batches and concurrent callers sharing one Embedder."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gguf_sandbox.workloads.corpus import corpus
from gguf_sandbox.workloads.report import Report, sample_indices, sample_vector, text_fingerprints

Opener = Callable[[Path, argparse.Namespace], Any]


def _open_embedder(model: Path, options: argparse.Namespace) -> Any:
    from gguf_sandbox.embed.engine import Embedder

    return Embedder.open(model, plan=options.plan, batch_size=options.batch, pooling=options.pooling)


def describe_engine(report: Report, embedder: Any) -> None:
    """The engine's choices in the report: plan, preferred plan, degraded, pooling."""
    report.plan, report.preferred_plan = embedder.plan, embedder.preferred_plan
    report.degraded, report.pooling = embedder.degraded, embedder.pooling


def describe_streaming(report: Report, embedder: Any) -> None:
    """Weights read from the file while embedding, and at what rate (streaming plans)."""
    streamed = int(getattr(embedder, "streamed_bytes", 0))
    report.extra["streamed_bytes"] = streamed
    if streamed and report.seconds:
        report.extra["streamed_gb_per_s"] = round(streamed / report.seconds / 1e9, 3)


def embed(
    model: Path, options: argparse.Namespace, opener: Opener = _open_embedder, name: str = "embed"
) -> Report:
    """Embed `count` sentences in batches of `batch`, one call per batch (`opener`: controls and peers
    replace it). With `vectors` N the report carries the whole vectors of N texts spread over the corpus
    (`vectors`: {text index: unit vector}), which the harness compares with ours by cosine."""
    report = Report(name, model.name, unit_name="embeddings")
    texts = corpus(options.count)
    sampled = sample_indices(len(texts), getattr(options, "vectors", None) or 0)
    samples: dict[str, list[float]] = {}
    with opener(model, options) as embedder:
        describe_engine(report, embedder)
        start = time.perf_counter()
        for first in range(0, len(texts), options.batch):
            began = time.perf_counter()
            vectors = embedder.embed(texts[first : first + options.batch])
            report.latencies_s.append(time.perf_counter() - began)
            report.count += len(vectors)
            report.fingerprint += text_fingerprints(vectors)
            if first == 0:
                report.extra["dimension"] = int(vectors.shape[1])
            for index in sampled:
                if first <= index < first + len(vectors):
                    samples[str(index)] = sample_vector(vectors[index - first])
        report.seconds = time.perf_counter() - start
        describe_streaming(report, embedder)
    report.units = report.count
    if sampled:
        report.extra["vectors"] = samples
    return report


def embed_concurrent(model: Path, options: argparse.Namespace, opener: Opener = _open_embedder) -> Report:
    """`threads` callers share one Embedder; each text's vector must equal what a sequential run gives."""
    import concurrent.futures

    report = Report("embed-concurrent", model.name, unit_name="embeddings")
    texts = corpus(options.count)
    batches = [texts[i : i + options.batch] for i in range(0, len(texts), options.batch)]
    with opener(model, options) as embedder:
        describe_engine(report, embedder)

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
