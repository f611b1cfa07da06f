"""The floors file: round trip, lookups falling back to the nearest measurement, damaged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gguf_sandbox.floors import (
    FLOORS_FILE,
    Floor,
    FloorsError,
    FloorTable,
    load_floors,
    record_floor,
    save_floors,
)

MIB = 1 << 20


def floor(python: str = "3.12", backend: str = "cgroup", limit: int = 50, workload: str = "embed") -> Floor:
    return Floor(
        workload,
        "minilm_q8_0",
        python,
        backend,
        limit * MIB,
        (limit - 1) * MIB,
        MIB,
        3,
        {"count": "1000"},
        {"numpy": "2.1"},
    )


def test_record_replaces_the_same_cell_and_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "floors.json"
    record_floor(floor(limit=50), path)
    record_floor(floor(python="3.11", limit=48), path)
    table = record_floor(floor(limit=52), path)
    assert [(f.python, f.floor // MIB) for f in table.floors] == [("3.11", 48), ("3.12", 52)]
    assert load_floors(path) == table
    assert table.floors[1].args == {"count": "1000"}


def test_find_prefers_the_exact_cell_then_the_same_python_then_any() -> None:
    table = FloorTable(
        (floor("3.11", "cgroup", 48), floor("3.12", "cgroup", 50), floor("3.12", "docker", 55))
    )
    assert table.find("embed", "minilm_q8_0", "3.12", "docker").floor == 55 * MIB  # type: ignore[union-attr]
    assert table.find("embed", "minilm_q8_0", "3.11", "docker").floor == 48 * MIB  # type: ignore[union-attr]
    assert table.find("embed", "minilm_q8_0", "3.13", "cgroup").floor == 55 * MIB  # type: ignore[union-attr]
    assert table.find("mcp", "minilm_q8_0", "3.12", "cgroup") is None
    assert table.find("embed", "other", "3.12", "cgroup") is None


def test_an_absent_file_holds_no_floors(tmp_path: Path) -> None:
    assert load_floors(tmp_path / "none.json") == FloorTable()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe", "not a JSON floors file"),
        (b"{", "not a JSON floors file"),
        (b"[]", "expected"),
        (b'{"version": 2, "floors": []}', "expected"),
        (b'{"version": 1, "floors": {}}', "'floors' must be a list"),
        (b'{"version": 1, "floors": [{"workload": "embed"}]}', "missing key"),
        (b'{"version": 1, "floors": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a JSON floors file"),
        (
            b'{"version": 1, "floors": [{"workload": "e", "python": "3.12", "backend": "c", "floor": -1}]}',
            r"floors\[0\]\.floor: expected a positive integer",
        ),
        (
            b'{"version": 1, "floors": [{"workload": "e", "python": "3.12", "backend": "c", "floor": true}]}',
            "expected a positive integer",
        ),
    ],
    ids=[
        "utf8",
        "json",
        "list",
        "version",
        "floors-map",
        "missing",
        "nested-100000-deep",
        "negative",
        "bool",
    ],
)
def test_damaged_files_are_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "floors.json"
    path.write_bytes(content)
    with pytest.raises(FloorsError, match=message):
        load_floors(path)


def test_an_oversized_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "floors.json"
    path.write_bytes(b" " * (5 << 20))
    with pytest.raises(FloorsError, match="not a floors file"):
        load_floors(path)


def test_save_is_atomic_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "floors.json"
    save_floors(FloorTable((floor(),)), target)
    assert json.loads(target.read_text())["floors"][0]["floor"] == 50 * MIB
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(FloorsError, match="cannot write"):
        save_floors(FloorTable(), blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "floors.json"]


def test_the_shipped_floors_file_is_valid() -> None:
    table = load_floors(FLOORS_FILE)
    assert all(f.floor % f.resolution == 0 for f in table.floors)
    assert all(f.measured_on.get("date") and f.measured_on.get("python") for f in table.floors)
    assert all(f.measured_on.get("cold_caches") == "true" for f in table.floors)
    # The versions are the cell's, not those of a host-side client that drove it.
    assert all(f.measured_on["python"].startswith(f"{f.python}.") for f in table.floors)


@pytest.mark.parametrize("workload", ["embed", "mcp"])
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_the_shipped_floors_cover_every_python_of_the_promise(workload: str, python: str) -> None:
    """The matrix's 64m promise and serve's refusal rest on these records: each must have been measured."""
    measured = [f for f in load_floors(FLOORS_FILE).for_workload(workload) if f.python == python]
    assert measured, f"no recorded {workload} floor for Python {python}; run gguf-sandbox floor --record"
    assert all(f.model == "minilm_q8_0" and f.args.get("count") == "1000" for f in measured)
    assert max(f.floor for f in measured) <= 64 * MIB, "the matrix promises every workload at 64m"


def test_lowest_floor_is_over_models_and_backends_on_the_python_when_measured_there() -> None:
    def at(model: str, python: str, backend: str, mib: int) -> Floor:
        return Floor("mcp", model, python, backend, mib * MIB, None, MIB, 3)

    table = FloorTable(
        (
            at("small", "3.11", "cgroup", 50),
            at("small", "3.11", "docker", 54),
            at("big", "3.11", "cgroup", 90),
            at("small", "3.12", "cgroup", 70),
        )
    )
    assert table.lowest_floor("mcp", "3.11").floor == 50 * MIB  # type: ignore[union-attr]
    assert table.lowest_floor("mcp", "3.13").floor == 50 * MIB  # type: ignore[union-attr]
    assert table.lowest_floor("embed", "3.11") is None


def test_a_saved_floors_file_is_readable_by_every_user(tmp_path: Path) -> None:
    """A jailed cgroup cell runs serve as nobody, and serve reads the floors file: mkstemp's 0600 made
    it fail with FloorsError in every cell after a `floor --record`."""
    target = tmp_path / "floors.json"
    previous = os.umask(0o022)
    try:
        save_floors(FloorTable((floor(),)), target)
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_floor_keeps_the_seconds_and_a_peers_cosine_and_older_records_load(tmp_path: Path) -> None:
    from dataclasses import replace

    peer = replace(floor(workload="llama-cpp", limit=110), seconds=12.5, cosine=0.99967)
    path = tmp_path / "floors.json"
    save_floors(FloorTable((peer, floor())), path)
    saved = {entry["workload"]: entry for entry in json.loads(path.read_text())["floors"]}
    # Records without them stay as they were written (no null keys).
    assert {"seconds", "cosine"} <= set(saved["llama-cpp"]) and not {"seconds", "cosine"} & set(
        saved["embed"]
    )
    loaded = load_floors(path)
    assert loaded.find("llama-cpp", "minilm_q8_0", "3.12", "cgroup") == peer
    assert loaded.find("embed", "minilm_q8_0", "3.12", "cgroup") == floor()


@pytest.mark.parametrize("value", ["12", -1, True, float("inf")], ids=["text", "negative", "bool", "inf"])
def test_a_damaged_seconds_or_cosine_is_one_clear_error(tmp_path: Path, value: object) -> None:
    entry = {**floor().to_json(), "cosine": value}
    (tmp_path / "floors.json").write_text(json.dumps({"version": 1, "floors": [entry]}))
    with pytest.raises(FloorsError, match=r"floors\[0\]\.cosine: expected a finite number ≥ 0"):
        load_floors(tmp_path / "floors.json")


def test_the_table_shows_time_per_1000_texts_and_the_cosine_and_filters_workloads() -> None:
    from dataclasses import replace

    from gguf_sandbox.floors import markdown_table

    peer = replace(floor(workload="llama-cpp", limit=110), seconds=12.5, cosine=0.99967)
    decoder = replace(floor(workload="llama-cpp-smollm2"), seconds=4.0, args={"count": "100"})
    table = FloorTable((peer, decoder, floor()))
    lines = markdown_table(table).splitlines()
    assert "| s / 1000 texts | cosine to ours |" in lines[0] and len(lines) == 5
    row = next(line for line in lines if line.startswith("| llama-cpp (count=1000)"))
    assert "| 110 MiB | 109.0 MiB | 12.5 | 0.99967 |" in row
    assert "| 40.0 | — |" in next(line for line in lines if "smollm2" in line)
    assert "| — | — |" in next(line for line in lines if line.startswith("| embed "))
    only = markdown_table(table, workloads={"llama-cpp"}).splitlines()
    assert len(only) == 3 and only[2] == row


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"python": "3.²"}, r"floors\[0\]\.python: expected a Python version such as 3.12, got '3.²'"),
        ({"python": "3." + "1" * 5000}, r"floors\[0\]\.python: expected a Python version"),
        (
            {"floor": 10**400},
            r"floors\[0\]\.floor: expected a positive integer ≤ [\d,]+, got a 401-digit one",
        ),
        ({"peak": 10**400}, r"floors\[0\]\.peak: expected a positive integer ≤"),
        ({"resolution": 10**400}, r"floors\[0\]\.resolution: expected a positive integer ≤"),
        ({"seconds": 1e308}, r"floors\[0\]\.seconds: expected a finite number ≥ 0 and ≤ 1e\+09, got 1e\+308"),
        ({"cosine": 5.0}, r"floors\[0\]\.cosine: expected a finite number ≥ 0 and ≤ 1, got 5.0"),
    ],
    ids=[
        "superscript-python",
        "huge-python",
        "huge-floor",
        "huge-peak",
        "huge-resolution",
        "huge-seconds",
        "cosine",
    ],
)
def test_hostile_numbers_are_one_clear_error_not_a_traceback_later(
    tmp_path: Path, override: dict[str, object], message: str
) -> None:
    # Loaded, each of these crashed (or printed inf) where the table or the report computed with it.
    (tmp_path / "floors.json").write_text(
        json.dumps({"version": 1, "floors": [{**floor().to_json(), **override}]})
    )
    with pytest.raises(FloorsError, match=message) as error:
        load_floors(tmp_path / "floors.json")
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


@pytest.mark.parametrize(
    "count",
    ["²", "9" * 5000, "٣", "0", "-5", ""],
    ids=["superscript", "huge", "arabic", "zero", "negative", "empty"],
)
def test_a_hostile_count_gives_no_time_per_1000_texts(count: str) -> None:
    from dataclasses import replace

    from gguf_sandbox.floors import markdown_table, per_thousand

    hostile = replace(floor(), seconds=2.0, args={"count": count})
    assert per_thousand(hostile) is None
    assert "| — | — |" in markdown_table(FloorTable((hostile,))).splitlines()[-1]


def test_a_cosine_a_rounding_error_above_1_still_loads(tmp_path: Path) -> None:
    """Records written before cosines were clamped may hold one: they must not make the file unreadable."""
    entry = {**floor().to_json(), "cosine": 1.0000000000000002}
    (tmp_path / "floors.json").write_text(json.dumps({"version": 1, "floors": [entry]}))
    assert load_floors(tmp_path / "floors.json").floors[0].cosine == 1.0000000000000002


@pytest.mark.parametrize(
    "override",
    [{"workload": "a\ud800"}, {"model": "m\x1b[31m"}, {"backend": "x" * 201}, {"args": {"count": "1\n2"}}],
    ids=["surrogate", "escape-sequence", "long", "newline-in-args"],
)
def test_names_that_tables_and_images_cannot_show_are_refused(
    tmp_path: Path, override: dict[str, object]
) -> None:
    (tmp_path / "floors.json").write_text(
        json.dumps({"version": 1, "floors": [{**floor().to_json(), **override}]})
    )
    with pytest.raises(FloorsError, match="expected printable text of at most 200 characters") as error:
        load_floors(tmp_path / "floors.json")
    assert "\n" not in str(error.value) and len(str(error.value)) < 300
