"""Verdicts read from results files and compared between the v1 host and the v2 guest."""

from __future__ import annotations

import json
from pathlib import Path

from tests.platform.verdicts import CellVerdict, compare, format_rows, load_verdicts, read_verdicts


def _cell(cell_id: str, verdict: str, counter: int = 0) -> str:
    return json.dumps(
        {"kind": "cell", "cell_id": cell_id, "verdict": verdict, "oom": {"counter": counter, "flag": False}}
    )


def test_cells_skips_and_errors_are_read_other_records_ignored() -> None:
    lines = [
        json.dumps({"kind": "run", "cell_id": "", "selected": ["a"]}),
        json.dumps({"kind": "reference", "cell_id": "a-ref", "verdict": "pass"}),
        _cell("a", "pass"),
        _cell("b", "oom", counter=1),
        json.dumps({"kind": "skip", "cell_id": "c", "reason": "no python"}),
        json.dumps({"kind": "error", "cell_id": "d", "reason": "model"}),
        "{damaged",
        "[1, 2]",
    ]
    assert load_verdicts(lines) == {
        "a": CellVerdict("pass", 0),
        "b": CellVerdict("oom", 1),
        "c": CellVerdict("skip", None),
        "d": CellVerdict("error", None),
    }


def test_the_last_record_of_a_cell_wins() -> None:
    assert load_verdicts([_cell("a", "timeout"), _cell("a", "pass")]) == {"a": CellVerdict("pass", 0)}


def test_a_missing_file_has_no_verdicts(tmp_path: Path) -> None:
    assert read_verdicts(tmp_path / "absent.jsonl") == {}


def test_compare_marks_differences_and_missing_cells() -> None:
    v1 = {"a": CellVerdict("pass", 0), "b": CellVerdict("oom", 1), "c": CellVerdict("pass", 0)}
    v2 = {"a": CellVerdict("pass", 0), "b": CellVerdict("timeout", 0), "d": CellVerdict("pass", 0)}
    rows = compare(v1, v2)
    assert [(row.cell_id, row.same) for row in rows] == [
        ("a", True),
        ("b", False),
        ("c", False),
        ("d", False),
    ]
    table = format_rows(rows).splitlines()
    assert table[0].split() == ["cell", "v1", "(host)", "v2", "(guest)"]
    assert table[2].split() == ["b", "oom", "(oom_kill", "1)", "timeout", "DIFF"]
    assert "(missing)" in table[3] and table[3].endswith("DIFF")
    assert table[1].endswith("same")
