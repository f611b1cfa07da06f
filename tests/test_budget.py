"""Tests for limit detection over fake cgroup trees and for MemoryBudget admission control."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gguf_sandbox import budget
from gguf_sandbox.budget import (
    MemoryBudget,
    MemoryLimit,
    current_usage,
    detect_limit,
    peak_usage,
    release_free_heap,
)
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError

MiB = 1 << 20
UNLIMITED_V1 = "9223372036854771712"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _fake_v1(root: Path, cgroup: str, files: dict[str, dict[str, str]]) -> None:
    """A v1 tree: /proc/self/cgroup with a memory line, files per cgroup dir (relative to the mount)."""
    _write(root, "proc/self/cgroup", f"5:memory:{cgroup}\n4:cpu,cpuacct:/\n0::/")
    for directory, contents in files.items():
        for name, value in contents.items():
            _write(root, f"sys/fs/cgroup/memory/{directory}/{name}".replace("//", "/"), value)


def _fake_v2(root: Path, cgroup: str, files: dict[str, dict[str, str]]) -> None:
    _write(root, "proc/self/cgroup", f"0::{cgroup}")
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu io memory pids")
    for directory, contents in files.items():
        for name, value in contents.items():
            _write(root, f"sys/fs/cgroup/{directory}/{name}".replace("//", "/"), value)


# ---- detection ---------------------------------------------------------------------------------------


def test_v2_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    _fake_v2(
        tmp_path,
        "/user.slice/app.scope/cell",
        {
            "user.slice": {"memory.max": str(512 * MiB)},
            "user.slice/app.scope": {"memory.max": str(96 * MiB), "memory.current": str(40 * MiB)},
            "user.slice/app.scope/cell": {
                "memory.max": "max",
                "memory.current": str(30 * MiB),
                "memory.peak": str(33 * MiB),
            },
        },
    )
    limit = detect_limit(tmp_path)
    cgroot = tmp_path / "sys/fs/cgroup"
    assert limit == MemoryLimit(
        96 * MiB, "cgroup2", cgroot / "user.slice/app.scope/cell", cgroot / "user.slice/app.scope"
    )
    assert current_usage(tmp_path) == 30 * MiB
    assert peak_usage(tmp_path) == 33 * MiB
    # The budget counts usage where the limit bites: the ancestor holds siblings too.
    detected = MemoryBudget.detect(headroom=6 * MiB, root=tmp_path)
    assert (detected.limit, detected.baseline) == (90 * MiB, 40 * MiB)
    assert detected.available == 50 * MiB


def test_v2_all_max_is_physical(tmp_path: Path) -> None:
    _fake_v2(tmp_path, "/a", {"a": {"memory.max": "max", "memory.current": "123"}})
    limit = detect_limit(tmp_path)
    assert (limit.source, limit.limit_bytes) == ("physical", psutil.virtual_memory().total)
    assert limit.cgroup_path == tmp_path / "sys/fs/cgroup/a"
    assert current_usage(tmp_path) == 123


def test_v2_in_container_namespace_reads_the_mount_root(tmp_path: Path) -> None:
    _fake_v2(tmp_path, "/", {"": {"memory.max": str(128 * MiB), "memory.current": str(9 * MiB)}})
    limit = detect_limit(tmp_path)
    assert (limit.source, limit.limit_bytes) == ("cgroup2", 128 * MiB)
    assert current_usage(tmp_path) == 9 * MiB


def test_v1_walks_ancestors_and_memsw(tmp_path: Path) -> None:
    _fake_v1(
        tmp_path,
        "/jobs/cell",
        {
            "": {"memory.limit_in_bytes": UNLIMITED_V1},
            "jobs": {"memory.limit_in_bytes": str(200 * MiB), "memory.memsw.limit_in_bytes": str(150 * MiB)},
            "jobs/cell": {
                "memory.limit_in_bytes": UNLIMITED_V1,
                "memory.memsw.limit_in_bytes": UNLIMITED_V1,
                "memory.usage_in_bytes": str(20 * MiB),
                "memory.max_usage_in_bytes": str(25 * MiB),
            },
        },
    )
    limit = detect_limit(tmp_path)
    mount = tmp_path / "sys/fs/cgroup/memory"
    assert limit == MemoryLimit(150 * MiB, "cgroup1", mount / "jobs/cell", mount / "jobs")
    assert current_usage(tmp_path) == 20 * MiB
    assert peak_usage(tmp_path) == 25 * MiB


def test_v1_container_path_missing_falls_back_to_mount(tmp_path: Path) -> None:
    # Docker on v1 shows the host path in /proc/self/cgroup but mounts the container's own cgroup.
    _fake_v1(tmp_path, "/docker/abc123", {"": {"memory.limit_in_bytes": str(64 * MiB)}})
    limit = detect_limit(tmp_path)
    assert (limit.source, limit.limit_bytes) == ("cgroup1", 64 * MiB)


def test_v1_wins_on_hybrid_hosts(tmp_path: Path) -> None:
    _fake_v1(tmp_path, "/x", {"x": {"memory.limit_in_bytes": str(70 * MiB)}})
    _write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "")
    assert detect_limit(tmp_path).source == "cgroup1"


def test_v1_unlimited_is_physical(tmp_path: Path) -> None:
    _fake_v1(tmp_path, "/", {"": {"memory.limit_in_bytes": UNLIMITED_V1}})
    assert detect_limit(tmp_path).source == "physical"


def test_limit_above_physical_ram_is_physical(tmp_path: Path) -> None:
    above = psutil.virtual_memory().total * 2
    _fake_v2(tmp_path, "/a", {"a": {"memory.max": str(above)}})
    assert detect_limit(tmp_path).limit_bytes == psutil.virtual_memory().total


def test_no_cgroup_is_physical_and_process_figures(tmp_path: Path) -> None:
    limit = detect_limit(tmp_path)
    assert limit == MemoryLimit(psutil.virtual_memory().total, "physical")
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < current_usage(tmp_path) < 2 * rss
    assert peak_usage(tmp_path) >= current_usage(tmp_path) // 2


def test_garbage_files_are_ignored(tmp_path: Path) -> None:
    _fake_v2(tmp_path, "/a", {"a": {"memory.max": "lots", "memory.current": ""}})
    assert detect_limit(tmp_path).source == "physical"
    assert current_usage(tmp_path) > 0


def test_this_machine_detects_something_sane() -> None:
    limit = detect_limit()
    assert 0 < limit.limit_bytes <= psutil.virtual_memory().total
    assert current_usage() > 0
    assert peak_usage() > 0


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """Make the GIL hand over often so threads really interleave their reservations."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


# ---- MemoryBudget ------------------------------------------------------------------------------------


def test_500mb_reservation_refused_and_process_goes_on() -> None:
    memory = MemoryBudget(limit=64 * MiB, cap=1024 * MiB, baseline=30 * MiB)
    with pytest.raises(BudgetExceeded) as refused:
        memory.reserve("dequantize token_embd", 500 * MiB)
    error = refused.value
    assert isinstance(error, GGUFSandboxError)
    assert (error.what, error.needed, error.available) == ("dequantize token_embd", 500 * MiB, 34 * MiB)
    assert "token_embd" in str(error) and "memory limit" in error.hint and "batch" in error.hint
    assert memory.in_use == 0
    with memory.reserve("row chunk", 1 * MiB) as held:
        assert memory.in_use == 1 * MiB
        assert held.nbytes == 1 * MiB
    assert memory.in_use == 0 and memory.peak == 1 * MiB


def test_cap_refuses_a_single_large_reservation() -> None:
    memory = MemoryBudget(limit=1 << 40, cap=1 * MiB)
    memory.reserve("exactly the cap", 1 * MiB).release()
    with pytest.raises(BudgetExceeded) as refused:
        memory.reserve("whole tensor", 1 * MiB + 1)
    assert refused.value.available == 1 * MiB and "chunks" in refused.value.hint
    big = memory.reserve("planned resident weights", 5 * MiB, cap=5 * MiB)
    assert memory.in_use == 5 * MiB
    big.release()


def test_release_is_idempotent_and_frees_room() -> None:
    memory = MemoryBudget(limit=3 * MiB)
    first = memory.reserve("a", 1 * MiB)
    second = memory.reserve("b", 1 * MiB)
    memory.reserve("c", 1 * MiB)
    with pytest.raises(BudgetExceeded):
        memory.reserve("d", 1)
    first.release()
    first.release()
    assert first.released and memory.in_use == 2 * MiB and memory.available == 1 * MiB
    with second:
        pass
    second.release()
    assert memory.in_use == 1 * MiB and memory.peak == 3 * MiB


def test_release_on_exception_inside_with() -> None:
    memory = MemoryBudget(limit=1 * MiB)
    with pytest.raises(RuntimeError), memory.reserve("work", 1 * MiB):
        raise RuntimeError("boom")
    assert memory.in_use == 0


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(limit=-1)
    with pytest.raises(ValueError):
        MemoryBudget(limit=10).reserve("negative", -5)


@pytest.mark.usefixtures("fast_thread_switching")
def test_rapid_growth_of_small_reservations_stopped_at_limit() -> None:
    limit, chunk, n_threads = 8 * MiB, 4096, 4
    memory = MemoryBudget(limit=limit, cap=chunk)
    granted = [0] * n_threads
    overshoot: list[int] = []
    start = threading.Barrier(n_threads)

    def grow(index: int) -> None:
        start.wait()
        while True:
            try:
                memory.reserve(f"thread {index} chunk", chunk)
            except BudgetExceeded:
                return
            granted[index] += 1
            if memory.in_use > limit:
                overshoot.append(memory.in_use)
            # Give the others the GIL: on a loaded host one thread could take all 2,048 chunks in
            # its time slices and the contention this test is about would never happen.
            time.sleep(0)

    threads = [threading.Thread(target=grow, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overshoot == []
    assert sum(granted) * chunk == limit
    assert memory.in_use == memory.peak == limit and memory.available == 0
    assert sum(1 for count in granted if count > 0) >= 2, f"threads did not interleave: {granted}"


@pytest.mark.usefixtures("fast_thread_switching")
def test_threads_reserving_and_releasing_keep_exact_accounts() -> None:
    memory = MemoryBudget(limit=64 * 1024, cap=1024)
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            for i in range(2000):
                size = 1 + (seed * 7919 + i * 104729) % 1024
                with memory.reserve_blocking(f"churn {seed}", size, timeout=5):
                    if memory.in_use > memory.limit:
                        errors.append(AssertionError(f"in_use {memory.in_use} > limit"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert memory.in_use == 0
    assert 0 < memory.peak <= memory.limit


def test_reserve_blocking_waits_for_room() -> None:
    memory = MemoryBudget(limit=2 * MiB, cap=2 * MiB)
    held = memory.reserve("first batch", 2 * MiB)
    timer = threading.Timer(0.2, held.release)
    timer.start()
    started = time.monotonic()
    with memory.reserve_blocking("second batch", 1 * MiB, timeout=5):
        waited = time.monotonic() - started
    timer.join()
    assert 0.1 < waited < 4


def test_reserve_blocking_times_out_and_refuses_what_never_fits() -> None:
    memory = MemoryBudget(limit=2 * MiB, cap=2 * MiB, baseline=1 * MiB)
    held = memory.reserve("resident", 1 * MiB)
    with pytest.raises(BudgetExceeded) as timed_out:
        memory.reserve_blocking("batch", 1 * MiB, timeout=0.05)
    assert "waited" in timed_out.value.hint
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):
        memory.reserve_blocking("never fits", 2 * MiB, timeout=10)
    assert time.monotonic() - started < 1
    held.release()


def test_detect_on_this_machine() -> None:
    memory = MemoryBudget.detect(cap=2 * MiB)
    assert memory.origin is not None
    assert memory.limit == memory.origin.limit_bytes - budget.DEFAULT_HEADROOM
    assert 0 < memory.baseline < memory.limit
    assert memory.cap == 2 * MiB
    with memory.reserve("probe", 2 * MiB):
        assert memory.available == memory.limit - memory.baseline - 2 * MiB


# ---- the working-set rule ------------------------------------------------------------------------------


def test_v1_plans_against_usage_minus_total_inactive_file(tmp_path: Path) -> None:
    # A cell whose page cache (interpreter, numpy, model pages: inactive, reclaimable) fills it to the limit.
    _fake_v1(
        tmp_path,
        "/cell",
        {
            "cell": {
                "memory.limit_in_bytes": str(64 * MiB),
                "memory.usage_in_bytes": str(63 * MiB),
                "memory.stat": f"cache {45 * MiB}\ninactive_file {1 * MiB}\ntotal_inactive_file {40 * MiB}",
            }
        },
    )
    assert budget.working_set(tmp_path) == 23 * MiB
    detected = MemoryBudget.detect(headroom=8 * MiB, root=tmp_path)
    assert (detected.limit, detected.baseline, detected.available) == (56 * MiB, 23 * MiB, 33 * MiB)


def test_v2_plans_against_memory_current_minus_inactive_file_where_the_limit_bites(tmp_path: Path) -> None:
    _fake_v2(
        tmp_path,
        "/pod/cell",
        {
            "pod": {
                "memory.max": str(128 * MiB),
                "memory.current": str(120 * MiB),
                "memory.stat": f"anon {50 * MiB}\nactive_file {10 * MiB}\ninactive_file {60 * MiB}",
            },
            "pod/cell": {
                "memory.max": "max",
                "memory.current": str(100 * MiB),
                "memory.stat": "inactive_file 0",
            },
        },
    )
    # Our own cgroup's working set, and the budget's baseline counted where the limit bites (the pod).
    assert budget.working_set(tmp_path) == 100 * MiB
    detected = MemoryBudget.detect(headroom=8 * MiB, root=tmp_path)
    assert (detected.limit, detected.baseline) == (120 * MiB, 60 * MiB)


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        (None, 30 * MiB),
        ("total_inactive_file lots", 30 * MiB),
        ("cache 1\ntotal_cache 1", 30 * MiB),
        (f"total_inactive_file {100 * MiB}", 0),
    ],
    ids=["no-stat-file", "garbage", "no-such-key", "inactive-above-usage"],
)
def test_working_set_without_a_usable_stat(tmp_path: Path, stat: str | None, expected: int) -> None:
    files = {"memory.limit_in_bytes": str(64 * MiB), "memory.usage_in_bytes": str(30 * MiB)}
    if stat is not None:
        files["memory.stat"] = stat
    _fake_v1(tmp_path, "/c", {"c": files})
    # Missing or unreadable: raw usage (the conservative answer); never below zero.
    assert budget.working_set(tmp_path) == expected


def test_a_reservation_that_would_fail_re_measures_the_baseline(tmp_path: Path) -> None:
    cell = {
        "memory.limit_in_bytes": str(64 * MiB),
        "memory.usage_in_bytes": str(60 * MiB),
        "memory.stat": f"total_inactive_file {10 * MiB}",
    }
    _fake_v1(tmp_path, "/c", {"c": cell})
    detected = MemoryBudget.detect(headroom=4 * MiB, root=tmp_path)
    assert detected.available == 10 * MiB
    weights = detected.reserve("weights", 8 * MiB, cap=8 * MiB)
    weights.mark_allocated()
    # Later the kernel moved most of those pages to the inactive list: 30 MiB became reclaimable, and
    # the weights (now allocated) are part of the working set the cgroup reports.
    _write(tmp_path, "sys/fs/cgroup/memory/c/memory.usage_in_bytes", str(62 * MiB))
    _write(tmp_path, "sys/fs/cgroup/memory/c/memory.stat", f"total_inactive_file {40 * MiB}")
    assert detected.available == 2 * MiB  # nothing re-read while reservations fit
    with detected.reserve("pass", 6 * MiB, cap=6 * MiB):
        # 62 - 40 = 22 MiB of working set, 8 of them the weights: the baseline is 14 MiB now.
        assert detected.baseline == 14 * MiB
        assert detected.available == 60 * MiB - 14 * MiB - 8 * MiB - 6 * MiB


def test_re_measuring_can_also_refuse_and_budgets_without_a_measure_never_do() -> None:
    readings = iter([30 * MiB])
    memory = MemoryBudget(64 * MiB, cap=64 * MiB, baseline=20 * MiB, measure=lambda: next(readings))
    with pytest.raises(BudgetExceeded) as refused:
        memory.reserve("batch", 50 * MiB)
    assert memory.baseline == 30 * MiB and refused.value.available == 34 * MiB
    fixed = MemoryBudget(64 * MiB, cap=64 * MiB, baseline=20 * MiB)
    with pytest.raises(BudgetExceeded):
        fixed.reserve("batch", 45 * MiB)
    assert fixed.baseline == 20 * MiB


def test_freed_heap_is_given_back_before_a_refusal() -> None:
    # A long-running server: 30 MiB freed by earlier requests still sit in its heap until trimmed.
    heap = {"live": 20 * MiB, "freed": 30 * MiB}
    trims: list[int] = []

    def trim() -> None:
        trims.append(heap["freed"])
        heap["freed"] = 0

    memory = MemoryBudget(
        64 * MiB, cap=64 * MiB, baseline=50 * MiB, measure=lambda: heap["live"] + heap["freed"], reclaim=trim
    )
    with memory.reserve("small", 10 * MiB):  # fits as it is: no trim
        assert trims == []
    with memory.reserve("large request line", 40 * MiB):
        assert trims == [30 * MiB] and memory.baseline == 20 * MiB
    heap["live"] = 60 * MiB  # and where a trim frees nothing, the refusal stands
    with pytest.raises(BudgetExceeded):
        memory.reserve("too large", 50 * MiB)
    assert trims == [30 * MiB, 0]


def test_release_free_heap_returns_freed_memory_to_the_kernel() -> None:
    if budget._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here")
    # Many 100 KiB blocks (below the mmap threshold: they live in the heap) freed but for the last one,
    # which pins the heap's top: only malloc_trim gives the pages below it back.
    blocks = [bytearray(100 << 10) for _ in range(600)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])
    keep = bytearray(1 << 10)
    del blocks
    before = psutil.Process().memory_info().rss
    release_free_heap()
    after = psutil.Process().memory_info().rss
    assert before - after >= 30 * MiB, (before, after)
    del keep


def test_reserve_blocking_re_measures_when_woken() -> None:
    # 20 MiB outside the budget; another caller holds 20 MiB, allocated, which the working set includes.
    working_set = [40 * MiB]
    memory = MemoryBudget(64 * MiB, cap=64 * MiB, baseline=20 * MiB, measure=lambda: working_set[0])
    held = memory.reserve("other caller", 20 * MiB)
    released = threading.Event()

    def release() -> None:
        working_set[0] = 20 * MiB
        held.release()
        released.set()

    timer = threading.Timer(0.2, release)
    timer.start()
    # Re-measured while the other caller holds its room, 30 MiB never seem to fit: wait, do not refuse.
    with memory.reserve_blocking("batch", 30 * MiB, timeout=10):
        assert released.is_set() and memory.baseline == 20 * MiB
    timer.join()
    with pytest.raises(BudgetExceeded):
        memory.reserve_blocking("more than ever fits", 50 * MiB, timeout=10)
