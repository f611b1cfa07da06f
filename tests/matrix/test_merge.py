"""Tests for matrix/merge.py: joining shard results, conflicts, missing cells, hostile results files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.cli import main
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix import results
from gguf_sandbox.matrix.merge import merge, read_strict
from gguf_sandbox.matrix.results import read_records

MIB = 1 << 20
CELLS = ["cgroup-py3.12-64m-parse", "cgroup-py3.12-256m-parse", "cgroup-py3.12-64m-bomb"]


def header(shard: str, selected: list[str] | None = None) -> dict[str, Any]:
    return {"kind": "run", "cell_id": "", "shard": shard, "selected": CELLS if selected is None else selected}


def cell(cell_id: str, verdict: str = "pass", **extra: Any) -> dict[str, Any]:
    record = {
        "kind": "cell",
        "cell_id": cell_id,
        "backend": "cgroup",
        "python": "3.12",
        "memory": 64 * MIB,
        "memory_label": "64m",
        "workload": "parse",
        "model": None,
        "expected": ["pass"],
        "verdict": verdict,
        "peak": 30 * MIB,
        "limit": 64 * MIB,
        "duration_s": 1.5,
        "time": 1.0,
    }
    return {**record, **extra}


def write(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, Path]:
    a = write(
        tmp_path / "a.jsonl",
        header("1/2"),
        {"kind": "reference", "cell_id": "ref-1", "checksum": "x"},
        cell(CELLS[0], "oom"),  # superseded by the --resume rerun below: the latest record of a file counts
        cell(CELLS[0]),
        cell(CELLS[1]),
    )
    b = write(
        tmp_path / "b.jsonl",
        header("2/2"),
        {"kind": "reference", "cell_id": "ref-1", "checksum": "x", "time": 2},
        cell(CELLS[2], "oom", expected=["oom"]),
    )
    return a, b


def test_shards_merge_into_every_selected_cell(
    shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, shards), "-o", str(out)]) == 0
    assert "merged 2 files: 3 cells (1 oom, 2 pass; 0 skipped, 0 errors, 0 outside expect)" in (
        capsys.readouterr().out
    )
    merged = read_records(out)
    assert [r["kind"] for r in merged] == ["run", "run", "reference", "cell", "cell", "cell"]
    assert [r["cell_id"] for r in merged if r["kind"] == "cell"] == CELLS  # in selection order
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # a plain file, not mkstemp's
    # merging the merged file with a shard again is fine: its records are the same records
    assert main(["merge", str(out), str(shards[0]), "-o", str(tmp_path / "again.jsonl")]) == 0


def test_missing_cells_are_named_and_fail_unless_allowed(
    shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.jsonl"
    assert main(["merge", str(shards[0]), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"1 of 3 selected cells are in no file: {CELLS[2]}" in err and "--allow-missing" in err
    assert out.exists()  # written anyway: the grid and JUnit of what ran are still worth having
    assert main(["merge", str(shards[0]), "-o", str(out), "--allow-missing"]) == 0


def test_files_without_a_selection_cannot_say_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write(tmp_path / "old.jsonl", {"kind": "run", "cell_id": ""}, cell(CELLS[0]))
    assert main(["merge", str(old), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert "cannot tell which cells are missing" in capsys.readouterr().err
    assert main(["merge", str(old), "-o", str(tmp_path / "o.jsonl"), "--allow-missing"]) == 0


def test_a_conflicting_record_is_refused_naming_the_cell_and_both_files(
    shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write(tmp_path / "c.jsonl", header("2/2"), cell(CELLS[1], "oom"))
    out = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, shards), str(other), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert (
        f"cell {CELLS[1]}: conflicting records: {shards[0]}:5 says pass 30/64M, {other}:2 says oom! 30/64M"
        in err
    )
    assert not out.exists()
    same_verdict = write(tmp_path / "d.jsonl", header("2/2"), cell(CELLS[1], peak=31 * MIB, duration_s=2))
    with pytest.raises(GGUFSandboxError, match="the records differ in duration_s, peak"):
        merge([shards[0], same_verdict])


def test_a_conflict_shows_the_reasons_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write(
        tmp_path / "a.jsonl", header("1/2"), cell(CELLS[0], kind="error", reason="backend\x1b[2J down\r\n")
    )
    b = write(tmp_path / "b.jsonl", header("2/2"), cell(CELLS[0], kind="error", reason="other"))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error! (backend\\x1b[2J down\\r\\n)" in err
    assert not results.has_control(err.rstrip("\n"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json\n", ":1: not JSON"),
        (
            b'{"kind": "cell", "cell_id": "a", "memory": "64m"}\n',
            ":1: a malformed cell record ('memory' is str",
        ),
        (b'{"kind": "run", "cell_id": "", "selected": "all"}\n', ":1: run header: 'selected' is not a list"),
        (b'{"kind": "run", "cell_id": "", "selected": [1]}\n', ":1: run header: 'selected' is not a list"),
        (b'{"kind": "run", "cell_id": ""}\n\xff\xfe\n', ":2: not UTF-8"),
        (b'{"kind": "run", "cell_id": ""}\n{"kind": "cell", "cell_id": "x"', ":2: a torn last line"),
        (b"", ": holds no records"),
        (b"[1, 2]\n", ":1: a JSON list, not a record"),
        (
            b'{"kind": "run", "cell_id": "", "selected": ["a\\u001b[2J"]}\n',
            ":1: run header: a selected cell id has control characters",
        ),
        (b'{"kind": "cell", "cell_id": "a\\u0007"}\n', ":1: a cell_id with control characters"),
    ],
    ids=[
        "not-json",
        "wrong-type",
        "selected-str",
        "selected-ints",
        "not-utf8",
        "torn",
        "empty",
        "list",
        "selected-control",
        "cell-id-control",
    ],
)
def test_hostile_results_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    assert main(["merge", str(bad), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}{message}" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_huge_line_is_an_error_not_memory(tmp_path: Path) -> None:
    bad = tmp_path / "huge.jsonl"
    with bad.open("wb") as handle:
        handle.write(json.dumps(header("1/1")).encode() + b"\n")
        handle.write(b'{"kind": "cell", "cell_id": "' + b"x" * (results.MAX_RECORD_BYTES + 1) + b'"}\n')
    with pytest.raises(GGUFSandboxError, match=r"huge.jsonl:2: longer than 16 MiB"):
        read_strict(bad)


def test_the_output_must_be_a_results_file_or_nothing(
    shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes\n")
    assert main(["merge", *map(str, shards), "-o", str(precious)]) == 2
    assert "not a gguf-sandbox results file" in capsys.readouterr().err
    assert precious.read_text() == "my notes\n"
    assert main(["merge", *map(str, shards), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_a_failed_write_leaves_nothing_behind(
    shards: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "all.jsonl")]) == 2
    assert "cannot write (No space left on device)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_junit_is_refused_before_the_merge_is_written_when_it_would_replace_results(
    shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, shards), "-o", str(out), "--junit", str(out)]) == 2
    assert "is the merged results file" in capsys.readouterr().err and not out.exists()
    first = shards[0].read_bytes()
    assert main(["merge", *map(str, shards), "-o", str(out), "--junit", str(shards[0])]) == 2
    assert "not a gguf-sandbox JUnit file" in capsys.readouterr().err
    assert shards[0].read_bytes() == first and not out.exists()
