"""The hostile-model corpus (tests/gguf/hostile.py) through inspect, embed and workload embed in 64 MB.

Each entry must end in a clean one-line error with its documented exit code: no traceback, no OOM kill,
no hang (a timeout ends the run).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.sandbox.cgroup.process import run_limited
from tests.gguf.hostile import CORPUS, EXIT_OK, EXIT_REFUSED

MiB = 1 << 20
CELL = 64 * MiB
TIMEOUT_S = 180
ENV = {"OPENBLAS_NUM_THREADS": "1"}
COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "inspect": lambda model: ["inspect", str(model)],
    "embed": lambda model: ["embed", "--model", str(model), "a short text", "and another one"],
    "workload-embed": lambda model: ["workload", "embed", "--model", str(model), "--count", "20"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("hostile")
    made: dict[str, Path] = {}

    def make(entry_id: str) -> Path:
        if entry_id not in made:
            made[entry_id] = CORPUS[entry_id].make(folder)
        return made[entry_id]

    return make


@pytest.mark.parametrize("entry_id", list(CORPUS))
def test_the_engine_refuses_each_entry_with_a_typed_error(
    corpus: Callable[[str], Path], entry_id: str
) -> None:
    entry = CORPUS[entry_id]
    expected = BudgetExceeded if entry.exits[1] == EXIT_REFUSED else GGUFError
    # 32 MiB of room: what a 64 MB cell leaves beside the interpreter.
    with (
        pytest.raises(expected, match=entry.message),
        Embedder.open(corpus(entry_id), budget=MemoryBudget(32 * MiB)) as embedder,
    ):
        embedder.embed(["a short text", "and another one"])


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("entry_id", list(CORPUS))
def test_each_entry_is_a_clean_error_in_a_64mb_cell(
    corpus: Callable[[str], Path], entry_id: str, command: str
) -> None:
    entry = CORPUS[entry_id]
    expected = entry.exits[list(COMMANDS).index(command)]
    argv = [sys.executable, "-m", "gguf_sandbox", *COMMANDS[command](corpus(entry_id))]
    result = run_limited(argv, CELL, TIMEOUT_S, env=ENV)
    assert not result.timed_out, f"{entry_id}: still running after {TIMEOUT_S} s"
    assert result.oom_kill_count == 0 and not result.oom_killed_flag, f"{entry_id}: OOM-killed"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.exit_code == expected, (result.exit_code, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    if expected == EXIT_OK:
        assert errors == []
        return
    assert len(errors) == 1, f"not one line: {errors}"
    if command != "inspect" or entry.exits[0] != EXIT_OK:
        assert re.search(entry.message, errors[0]), errors[0]
    if command == "workload-embed":
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["kind"] == ("BudgetExceeded" if expected == EXIT_REFUSED else "GGUFError")
