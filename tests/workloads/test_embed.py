"""The embedding workloads' reports: per-text fingerprints that catch mixed-up results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.matrix.verdicts import Reference, Verdict, comparable, decide
from gguf_sandbox.sandbox.base import RunResult
from gguf_sandbox.workloads.corpus import corpus
from gguf_sandbox.workloads.embed import embed, embed_concurrent
from gguf_sandbox.workloads.report import Report
from tests.workloads.conftest import COUNT, options


class SwappingEmbedder:
    """A shared Embedder whose calls for two texts get each other's vectors (results crossing threads)."""

    def __init__(self, embedder: Embedder, first: str, second: str) -> None:
        self._embedder = embedder
        self._swap = {first: second, second: first}
        self.plan, self.preferred_plan = embedder.plan, embedder.preferred_plan
        self.degraded, self.pooling = embedder.degraded, embedder.pooling

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._embedder.embed([self._swap.get(text, text) for text in texts])

    def __enter__(self) -> SwappingEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._embedder.close()


def judged(report: Report, reference: Reference) -> Verdict:
    stdout = json.dumps(report.as_json())
    done = RunResult(0, False, False, 0, 1 << 20, 64 << 20, 1.0, stdout, "")
    return decide(done, json.loads(stdout), reference).verdict


@pytest.fixture(scope="module")
def sequential(model: Path) -> Reference:
    report = embed(model, options(batch=1))
    assert len(report.fingerprint) == COUNT
    return Reference(comparable(report.as_json()))


def test_concurrent_results_equal_the_sequential_run_per_text(model: Path, sequential: Reference) -> None:
    report = embed_concurrent(model, options())
    assert judged(report, sequential) is Verdict.PASS


def test_results_swapped_between_threads_are_wrong(model: Path, sequential: Reference) -> None:
    texts = corpus(COUNT)

    def swapping(path: Path, opts: argparse.Namespace) -> SwappingEmbedder:
        return SwappingEmbedder(Embedder.open(path, batch_size=opts.batch), texts[3], texts[10])

    report = embed_concurrent(model, options(), swapping)
    assert judged(report, sequential) is Verdict.WRONG
    # The mean over all texts (the old check) cannot see it: the same vectors, in another order.
    plain = embed_concurrent(model, options())
    assert np.isclose(sum(report.fingerprint), sum(plain.fingerprint))


def test_every_text_has_its_own_fingerprint(model: Path) -> None:
    report = embed(model, options(count=6, batch=4))
    assert len(report.fingerprint) == 6 and len(set(report.fingerprint)) == 6
    assert report.as_json()["versions"]["numpy"] == np.__version__
