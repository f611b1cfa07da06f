"""The workloads' reports: per-text fingerprints that catch mixed-up results, and the negative controls."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.matrix.verdicts import Reference, comparable, decide
from gguf_sandbox.sandbox.base import RunResult, Verdict
from gguf_sandbox.workloads.corpus import corpus
from gguf_sandbox.workloads.embed import embed, embed_concurrent
from gguf_sandbox.workloads.report import Report

COUNT = 24


def options(**overrides: Any) -> argparse.Namespace:
    values = {"count": COUNT, "batch": 2, "threads": 4, "plan": "auto"}
    return argparse.Namespace(**{**values, **overrides})


class SwappingEmbedder:
    """A shared Embedder whose calls for two texts get each other's vectors (results crossing threads)."""

    def __init__(self, embedder: Embedder, first: str, second: str) -> None:
        self._embedder = embedder
        self._swap = {first: second, second: first}
        self.plan, self.preferred_plan = embedder.plan, embedder.preferred_plan

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
def model(minilm_gguf: Callable[[str], Path]) -> Path:
    return minilm_gguf("q8_0")


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


def control(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_sandbox.controls", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_refusing_engine_refuses_like_a_budget() -> None:
    done = control("refusing-engine")
    assert done.returncode == 3
    error = json.loads(done.stdout)
    assert error["kind"] == "BudgetExceeded" and "available" in error["error"]


def test_the_perturbed_engine_is_correct_unconstrained_and_wrong_under_a_limit(model: Path) -> None:
    unconstrained = control("perturbed-engine", "--model", str(model), "--count", "8")
    assert unconstrained.returncode == 0, unconstrained.stderr
    report = json.loads(unconstrained.stdout)
    assert report["perturbed"] is False
    expected = embed(model, options(count=8, batch=1)).fingerprint
    assert np.allclose(report["fingerprint"], expected, atol=1e-6)
