"""Tests for matrix/report*.py and timeline.py: the HTML, summary.md, PNGs, the SVG timeline, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.cli import main
from gguf_sandbox.matrix.report import write_report
from gguf_sandbox.matrix.report_data import load_report
from gguf_sandbox.matrix.report_html import render_html
from gguf_sandbox.matrix.report_md import MAX_SUMMARY_BYTES, render_summary
from gguf_sandbox.matrix.timeline import MAX_READ_POINTS, parse_timeline, timeline_svg
from gguf_sandbox.sandbox.sampling import Timeline

MIB = 1 << 20
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
LIMITS = [64, 96, 128]


def cell(
    python: str, mib: int, verdict: str = "pass", workload: str = "parse", **extra: Any
) -> dict[str, Any]:
    record = {
        "kind": "cell",
        "cell_id": f"cgroup-py{python}-{mib}m-{workload}",
        "backend": "cgroup",
        "python": python,
        "memory": mib * MIB,
        "memory_label": f"{mib}m",
        "workload": workload,
        "model": "minilm_q8_0",
        "expected": ["pass", "degraded"],
        "verdict": verdict,
        "peak": mib * MIB // 2,
        "limit": mib * MIB,
        "duration_s": 1.5,
        "oom": {"flag": verdict == "oom", "counter": 0, "sigkill": False, "limit_reached": False},
        "plan": "stream",
        "log_tail": ["line one"],
        "repro": f"gguf-sandbox repro --python {python} --memory {mib}m --backend cgroup "
        f"--workload {workload}",
    }
    return {**record, **extra}


def write(path: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def header() -> dict[str, Any]:
    return {"kind": "run", "cell_id": "", "backends": ["cgroup"], "version": "9.9", "matrix": "matrix.yaml"}


def grid_records() -> list[dict[str, Any]]:
    records = [header()] + [cell(p, m) for p in PYTHONS for m in LIMITS]
    records[1] = cell("3.10", 64, "oom")  # outside expect
    return records


class Parsed(HTMLParser):
    """Ids, outlined cells and the text of every <script> (there must be none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: set[str] = set()
        self.outside: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append(tag)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "a" and str(found.get("href", "")).startswith("#"):
            self.links.add(str(found["href"])[1:])
        if tag == "td" and found.get("class") == "outside":
            self.outside.append(str(found.get("title")))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(html: str) -> Parsed:
    parser = Parsed()
    parser.feed(html)
    parser.close()
    return parser


def test_html_has_every_cell_linked_and_marks_cells_outside_expect(tmp_path: Path) -> None:
    report = load_report([write(tmp_path / "r.jsonl", grid_records())])
    page = parsed(render_html(report))
    ids = {c.record.cell_id for c in report.cells}
    assert len(ids) == len(PYTHONS) * len(LIMITS)
    anchors = {c.anchor for c in report.cells}
    assert anchors <= page.ids and anchors <= page.links
    assert page.outside == ["cgroup-py3.10-64m-parse"]
    text = "".join(page.text)
    assert all(cell_id in text for cell_id in ids)
    assert "oom!" in text and "9.9" in text
    assert "script" not in page.tags and "http" not in render_html(report).replace("http://www.w3.org", "")


def test_hostile_strings_are_escaped_and_long_log_lines_cut(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    records = [
        header(),
        cell("3.12", 64, "crash", cell_id=f"x{evil}", reason=evil, log_tail=[evil, "A" * 100_000], plan=evil),
    ]
    report = load_report([write(tmp_path / "r.jsonl", records)])
    html = render_html(report)
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert "A" * 2_001 not in html and "more characters" in html
    assert "<script" not in render_summary(report)


def test_damaged_lines_are_skipped_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    path = write(tmp_path / "r.jsonl", grid_records(), tail='not json\n{"torn": ')
    report = load_report([path], warn=warnings.append)
    assert len(report.cells) == len(PYTHONS) * len(LIMITS)
    assert warnings == [f"results file {path}: line {len(grid_records()) + 1}: not JSON; skipped"]


def test_summary_stays_under_its_bound_for_5000_cells(tmp_path: Path) -> None:
    records = [header()] + [
        cell(f"3.{i % 4 + 10}", 64 + i // 40, "oom", workload=f"w{i % 40}") for i in range(5_000)
    ]
    report = load_report([write(tmp_path / "r.jsonl", records)])
    assert len(report.cells) == 5_000
    summary = render_summary(report)
    assert len(summary.encode("utf-8")) < MAX_SUMMARY_BYTES
    assert "**Truncated**" in summary and "5000 cells: 5000 oom" in summary


def test_summary_lists_outside_cells_with_their_repro(tmp_path: Path) -> None:
    summary = render_summary(load_report([write(tmp_path / "r.jsonl", grid_records())]))
    assert "### 1 outside expect" in summary
    assert "gguf-sandbox repro --python 3.10 --memory 64m --backend cgroup --workload parse" in summary
    assert "| py3.10 | **oom! 32/64M** | pass 48/96M | pass 64/128M |" in summary


def test_old_records_get_a_rebuilt_repro_line(tmp_path: Path) -> None:
    record = cell("3.11", 96)
    del record["repro"]
    report = load_report([write(tmp_path / "r.jsonl", [header(), record])])
    assert report.cells[0].repro_rebuilt
    assert report.cells[0].repro == (
        "gguf-sandbox repro --python 3.11 --memory 96m --backend cgroup --workload parse --model minilm_q8_0"
    )


SAMPLES = [[0.0, 10 * MIB, 8 * MIB], [0.5, 40 * MIB, 30 * MIB], [1.0, 64 * MIB, 60 * MIB]]


def test_timeline_svg_draws_usage_working_set_and_the_limit() -> None:
    svg = timeline_svg(parse_timeline({"timeline": SAMPLES}), 64 * MIB, title="t")
    page = parsed(svg)
    assert page.tags.count("polyline") == 2 and page.tags.count("line") == 1
    assert 'class="limit"' in svg and "limit 64M" in svg and "OOM kill" not in svg


def test_timeline_svg_marks_the_oom_kill_moment() -> None:
    timeline = parse_timeline({"timeline": SAMPLES, "oom_kill_s": 0.98})
    assert timeline.oom_kill_s == 0.98
    svg = timeline_svg(timeline, 64 * MIB)
    assert parsed(svg).tags.count("line") == 2 and 'class="oom-kill"' in svg and "OOM kill 0.98 s" in svg


@pytest.mark.parametrize(
    "value",
    [
        None,
        "x",
        [],
        [[0, 1]],
        [[0, 1, -1]],
        [[0, float("nan"), 1]],
        [[0, True, 1]],
        [[0, 1, 1]] * (MAX_READ_POINTS + 1),
    ],
    ids=["absent", "text", "empty", "short-sample", "negative", "nan", "bool", "too-many"],
)
def test_malformed_timelines_read_as_none(value: object) -> None:
    assert parse_timeline({"timeline": value, "oom_kill_s": value}) == Timeline()


def test_a_cell_with_a_timeline_shows_it(tmp_path: Path) -> None:
    records = [header(), cell("3.12", 64, "oom", timeline=SAMPLES)]
    html = render_html(load_report([write(tmp_path / "r.jsonl", records)]))
    assert html.count("<svg") == 1 and 'class="limit"' in html


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_pngs_are_written_per_grid_and_per_failed_timeline(tmp_path: Path) -> None:
    records = [*grid_records(), cell("3.12", 64, "oom", workload="bomb", timeline=SAMPLES)]
    records[-1]["cell_id"] = "c$x$-bomb"  # mathtext in a title must not break the picture
    written = write_report(load_report([write(tmp_path / "r.jsonl", records)]), tmp_path / "out")
    names = sorted(p.name for p in written.images)
    assert names == [
        "grid-bomb_minilm_q8_0_cgroup.png",
        "grid-parse_minilm_q8_0_cgroup.png",
        "timeline-c_x_-bomb.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written.images)
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "out" / "summary.md").is_file()


def test_cli_writes_junit_with_one_testcase_per_cell_of_every_file(tmp_path: Path) -> None:
    first, second = grid_records()[:5], [header(), *grid_records()[5:]]
    paths = [write(tmp_path / "a.jsonl", first), write(tmp_path / "b.jsonl", second)]
    junit = tmp_path / "cells.xml"
    assert main(["report", *map(str, paths), "--output", str(tmp_path / "out"), "--junit", str(junit)]) == 0
    root = ET.parse(junit).getroot()
    cases = root.findall("testsuite/testcase")
    assert len(cases) == len(PYTHONS) * len(LIMITS)
    failed = [case.get("name") for case in cases if case.find("failure") is not None]
    assert failed == ["cgroup-py3.10-64m-parse"]


def test_without_matplotlib_html_and_summary_are_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("gguf_sandbox.matrix.report_png.pyplot", lambda: None)
    path = write(tmp_path / "r.jsonl", grid_records())
    assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.html", "summary.md"]
    assert "pip install 'gguf-sandbox[report]'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "headers-only"])
def test_cli_refuses_bad_inputs_in_one_line(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.jsonl"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_text("")
    elif case == "headers-only":
        write(path, [header()])
    assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gguf-sandbox report: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.jsonl", grid_records())
    (tmp_path / "out").write_text("x")
    assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_floors_show_as_a_table_and_a_bar_chart_with_the_peers_columns(tmp_path: Path) -> None:
    from dataclasses import replace

    from gguf_sandbox.floors import Floor, FloorTable, save_floors

    evil = "<script>x</script>"
    ours = Floor("embed", "minilm_q8_0", "3.12", "cgroup", 58 * MIB, 58 * MIB, MIB, 2, {"count": "1000"})
    peer = replace(ours, workload="llama-cpp", floor=110 * MIB, seconds=12.5, cosine=0.99967)
    save_floors(FloorTable((ours, peer, replace(ours, workload=evil, floor=7 * MIB))), tmp_path / "f.json")
    report = load_report([write(tmp_path / "r.jsonl", grid_records())], tmp_path / "f.json")
    html = render_html(report)
    assert "<script" not in html and "cosine to ours" in html and "0.99967" in html and "12.5" in html
    start = html.index('<svg class="floors"')
    svg = ET.fromstring(html[start : html.index("</svg>", start) + len("</svg>")])
    widths = [int(rect.get("width", "0")) for rect in svg.iter("rect")]
    assert report.floors is not None
    order = [f.workload for f in report.floors.floors]
    # One bar per floor, in the table's order, the largest floor longest.
    assert len(widths) == 3 and max(widths) == widths[order.index("llama-cpp")]


@pytest.mark.parametrize("name", ["index.html", "summary.md"])
def test_a_users_file_in_the_report_directory_is_not_replaced(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.jsonl", grid_records())
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / name).write_text("<p>my own page</p>\n")
    assert main(["report", str(path), "--output", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert f"{name}: exists and is not a gguf-sandbox report's {name}; left untouched" in err
    assert [p.name for p in (tmp_path / "site").iterdir()] == [name]
    assert (tmp_path / "site" / name).read_text() == "<p>my own page</p>\n"


def test_a_second_report_replaces_the_first(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", grid_records())
    for _ in range(2):
        assert (
            main(["report", str(path), "--output", str(tmp_path / "out"), "--junit", str(tmp_path / "j.xml")])
            == 0
        )


@pytest.mark.parametrize(
    "option", [["--output", ""], ["--output", "out", "--junit", ""], ["--output", "out", "--floors", ""]]
)
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(
    tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", grid_records())
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(path), *option]) == 2
    assert "an empty path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


@pytest.mark.parametrize("target", ["results", "notes", "fifo"])
def test_junit_never_replaces_what_is_not_a_junit_file_and_nothing_is_written(
    tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.jsonl", grid_records())
    junit = {"results": path, "notes": tmp_path / "notes.txt", "fifo": tmp_path / "pipe"}[target]
    if target == "notes":
        junit.write_text("my notes\n")
    elif target == "fifo":
        os.mkfifo(junit)  # opening it to write would wait for a reader forever
    before = path.read_bytes()
    assert main(["report", str(path), "--output", str(tmp_path / "out"), "--junit", str(junit)]) == 2
    assert "--junit" in capsys.readouterr().err
    assert path.read_bytes() == before and not (tmp_path / "out").exists()
    if target == "notes":
        assert junit.read_text() == "my notes\n"
    if target == "fifo":
        assert stat.S_ISFIFO(junit.stat().st_mode)


def test_lone_surrogates_in_a_results_file_are_shown_as_replacement_characters(tmp_path: Path) -> None:
    # JSON's "\ud800" escapes make strings UTF-8, HTML and fonts cannot hold: the report crashed on them.
    records = grid_records()
    records[1] = {**records[1], "reason": "bad \ud800 byte", "workload": "w\udcff"}
    path = write(tmp_path / "r.jsonl", records)
    assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "bad \ufffd byte" in html and "w\ufffd" in html
