"""Tests for threads.py: the compute pool, its size from affinity and CPU quota, single-threaded BLAS."""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from gguf_sandbox.embed import threads
from gguf_sandbox.embed.threads import (
    ComputePool,
    current_pool,
    spans,
    usable_cpus,
    use_pool,
    weighted_spans,
)


def _root(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/job\n")
    (tmp_path / "sys/fs/cgroup/job").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpu\n")
    (tmp_path / "sys/fs/cgroup/job/cpu.max").write_text(cpu_max)
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("max 100000\n", None), ("150000 100000\n", 1), ("50000 100000\n", 1), ("100000000 100000\n", None)],
    ids=["no-quota", "one-and-a-half", "half", "above-affinity"],
)
def test_usable_cpus_is_affinity_cut_to_the_quota(tmp_path: Path, cpu_max: str, cap: int | None) -> None:
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if cap is None else min(affinity, cap)
    assert usable_cpus(_root(tmp_path, cpu_max)) == expected


def test_usable_cpus_follows_the_affinity_mask(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert usable_cpus(_root(tmp_path, "max 100000\n")) == 3
    assert usable_cpus(_root(tmp_path / "q", "200000 100000\n")) == 2


@pytest.mark.parametrize("count", [1, 2, 4])
def test_pool_runs_every_task_once(count: int) -> None:
    pool = ComputePool(count)
    try:
        seen: list[int] = []
        lock = threading.Lock()

        def task(n: int) -> None:
            with lock:
                seen.append(n)

        for size in (0, 1, 7, 100):
            seen.clear()
            pool.run([functools.partial(task, n) for n in range(size)])
            assert sorted(seen) == list(range(size))
    finally:
        pool.close()


def test_pool_uses_its_helpers_for_blas() -> None:
    """Products split over the pool equal the whole product (each task writes its own columns)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((9, 40)).astype(np.float32), rng.standard_normal((40, 70)).astype(np.float32)
    y = np.empty((9, 70), dtype=np.float32)
    pool = ComputePool(2)
    try:

        def product(lo: int, hi: int) -> None:
            np.matmul(x, w[:, lo:hi], out=y[:, lo:hi])

        pool.run([functools.partial(product, lo, hi) for lo, hi in spans(70, 4, 16)])
    finally:
        pool.close()
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


def test_a_failing_task_raises_in_the_caller_after_the_others_ran() -> None:
    pool = ComputePool(2)
    done: list[int] = []

    def fail() -> None:
        raise ValueError("task failed")

    try:
        with pytest.raises(ValueError, match="task failed"):
            pool.run([fail, *(lambda n=n: done.append(n) for n in range(5))])
        assert sorted(done) == list(range(5))
        pool.run([lambda: done.append(9)] * 3)  # the pool still works
    finally:
        pool.close()


def test_nested_runs_finish() -> None:
    pool = ComputePool(2)
    results: list[int] = []
    lock = threading.Lock()

    def inner(n: int) -> None:
        with lock:
            results.append(n)

    try:

        def outer(base: int) -> None:
            pool.run([functools.partial(inner, base + n) for n in range(3)])

        pool.run([functools.partial(outer, base) for base in (0, 10)])
    finally:
        pool.close()
    assert sorted(results) == [0, 1, 2, 10, 11, 12]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("handling", ["ignore", "raise"])
def test_helpers_handle_floating_point_errors_as_the_caller_does(
    handling: Literal["ignore", "raise"],
) -> None:
    """numpy's error state is per thread: a helper applies the caller's, so a pass that ignores the
    overflows of corrupt weights gets no warning from a helper, and one that raises gets the error."""
    pool = ComputePool(2)
    both_running = threading.Barrier(2, timeout=10)
    ran_on: list[str] = []

    def invalid() -> None:
        both_running.wait()  # one task per thread: the helper runs one
        ran_on.append(threading.current_thread().name)
        np.multiply(np.array([np.inf], dtype=np.float32), np.float32(0.0))  # invalid: inf * 0

    try:
        with np.errstate(invalid=handling):
            if handling == "raise":
                with pytest.raises(FloatingPointError):
                    pool.run([invalid, invalid])
            else:
                pool.run([invalid, invalid])
    finally:
        pool.close()
    assert len(set(ran_on)) == 2


def test_finished_batches_hold_no_references() -> None:
    """A batch's tasks (and the arrays they hold) are dropped once run() returns, even if queued."""
    pool = ComputePool(2)
    try:
        marker = np.zeros(4)
        before = sys.getrefcount(marker)
        pool.run([functools.partial(np.sum, marker) for _ in range(8)])
        pool.run([lambda: None] * 4)  # the helper has moved past the first batch
        assert sys.getrefcount(marker) == before
    finally:
        pool.close()


def test_pool_refuses_zero_threads() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ComputePool(0)


def test_use_pool_sets_the_current_pool_for_the_block() -> None:
    pool = ComputePool(1)
    assert current_pool() is threads.SERIAL
    with use_pool(pool):
        assert current_pool() is pool
    assert current_pool() is threads.SERIAL


@pytest.mark.parametrize(
    ("total", "parts", "align", "expected"),
    [
        (10, 1, 1, [(0, 10)]),
        (10, 3, 1, [(0, 3), (3, 6), (6, 10)]),
        (70, 4, 16, [(0, 16), (16, 32), (32, 48), (48, 70)]),
        (20, 4, 16, [(0, 16), (16, 20)]),
        (3, 8, 1, [(0, 1), (1, 2), (2, 3)]),
    ],
    ids=["one", "three", "aligned", "fewer-than-asked", "more-parts-than-items"],
)
def test_spans_cover_the_range(total: int, parts: int, align: int, expected: list[tuple[int, int]]) -> None:
    assert spans(total, parts, align) == expected


@pytest.mark.parametrize(
    ("weights", "parts", "expected"),
    [
        ([5] * 10, 2, [(0, 5), (5, 10)]),
        ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
        ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),
        ([30, 8, 9, 25, 12, 20], 2, [(0, 3), (3, 6)]),
        ([10, 10, 10], 3, [(0, 1), (1, 2), (2, 3)]),
        ([3], 4, [(0, 1)]),
        ([0, 0, 0], 2, [(0, 1), (1, 3)]),
        ([], 2, []),
    ],
    ids=["even", "heavy-last", "heavy-first", "uneven", "one-each", "fewer-than-asked", "weightless", "none"],
)
def test_weighted_spans_cut_near_equal_weights(
    weights: list[int], parts: int, expected: list[tuple[int, int]]
) -> None:
    assert weighted_spans(weights, parts) == expected


@pytest.mark.parametrize("seed", range(20))
def test_weighted_spans_cover_every_index_and_stay_near_the_share(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 600, size=int(rng.integers(1, 40))).tolist()
    parts = int(rng.integers(1, 6))
    found = weighted_spans(weights, parts)
    assert [lo for lo, _ in found] == [0, *(hi for _, hi in found[:-1])]
    assert found[-1][1] == len(weights)
    assert len(found) == min(parts, len(weights)) and all(hi > lo for lo, hi in found)
    heaviest = max(sum(weights[lo:hi]) for lo, hi in found)
    assert heaviest <= sum(weights) / len(found) + max(weights)


def test_blas_is_set_single_threaded_where_numpy_bundles_openblas() -> None:
    if not threads._loaded_blas_libraries():
        pytest.skip("numpy here links no OpenBLAS library")
    assert threads.single_threaded_blas()
