"""Tests for matrix/shard.py: --shard parsing, cost estimates, and the LPT split of the default matrix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gguf_sandbox.cli import main
from gguf_sandbox.errors import GGUFSandboxError, MatrixError
from gguf_sandbox.floors import MAX_SECONDS
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.load import load
from gguf_sandbox.matrix.runner import reference_spec
from gguf_sandbox.matrix.schema import Cell, Matrix
from gguf_sandbox.matrix.shard import (
    MAX_SHARDS,
    Job,
    Shard,
    estimate_seconds,
    parse_shard,
    partition,
    plan_shards,
    read_durations,
    take_shard,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default() -> tuple[Matrix, list[Cell]]:
    matrix = load(str(REPO / "matrix.yaml"))
    return matrix, expand_cells(matrix, cache_dir=Path("/cache"))


def reference_id(matrix: Matrix) -> object:
    return lambda cell: reference_spec(cell, matrix.reference_memory).cell_id


@pytest.mark.parametrize(
    ("text", "shard"), [("1/4", Shard(1, 4)), ("04/04", Shard(4, 4)), (" 1/1", Shard(1, 1))]
)
def test_shards_parse(text: str, shard: Shard) -> None:
    assert parse_shard(text) == shard


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0/3", "I must be from 1 to N"),
        ("4/3", "I must be from 1 to N"),
        ("a/b", "expected I/N"),
        ("1/0", "N must be from 1"),
        ("", "expected I/N"),
        ("1/2/3", "expected I/N"),
        (f"1/{MAX_SHARDS + 1}", "N must be from 1"),
        ("1/" + "9" * 5000, "N must be from 1"),
        ("9" * 5000 + "/2", "I must be from 1 to N"),
    ],
    ids=["zero", "past-n", "letters", "no-shards", "empty", "three-parts", "too-many", "huge-n", "huge-i"],
)
def test_bad_shards_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(MatrixError, match=message) as caught:
        parse_shard(text)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_estimates_scale_with_count_and_stay_under_the_timeout(default: tuple[Matrix, list[Cell]]) -> None:
    matrix, _ = default
    embed = matrix.workloads["embed"]
    assert estimate_seconds(embed, 300) == pytest.approx(26.0)  # 1000 texts, as measured
    assert estimate_seconds(embed.with_options({"count": "100"}), 300) == pytest.approx(3.5)
    assert estimate_seconds(embed, 10) == 10
    assert estimate_seconds(matrix.workloads["parse"], 300) == 1.0
    ci = load(str(REPO / "matrix.yaml"), profile="ci")
    assert estimate_seconds(ci.workloads["mcp"], 480) < estimate_seconds(matrix.workloads["mcp"], 480) / 5


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_partition_the_default_matrix(default: tuple[Matrix, list[Cell]], count: int) -> None:
    matrix, cells = default
    plan = plan_shards(matrix, cells, count, reference_id(matrix))  # type: ignore[arg-type]
    ids = [cell.cell_id for cell in cells]
    parts = [take_shard(cells, plan, Shard(i, count)) for i in range(1, count + 1)]
    flat = [cell.cell_id for part in parts for cell in part]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(ids)  # each cell in exactly one shard
    for part in parts:  # a shard keeps the expansion order
        assert [c.cell_id for c in part] == [i for i in ids if i in {c.cell_id for c in part}]
    ideal = sum(plan.seconds) / count
    assert max(plan.seconds) <= ideal * 1.05 + 1


def test_the_plan_is_deterministic(default: tuple[Matrix, list[Cell]]) -> None:
    matrix, cells = default
    first = plan_shards(matrix, cells, 3, reference_id(matrix))  # type: ignore[arg-type]
    again = plan_shards(matrix, list(cells), 3, reference_id(matrix))  # type: ignore[arg-type]
    assert first == again


def test_durations_balance_three_shards_within_a_fifth(
    default: tuple[Matrix, list[Cell]], tmp_path: Path
) -> None:
    """The issue's acceptance: given a durations file, 1/3, 2/3, 3/3 cost within 20% of each other."""
    matrix, cells = default
    rng = random.Random(13)
    durations = tmp_path / "previous.jsonl"
    lines = [
        {"kind": "cell", "cell_id": c.cell_id, "memory": 1, "duration_s": rng.uniform(0.2, 60)}
        for c in cells
        if rng.random() < 0.9  # some cells were not in the previous run: estimated, scaled
    ]
    durations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    measured = read_durations(durations)
    plan = plan_shards(matrix, cells, 3, reference_id(matrix), measured)  # type: ignore[arg-type]
    assert max(plan.seconds) <= min(plan.seconds) * 1.2
    assert "durations of" in plan.source
    listed = [i for shard in plan.shards for i in shard]
    assert sorted(listed) == sorted(c.cell_id for c in cells)


def test_a_shared_reference_is_charged_once_per_shard() -> None:
    plan = partition([Job("big", 10.0), Job("c0", 1.0, "ref", 5.0), Job("c1", 1.0, "ref", 5.0)], 2)
    assert plan.shards == (("big",), ("c0", "c1")) and plan.seconds == (10.0, 7.0)
    spread = partition([Job(f"c{i}", 1.0, "ref", 10.0) for i in range(4)], 2)
    assert spread.seconds == (12.0, 12.0)  # balance first: each shard runs the reference once


def test_lpt_places_the_costliest_first() -> None:
    plan = partition([Job("d", 2), Job("a", 5), Job("c", 3), Job("b", 4)], 2)
    assert plan.shards == (("d", "a"), ("c", "b")) and plan.seconds == (7.0, 7.0)


def test_durations_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(GGUFSandboxError, match="no such results file"):
        read_durations(tmp_path / "nothing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"kind": "cell", "cell_id": "a", "memory": 1, "duration_s": NaN}\n'
        '{"kind": "cell", "cell_id": "b", "memory": 1, "duration_s": -4}\n'
        '{"kind": "cell", "cell_id": "c", "memory": 1, "duration_s": true}\n'
        "not json\n"
    )
    with pytest.raises(GGUFSandboxError, match="no cell record in it has a duration"):
        read_durations(bad)
    with bad.open("a") as handle:
        handle.write('{"kind": "reference", "cell_id": "r", "duration_s": 2.5}\n')
    assert read_durations(bad) == {"r": 2.5}


def _durations_file(path: Path, seconds: list[object]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"kind": "cell", "cell_id": f"c{i}", "memory": 1, "duration_s": s}) + "\n"
            for i, s in enumerate(seconds)
        )
    )
    return path


@pytest.mark.parametrize(
    "seconds",
    [1e308, MAX_SECONDS * 2, 10**400, -1e-9, "12"],
    ids=["1e308", "over-max", "int-no-float-holds", "negative", "text"],
)
def test_durations_no_run_took_are_a_one_line_error(tmp_path: Path, seconds: object) -> None:
    path = _durations_file(tmp_path / "hostile.jsonl", [seconds] * 3)
    with pytest.raises(GGUFSandboxError) as caught:
        read_durations(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message
    assert "no cell record in it has a duration; 3 durations not from 0 to 1,000,000,000 s" in message
    assert "(the first on line 1: " in message


def test_a_duration_no_run_took_is_left_out_in_one_line(tmp_path: Path) -> None:
    path = _durations_file(tmp_path / "some.jsonl", [3.0, 1e308, MAX_SECONDS, float("inf")])
    warnings: list[str] = []
    assert read_durations(path, warnings.append) == {"c0": 3.0, "c2": MAX_SECONDS}
    assert warnings == [
        f"--durations {path}: 2 durations not from 0 to 1,000,000,000 s (the first on line 2: 1e+308) left "
        "out; those cells are estimated"
    ]


def test_the_longest_durations_still_balance_and_sum_finite(default: tuple[Matrix, list[Cell]]) -> None:
    matrix, cells = default
    measured = {cell.cell_id: MAX_SECONDS for cell in cells[::2]}
    plan = plan_shards(matrix, cells, 3, reference_id(matrix), measured)  # type: ignore[arg-type]
    assert all(seconds < float("inf") for seconds in plan.seconds)
    assert max(plan.seconds) <= min(plan.seconds) * 1.2


def test_run_list_shard_with_hostile_durations_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _durations_file(tmp_path / "hostile.jsonl", [1e308] * 3)
    argv = ["run", "--list", "--shard", "1/3", "--durations", str(path), str(REPO / "matrix.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not from 0 to 1,000,000,000 s" in err and "Traceback" not in err
