"""The JSONL store (durability, torn lines, resume), the summary and the grids."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.grid import cell_text, render_grids
from gguf_sandbox.results import CELL, SKIP, CellRecord, ResultStore, latest_cells, read_records, summarize

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
    assert path.read_text().count("\n") == 5  # the torn line was terminated, not glued to "b"


def test_sigint_during_append_is_delivered_after_the_line_is_written(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with ResultStore.open(path) as store:
        original = store._handle.flush

        def flush_with_interrupt() -> None:
            os.kill(os.getpid(), signal.SIGINT)
            original()

        store._handle.flush = flush_with_interrupt  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            store.append(record())
        store._handle.flush = original  # type: ignore[method-assign]
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
