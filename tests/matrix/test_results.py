"""The JSONL store (durability, torn lines, resume), the summary and the grids."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix import results, runner
from gguf_sandbox.matrix.grid import cell_text, render_grids
from gguf_sandbox.matrix.results import (
    CELL,
    SKIP,
    CellRecord,
    ResultStore,
    latest_cells,
    read_records,
    summarize,
)
from gguf_sandbox.matrix.verdicts import Verdict

MIB = 1 << 20


def record(cell_id: str = "cgroup-py3.11-64m-embed-m", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": CELL,
        "cell_id": cell_id,
        "backend": "cgroup",
        "python": "3.11",
        "memory": 64 * MIB,
        "memory_label": "64m",
        "workload": "embed",
        "model": "m",
        "expected": ["pass", "degraded", "refused"],
        "verdict": "pass",
        "peak": 41 * MIB,
        "limit": 64 * MIB,
        "fingerprint": "f1",
    }
    data.update(overrides)
    return data


def test_append_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        store.append(record())
        # Another reader sees the full line while the store is still open.
        assert read_records(path)[0]["cell_id"] == "cgroup-py3.11-64m-embed-m"
        store.append(record("b"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["time"] > 0 for line in lines)


def test_fresh_run_moves_the_old_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        store.append(record("old"))
    with ResultStore.open(path) as store:
        assert store.finished() == {}
        store.append(record("new"))
    assert [r["cell_id"] for r in read_records(path)] == ["new"]
    assert [r["cell_id"] for r in read_records(tmp_path / "results.jsonl.prev")] == ["old"]


def test_resume_keeps_records_and_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        store.append(record("a", verdict="oom"))
        store.append(record("a", verdict="pass"))
        store.append({**record("s"), "kind": SKIP, "reason": "no docker"})
    with path.open("a") as handle:
        handle.write('{"kind": "cell", "cell_id": "torn"')  # a writer killed mid-line
    with ResultStore.open(path, resume=True) as store:
        finished = store.finished()
        assert set(finished) == {"a"}  # skipped cells are retried, the torn line is ignored
        assert finished["a"].verdict is not None and finished["a"].verdict.value == "pass"
        store.append(record("b"))
    assert [r["cell_id"] for r in read_records(path)] == ["a", "a", "s", "b"]
    text = path.read_text()
    assert text.count("\n") == 4 and "torn" not in text  # the fragment is removed, not glued to "b"


def test_sigint_during_append_is_delivered_after_the_line_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.jsonl"
    original = os.fsync

    def fsync_with_interrupt(fd: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        original(fd)

    with ResultStore.open(path) as store:
        monkeypatch.setattr(os, "fsync", fsync_with_interrupt)
        with pytest.raises(KeyboardInterrupt):
            store.append(record())
        monkeypatch.setattr(os, "fsync", original)
    assert [r["cell_id"] for r in read_records(path)] == ["cgroup-py3.11-64m-embed-m"]


def test_summary_counts_and_lists_unexpected_cells() -> None:
    cells = latest_cells(
        [
            record("a"),
            record("b", verdict="oom", peak=64 * MIB),
            record("c", kind=SKIP, verdict=None, reason="no Python 3.13"),
            record("d", kind="error", verdict=None, reason="model m: missing"),
            record("e", verdict="oom", expected=["oom"]),
        ]
    )
    summary = summarize(cells)
    assert not summary.ok
    assert summary.verdicts == {"pass": 1, "oom": 2}
    assert [c.cell_id for c in summary.unexpected] == ["b", "d"]
    text = summary.render()
    assert "5 cells: 2 oom, 1 pass" in text
    assert "1 skipped: 1× no Python 3.13" in text
    assert "b: oom (expected degraded|pass|refused)" in text
    assert "d: error (model m: missing)" in text
    assert summarize([CellRecord.from_json(record())]).ok


def test_free_text_is_shown_with_its_control_characters_escaped() -> None:
    cells = latest_cells(
        [
            record("a", kind=SKIP, verdict=None, reason="no\x1b[2J Python"),
            record("b", kind="error", verdict=None, reason="model\r\nm: missing\x07"),
            record("c", verdict="oom", repro="gguf-sandbox repro --matrix 'x\ny\x9b'"),
        ]
    )
    text = summarize(cells).render()
    assert "1× no\\x1b[2J Python" in text
    assert "b: error (model\\r\\nm: missing\\x07)" in text
    assert "reproduce: gguf-sandbox repro --matrix 'x\\ny\\x9b'" in text
    assert not results.has_control(text.replace("\n", ""))


def test_grid_rows_are_pythons_columns_are_limits() -> None:
    rows = []
    for python in ("3.10", "3.12", "3.11"):
        for memory in (256, 64):
            verdict = "oom" if (python, memory) == ("3.12", 64) else "pass"
            rows.append(
                record(
                    f"cgroup-py{python}-{memory}m-embed-m",
                    python=python,
                    memory=memory * MIB,
                    memory_label=f"{memory}m",
                    limit=memory * MIB,
                    verdict=verdict,
                    peak=(memory if verdict == "oom" else 41) * MIB,
                )
            )
    rows.append(record("docker-py3.10-64m-embed-m", backend="docker", python="3.10", kind=SKIP, verdict=None))
    text = render_grids(CellRecord.from_json(r) for r in rows)
    blocks = text.split("\n\n")
    assert blocks[0].splitlines() == [
        "embed · m · cgroup",
        "python  64m          256m",
        "py3.10  pass 41/64M  pass 41/256M",
        "py3.11  pass 41/64M  pass 41/256M",
        "py3.12  oom! 64/64M  pass 41/256M",
    ]
    assert blocks[1].splitlines() == ["embed · m · docker", "python  64m", "py3.10  skip"]
    assert "outside the cell's expect" in blocks[2]


def test_cell_text_for_unknown_peak_and_errors() -> None:
    assert cell_text(CellRecord.from_json(record(peak=None))) == "pass ?/64M"
    assert cell_text(CellRecord.from_json(record(kind="error", verdict=None))) == "error!"


# --------------------------------------------------------------------------- nothing moved or lost


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root (and root's siblings' names), with file contents: to prove nothing changed."""
    return {
        str(p.relative_to(root.parent)): (p.read_bytes() if p.is_file() else None)
        for p in sorted([root, *root.rglob("*")])
    }


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_results_on_an_existing_directory_is_refused_and_left_untouched(tmp_path: Path, resume: bool) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    before = tree(project)
    with pytest.raises(GGUFSandboxError, match=r"--results .*/project: is a directory"):
        ResultStore.open(project, resume=resume)
    assert tree(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no project.prev


@pytest.mark.parametrize(
    "content",
    [b"name,score\nada,3\n", b'{"not": "ours"}\n', b"\x00\x01binary", b"partial line without newline"],
    ids=["csv", "other-json", "binary", "one-fragment"],
)
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_file_that_is_not_a_results_file_is_refused_untouched(
    tmp_path: Path, content: bytes, resume: bool
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(GGUFSandboxError, match=r"data\.jsonl: exists and is not a gguf-sandbox results file"):
        ResultStore.open(path, resume=resume)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("device", ["/dev/full", "/dev/null"])
def test_a_device_is_not_a_results_file(device: str) -> None:
    with pytest.raises(GGUFSandboxError, match=rf"{device}: not a regular file"):
        ResultStore.open(device)
    assert Path(device).exists() and not Path(device + ".prev").exists()


def test_prev_is_only_replaced_when_it_is_our_own(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        store.append(record("old"))
    (tmp_path / "results.jsonl.prev").write_text("my notes\n")
    with pytest.raises(GGUFSandboxError, match=r"previous results .*results\.jsonl\.prev: exists and is not"):
        ResultStore.open(path)
    assert (tmp_path / "results.jsonl.prev").read_text() == "my notes\n"
    assert [r["cell_id"] for r in read_records(path)] == ["old"]


def test_an_empty_file_is_ours(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.touch()
    with ResultStore.open(path) as store:
        store.append(record())
    assert [r["cell_id"] for r in read_records(path)] == ["cgroup-py3.11-64m-embed-m"]


DAMAGED_LINES = [
    (b"\xff\xfe not utf-8\n", "line 2: not UTF-8 (byte 0xff at column 1)"),
    (b'{"kind": "cell", "verdict": "pass"}\n', "line 3: a record without a cell_id"),
    (b"{truncated json\n", "line 4: not JSON"),
    (b"[1, 2]\n", "line 5: a JSON list, not a record"),
    (b'{"kind": "cell", "cell_id": "x", "verdict": "great"}\n', "line 6: a malformed cell record ('great'"),
    (
        b'{"kind": "cell", "cell_id": "y", "memory": "64m"}\n',
        "line 7: a malformed cell record ('memory' is str",
    ),
    (b'{"kind": "party", "cell_id": "z"}\n', "line 8: unknown kind 'party'"),
    (
        b'{"kind": "cell", "cell_id": "w", "expected": "pass"}\n',
        "line 9: a malformed cell record ('expected'",
    ),
    # Nested past json's recursion limit: a RecursionError ended report, merge and --resume.
    (b'{"kind": "cell", "cell_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "line 10: not JSON"),
    # 10**400 bytes: report and the grid ended in an OverflowError (no float in MiB) showing it.
    (
        b'{"kind": "cell", "cell_id": "v", "peak": 1' + b"0" * 400 + b"}\n",
        "line 11: a malformed cell record ('peak' is over 1 EiB, not a size in bytes)",
    ),
]


# Control characters in what the grid prints reached the terminal raw: they clear it, retitle it, hide lines.
CONTROL_LINES = [
    (b'{"kind": "cell", "cell_id": "u\\u001b[2J"}\n', "a cell_id with control characters"),
    (b'{"kind": "reference", "cell_id": "r\\r"}\n', "a cell_id with control characters"),
    (
        b'{"kind": "cell", "cell_id": "t", "workload": "w\\u001b]0;owned\\u0007"}\n',
        "a malformed cell record ('workload' has control characters)",
    ),
    (b'{"kind": "skip", "cell_id": "s", "model": "m\\u009b2J"}\n', "a malformed skip record ('model' has"),
    (b'{"kind": "cell", "cell_id": "q", "backend": "cgroup\\n"}\n', "a malformed cell record ('backend' has"),
    (b'{"kind": "cell", "cell_id": "p", "python": "3.12\\u007f"}\n', "a malformed cell record ('python' has"),
    (
        b'{"kind": "error", "cell_id": "o", "memory_label": "\\b"}\n',
        "a malformed error record ('memory_label'",
    ),
]


@pytest.mark.parametrize(
    ("line", "message"),
    CONTROL_LINES,
    ids=["cell-id", "reference-id", "workload", "model-c1", "backend", "python-del", "memory-label"],
)
def test_names_with_control_characters_are_damaged_lines(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(json.dumps(record("a")).encode() + b"\n" + line)
    warnings: list[str] = []
    assert [r["cell_id"] for r in read_records(path, warn=warnings.append)] == ["a"]
    assert len(warnings) == 1 and warnings[0].startswith(f"results file {path}: line 2: {message}")
    assert not results.has_control(warnings[0])


def test_grid_never_prints_a_control_character_from_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    hostile = [
        record("cgroup-py3.11-64m-x\x1b[2J\x07\rEVIL", verdict="oom"),
        record("b", backend="cg\x1b[31m", workload="w\x1b]0;t\x07"),
        record("c", verdict="oom", reason="r\x1b", repro="x\ny"),
        record("d", kind="error", verdict=None, reason="\x1b[2Jgone"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in hostile))
    code = runner.run(
        argparse.Namespace(grid=True, results=str(path), shard=None, durations=None, junit=None, report=None)
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert not results.has_control(out.replace("\n", "")) and not results.has_control(err.replace("\n", ""))
    assert "line 1: a cell_id with control characters" in err and "line 2: a malformed cell record" in err
    assert "reproduce: x\\ny" in out and "d: error (\\x1b[2Jgone)" in out


def test_a_negative_size_is_a_malformed_record() -> None:
    with pytest.raises(ValueError, match=r"'limit' is negative, not a size in bytes"):
        CellRecord.from_json(record(limit=-5))


def damaged_store(path: Path) -> None:
    with ResultStore.open(path) as store:
        store.append(record("first", verdict="oom"))
    with path.open("ab") as handle:
        for line, _ in DAMAGED_LINES:
            handle.write(line)
    with ResultStore.open(path, resume=True) as store:
        store.append(record("last"))


def test_damaged_lines_are_reported_with_their_number_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    damaged_store(path)
    capsys.readouterr()
    found = read_records(path)
    assert [r["cell_id"] for r in found] == ["first", "last"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(DAMAGED_LINES)
    for line, (_, message) in zip(err, DAMAGED_LINES, strict=True):
        assert line.startswith(f"results file {path}: {message}") and line.endswith("; skipped"), line


def test_resume_skips_damaged_lines_and_keeps_the_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    damaged_store(path)
    warnings: list[str] = []
    with ResultStore.open(path, resume=True, warn=warnings.append) as store:
        assert set(store.finished()) == {"first", "last"}
        assert store.finished()["first"].verdict == Verdict.OOM
        store.append(record("after"))
    assert len(warnings) == len(DAMAGED_LINES) and "line 2: not UTF-8" in warnings[0]
    assert [r["cell_id"] for r in read_records(path, warn=lambda _: None)] == ["first", "last", "after"]


def test_grid_reads_what_it_can_and_says_what_it_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    damaged_store(path)
    capsys.readouterr()
    code = runner.run(
        argparse.Namespace(grid=True, results=str(path), shard=None, durations=None, junit=None, report=None)
    )
    out, err = capsys.readouterr()
    assert code == 1  # "first" is an oom outside its expect
    assert "2 cells: 1 oom, 1 pass" in out
    assert f"results file {path}: line 2: not UTF-8" in err and "line 9:" in err
    assert "Traceback" not in err


def test_many_damaged_lines_are_summarized(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(json.dumps(record()).encode() + b"\n" + b"garbage\n" * 500)
    warnings: list[str] = []
    assert len(read_records(path, warn=warnings.append)) == 1
    assert len(warnings) == results.MAX_WARNINGS + 1
    assert warnings[-1].endswith(f"{500 - results.MAX_WARNINGS} more damaged lines skipped")


def test_an_oversized_line_is_damage_not_memory(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    big = b'{"kind": "cell", "cell_id": "' + b"x" * (results.MAX_RECORD_BYTES + 10) + b'"}\n'
    path.write_bytes(
        json.dumps(record("a")).encode() + b"\n" + big + json.dumps(record("b")).encode() + b"\n"
    )
    warnings: list[str] = []
    assert [r["cell_id"] for r in read_records(path, warn=warnings.append)] == ["a", "b"]
    assert warnings == [f"results file {path}: line 2: longer than 16 MiB; skipped"]


def test_a_torn_last_line_is_removed_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        store.append(record("a"))
    intact = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(b'{"kind": "cell", "cell_id": "to')  # a writer killed mid-line
    warnings: list[str] = []
    with ResultStore.open(path, resume=True, warn=warnings.append):
        pass
    assert path.read_bytes() == intact  # not even a newline is added
    assert warnings == [
        f"results file {path}: removed a torn last line (31 bytes) left by an interrupted run"
    ]


def test_reading_a_directory_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFSandboxError, match=r"results file .*: cannot read \(Is a directory\)"):
        read_records(tmp_path)


# --------------------------------------------------------------------------- write errors


def _mount(target: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only): a disk that fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    _mount(mount, "size=64k,mode=0755")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_error_and_the_finished_cells_stay_readable(small_tmpfs: Path) -> None:
    path = small_tmpfs / "results.jsonl"
    written: list[str] = []
    with ResultStore.open(path) as store, pytest.raises(GGUFSandboxError) as caught:
        for index in range(100):
            store.append(record(f"cell-{index}", reason="x" * 3000))
            written.append(f"cell-{index}")
    message = str(caught.value)
    assert message.startswith(f"results file {path}: cannot write (No space left on device)"), message
    assert f"the {len(written)} records before this one are intact" in message and "\n" not in message
    assert 10 < len(written) < 100
    assert [r["cell_id"] for r in read_records(path)] == written
    assert path.read_bytes().endswith(b"}\n")  # the failed record's bytes were cut off again


def test_a_full_disk_through_the_cli_exits_2_with_one_line(small_tmpfs: Path, tmp_path: Path) -> None:
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        for _ in range(64):
            filler.write(b"\0" * 4096)  # until the disk is full: nothing left for the run header
    done = _cli_run(tmp_path, small_tmpfs / "results.jsonl")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gguf-sandbox run: error: results file " in lines[0], done.stderr
    assert "No space left on device" in lines[0] or "cannot open" in lines[0]


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "old-results"])
def test_a_read_only_target_is_one_error_naming_the_path(small_tmpfs: Path, existing: bool) -> None:
    path = small_tmpfs / "results.jsonl"
    if existing:
        with ResultStore.open(path) as store:
            store.append(record("old"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(GGUFSandboxError, match=rf"results file {path}: cannot .*\(Read-only file system\)"):
        ResultStore.open(path)
    if existing:
        assert [r["cell_id"] for r in read_records(path)] == ["old"]
        with pytest.raises(GGUFSandboxError, match=r"cannot open for writing \(Read-only file system\)"):
            ResultStore.open(path, resume=True)


MATRIX = """\
version: 1
pythons: ["3.11"]
memory: [64m]
workloads:
  bomb: {control: alloc-bomb, args: {step: 4m, max: 8m}}
"""


def _cli_run(tmp_path: Path, results_path: Path) -> subprocess.CompletedProcess[str]:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(MATRIX)
    argv = [sys.executable, "-m", "gguf_sandbox", "run", str(matrix), "--backend", "cgroup"]
    return subprocess.run(
        [*argv, "--results", str(results_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_results_on_a_directory_through_the_cli_exits_2_untouched(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me\n")
    before = tree(project)
    done = _cli_run(tmp_path, project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"gguf-sandbox run: error: --results {project}: is a directory; give a file path such as "
        f"{project / 'results.jsonl'}"
    ]
    assert tree(project) == before and not (tmp_path / "project.prev").exists()
