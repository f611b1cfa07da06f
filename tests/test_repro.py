"""`gguf-sandbox repro`: one cell from a command or a matrix workload, printed like a matrix failure."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gguf_sandbox import repro
from gguf_sandbox.errors import MatrixError
from gguf_sandbox.sandbox.base import CellSpec, RunResult, Verdict

MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (["python", "-c", "pass"], ("-c", "pass")),
        (["python3.12", "-m", "x"], ("-m", "x")),
        (["/usr/bin/python3", "x.py"], ("x.py",)),
        (["sh", "-c", "true"], ("-c", repro._EXEC, "sh", "-c", "true")),
    ],
    ids=["python", "python3.12", "path-to-python3", "other-command"],
)
def test_command_argv(command: list[str], argv: tuple[str, ...]) -> None:
    assert repro.command_argv(command) == argv


class Recorder:
    name = "cgroup"

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.specs: list[CellSpec] = []

    def unavailable_reason(self, python: str) -> str | None:
        return None

    def run(self, spec: CellSpec) -> RunResult:
        self.specs.append(spec)
        values: dict[str, Any] = {
            "exit_code": 0,
            "timed_out": False,
            "oom_killed_flag": False,
            "oom_kill_count": 0,
            "peak_bytes": 20 * MIB,
            "limit_bytes": spec.memory,
            "duration_s": 0.2,
            "stdout": json.dumps({"workload": "x", "plan": "streaming"}) + "\n",
            "stderr": "",
        }
        return RunResult(**{**values, **self.result})


def args_for(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    repro.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder({})
    monkeypatch.setattr(repro, "make_sandbox", lambda name: recorder)
    return recorder


def test_command_cell_reports_oom_and_the_repro_line(
    sandbox: Recorder, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sandbox.result = {"exit_code": -9, "oom_kill_count": 1, "peak_bytes": 64 * MIB, "stdout": ""}
    head = ["--python", "3.11", "--memory", "64m", "--backend", "cgroup", "--matrix", str(tmp_path / "none")]
    code = repro.run(args_for(*head, "--", "python", "-c", "bytearray(200<<20)"))
    assert code == 1
    spec = sandbox.specs[0]
    assert (spec.cell_id, spec.memory, spec.argv) == (
        "cgroup-py3.11-64m-command",
        64 * MIB,
        ("-c", "bytearray(200<<20)"),
    )
    out = capsys.readouterr().out
    assert "oom 64/64M — outside expect" in out
    assert "oom_kill counter=1" in out
    assert "reproduce: gguf-sandbox repro --python 3.11 --memory 64m --backend cgroup -- python -c" in out


def test_workload_cell_uses_the_matrix_entry_and_its_expect(
    sandbox: Recorder, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    doc = {
        "pythons": ["3.12"],
        "memory": ["64m"],
        "models": {"mine": {"path": "m.gguf"}},
        "workloads": {
            "bomb": {"control": "alloc-bomb", "args": {"step": "4m"}},
            "parse": {"models": ["mine"]},
        },
        "expect": {"rules": [{"match": {"workload": "bomb"}, "expect": ["oom"]}]},
    }
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump(doc))
    sandbox.result = {"exit_code": 137, "oom_killed_flag": True, "peak_bytes": 96 * MIB, "stdout": ""}
    assert (
        repro.run(
            args_for("--python", "3.12", "--memory", "96m", "--matrix", str(matrix), "--workload", "bomb")
        )
        == 0
    )
    assert sandbox.specs[-1].argv == ("-m", "gguf_sandbox.controls", "alloc-bomb", "--step", "4m")
    assert sandbox.specs[-1].expect == {Verdict.OOM}
    assert "as expected" in capsys.readouterr().out

    sandbox.result = {}
    args = args_for("--python", "3.12", "--memory", "96m", "--matrix", str(matrix), "--workload", "parse")
    args.model = "mine"
    assert repro.run(args) == 0
    assert sandbox.specs[-1].model == model
    assert sandbox.specs[-1].cell_id == "cgroup-py3.12-96m-parse-mine"


def test_builtin_workload_on_a_model_path_without_a_matrix(sandbox: Recorder, tmp_path: Path) -> None:
    model = tmp_path / "My Model.gguf"
    model.write_bytes(b"GGUF")
    args = args_for("--python", "3.12", "--memory", "128m", "--matrix", str(tmp_path / "matrix.yaml"))
    args.workload, args.model = "stream", str(model)
    assert repro.run(args) == 0
    spec = sandbox.specs[-1]
    assert spec.cell_id == "cgroup-py3.12-128m-stream-my_model"
    assert spec.argv[:5] == ("-m", "gguf_sandbox", "workload", "stream", "--model")
    assert spec.model == model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give either --workload"),
        (["--workload", "parse", "--", "python", "-c", "1"], "not both"),
        (["--workload", "nope"], "--workload nope: unknown"),
        (["--workload", "parse"], "--model: workload parse needs a model"),
        (["--workload", "alloc-bomb", "--model", "x"], "takes no model"),
        (["--workload", "parse", "--model", "/no/such.gguf"], "neither a model of the matrix"),
    ],
    ids=["neither", "both", "unknown-workload", "model-missing", "model-forbidden", "model-not-found"],
)
def test_usage_errors(sandbox: Recorder, tmp_path: Path, extra: list[str], message: str) -> None:
    args = args_for("--python", "3.12", "--memory", "64m", "--matrix", str(tmp_path / "matrix.yaml"), *extra)
    with pytest.raises(MatrixError, match=message):
        repro.run(args)


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_the_readme_repro_command_reports_oom(tmp_path: Path) -> None:
    cell = ["--python", "3.11", "--memory", "64m", "--backend", "cgroup"]
    done = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "repro", *cell, "--", "python", "-c", "bytearray(200<<20)"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "oom 64/64M" in done.stdout
