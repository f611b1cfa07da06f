"""Tests for cgroupfs.py: the one home of the cgroup v1/v2 memory files and of reading them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_sandbox.cgroupfs import (
    FILES,
    STAT_FILE,
    V1,
    V1_UNLIMITED,
    V2,
    CgroupFiles,
    MemoryCgroup,
    cpu_quota,
    parse_key,
    read_int,
    read_key,
    working_set_of,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("123\n", 123), ("max\n", None), ("", None), (str(V1_UNLIMITED), None), ("9223372036854771712", None)],
    ids=["number", "max", "empty", "unlimited", "v1-no-limit"],
)
def test_read_int(tmp_path: Path, text: str, expected: int | None) -> None:
    path = tmp_path / "memory.max"
    path.write_text(text)
    assert read_int(path) == expected


def test_read_int_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_int(tmp_path / "gone") is None


def test_keyed_files_give_their_counter_or_none() -> None:
    events = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n"
    assert parse_key(events, "oom_kill") == 1
    assert parse_key(events, "absent") is None
    assert parse_key("oom_kill x\n", "oom_kill") is None


def test_read_key_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_key(tmp_path / "memory.events", "oom_kill") is None


@pytest.mark.parametrize("layout", [V1, V2], ids=["v1", "v2"])
def test_working_set_is_usage_minus_inactive_file_pages(tmp_path: Path, layout: CgroupFiles) -> None:
    (tmp_path / layout.usage).write_text("1000\n")
    (tmp_path / STAT_FILE).write_text(f"cache 5\n{layout.inactive_file_key} 300\n")
    assert working_set_of(tmp_path, layout) == 700
    (tmp_path / STAT_FILE).write_text(f"{layout.inactive_file_key} 5000\n")
    assert working_set_of(tmp_path, layout) == 0  # never below 0
    (tmp_path / layout.usage).unlink()
    assert working_set_of(tmp_path, layout) is None


def test_each_version_names_its_files_once() -> None:
    assert FILES["cgroup1"].limit_files == ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
    assert FILES["cgroup2"].limit_files == ("memory.max",)
    assert MemoryCgroup("cgroup2", Path("/x"), Path("/")).files is V2


def _tree(root: Path, proc_cgroup: str, files: dict[str, str]) -> Path:
    """A fake root: /proc/self/cgroup and cgroup files (paths relative to sys/fs/cgroup)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_cgroup)
    for relative, text in files.items():
        path = root / "sys/fs/cgroup" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/job/cpu.cfs_quota_us": "150000\n", "cpu/job/cpu.cfs_period_us": "100000\n"}, 1.5),
        (
            {
                "cpu/cpu.cfs_quota_us": "50000\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "cpu/job/cpu.cfs_quota_us": "200000\n",
                "cpu/job/cpu.cfs_period_us": "100000\n",
            },
            0.5,
        ),
        ({"cpu/job/cpu.cfs_quota_us": "junk\n", "cpu/job/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/job/cpu.cfs_quota_us": "100000\n", "cpu/job/cpu.cfs_period_us": "0\n"}, None),
    ],
    ids=["unlimited", "own-quota", "parent-smaller", "unreadable", "zero-period"],
)
def test_cpu_quota_v1(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    root = _tree(tmp_path, "4:memory:/job\n1:cpu,cpuacct:/job\n", {"cpu/job/tasks": "", **files})
    assert cpu_quota(root) == expected


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("50000 100000\n", 0.5), ("x 1\n", None), ("", None)],
    ids=["max", "two", "half", "junk", "empty"],
)
def test_cpu_quota_v2(tmp_path: Path, cpu_max: str, expected: float | None) -> None:
    files = {"cgroup.controllers": "cpu memory\n", "job/cpu.max": cpu_max}
    assert cpu_quota(_tree(tmp_path, "0::/job\n", files)) == expected


def test_cpu_quota_v2_takes_the_smallest_ancestor(tmp_path: Path) -> None:
    files = {"cgroup.controllers": "cpu\n", "a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}
    assert cpu_quota(_tree(tmp_path, "0::/a/b\n", files)) == 1.0


def test_cpu_quota_without_a_cgroup_is_none(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) is None
