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
