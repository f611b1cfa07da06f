"""`gguf-sandbox repro`: one cell from a command or a matrix workload, printed like a matrix failure."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix import repro
from gguf_sandbox.sandbox.base import CellSpec, Mount, RunResult
from gguf_sandbox.sandbox.sampling import SampleWatcher

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


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

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
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
    out = capsys.readouterr().out
    assert "as expected" in out and "(expected oom)" in out  # the cell's expect is exactly {oom}

    sandbox.result = {}
    args = args_for("--python", "3.12", "--memory", "96m", "--matrix", str(matrix), "--workload", "parse")
    args.model = "mine"
    assert repro.run(args) == 0
    assert sandbox.specs[-1].model == model
    assert sandbox.specs[-1].cell_id == "cgroup-py3.12-96m-parse-mine"


def test_a_workload_entry_of_one_model_needs_no_model_argument(sandbox: Recorder, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    doc = {
        "pythons": ["3.12"],
        "memory": ["64m"],
        "models": {"a": {"path": "a.gguf"}, "b": {"path": "b.gguf"}},
        "workloads": {
            "parse-a": {"workload": "parse", "models": ["a"]},
            "parse-ab": {"workload": "parse", "models": ["a", "b"]},
        },
    }
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump(doc))
    sandbox.result = {}
    args = args_for("--python", "3.12", "--memory", "96m", "--matrix", str(matrix), "--workload", "parse-a")
    assert repro.run(args) == 0
    assert sandbox.specs[-1].model == tmp_path / "a.gguf"
    assert sandbox.specs[-1].cell_id == "cgroup-py3.12-96m-parse-a-a"
    args = args_for("--python", "3.12", "--memory", "96m", "--matrix", str(matrix), "--workload", "parse-ab")
    with pytest.raises(MatrixError, match=r"needs a model \(one of a, b, or a path\)"):
        repro.run(args)


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
        (["--memory", "1k", "--", "python", "-c", "1"], "--memory: size '1k' is out of range: give 4m"),
        (["--timeout", "nan", "--", "python", "-c", "1"], "--timeout: expected seconds"),
    ],
    ids=[
        "neither",
        "both",
        "unknown-workload",
        "model-missing",
        "model-forbidden",
        "model-not-found",
        "memory-1k",
        "timeout-nan",
    ],
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


# --------------------------------------------------------------------------- a command names its own files


BROKEN_PACKAGE_MATRIX = """\
version: 1
pythons: ["3.12"]
memory: [64m]
models:
  minilm_q8_0: {convert: {package: no-such-checkpoint-pkg, type: q8_0}}
workloads:
  embed: {args: {count: 7}, models: [minilm_q8_0]}
"""


def test_an_explicit_gguf_path_never_needs_the_matrix_models(sandbox: Recorder, tmp_path: Path) -> None:
    # The file's stem is the matrix's model name: the matrix's (uninstalled) package used to be converted.
    model = tmp_path / "minilm_q8_0.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "matrix.yaml").write_text(BROKEN_PACKAGE_MATRIX)
    head = ["--python", "3.12", "--memory", "64m", "--matrix", str(tmp_path / "matrix.yaml")]
    assert repro.run(args_for(*head, "--workload", "embed", "--model", str(model))) == 0
    spec = sandbox.specs[-1]
    assert spec.model == model
    assert spec.cell_id == "cgroup-py3.12-64m-embed-minilm_q8_0"
    assert spec.argv[-2:] == ("--count", "7")  # the matrix's entry still applies


def test_a_command_with_a_model_path_does_not_read_the_matrix(sandbox: Recorder, tmp_path: Path) -> None:
    model = tmp_path / "Mine.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "matrix.yaml").write_text("not: [a, valid, matrix\n")
    command = ["python", "-c", "print(open('{model}', 'rb').read(4))"]
    head = ["--python", "3.12", "--memory", "64m", "--matrix", str(tmp_path / "matrix.yaml")]
    args = args_for(*head, "--model", str(model), "--", *command)
    assert repro.run(args) == 0
    spec = sandbox.specs[-1]
    assert (spec.cell_id, spec.model, spec.argv) == (
        "cgroup-py3.12-64m-command-mine",
        model,
        tuple(command[1:]),
    )


def test_a_command_with_a_matrix_model_name_prepares_it(
    sandbox: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gguf_sandbox.matrix import models

    prepared = tmp_path / "cache" / "minilm.gguf"
    monkeypatch.setattr(models, "prepare", lambda definition, cache=None: prepared)
    (tmp_path / "matrix.yaml").write_text(BROKEN_PACKAGE_MATRIX)
    head = ["--python", "3.12", "--memory", "64m", "--matrix", str(tmp_path / "matrix.yaml")]
    assert repro.run(args_for(*head, "--model", "minilm_q8_0", "--", "python", "-c", "1")) == 0
    assert sandbox.specs[-1].model == prepared


def test_mounts_default_to_the_host_path_and_appear_in_the_repro_line(
    sandbox: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    script = tmp_path / "probe.py"
    script.write_text("print('hi')\n")
    head = ["--python", "3.12", "--memory", "64m", "--backend", "cgroup", "--matrix", str(tmp_path / "m")]
    args = args_for(*head, "--mount", str(data), "--mount", str(script), "--", "python", str(script))
    sandbox.result = {"exit_code": 1, "stdout": ""}  # fails, so the repro line is printed
    repro.run(args)
    assert sandbox.specs[-1].mounts == (Mount(data, str(data)), Mount(script, str(script)))
    out = capsys.readouterr().out
    assert f"--mount {data} --mount {script} -- python {script}" in out


def test_docker_mounts_may_name_their_place_in_the_cell(sandbox: Recorder, tmp_path: Path) -> None:
    sandbox.name = "docker"
    head = ["--python", "3.12", "--memory", "64m", "--backend", "docker", "--matrix", str(tmp_path / "m")]
    assert repro.run(args_for(*head, "--mount", f"{tmp_path}:/data/in", "--", "python", "/data/in/x.py")) == 0
    assert sandbox.specs[-1].mounts == (Mount(tmp_path, "/data/in"),)


@pytest.mark.parametrize(
    ("backend", "mount", "message"),
    [
        ("cgroup", "{tmp}/absent", "absent: no such file or directory"),
        ("cgroup", "{tmp}:/data", "the cgroup backend runs on the host's filesystem"),
        ("docker", "{tmp}:data", "DST must be an absolute path"),
        ("docker", "{tmp}:/tmp", "/tmp would hide part of the cell"),
        ("docker", "{tmp}:/usr/lib/x", "/usr/lib/x would hide part of the cell"),
        ("docker", "{tmp}:/models", "/models would hide part of the cell"),
        ("docker", "{tmp}:/", "/ would hide part of the cell"),
    ],
    ids=["missing-source", "cgroup-elsewhere", "relative", "tmp", "system", "models", "root"],
)
def test_bad_mounts_are_refused(
    sandbox: Recorder, tmp_path: Path, backend: str, mount: str, message: str
) -> None:
    sandbox.name = backend
    head = ["--python", "3.12", "--memory", "64m", "--backend", backend, "--matrix", str(tmp_path / "m")]
    args = args_for(*head, "--mount", mount.format(tmp=tmp_path), "--", "python", "-c", "1")
    with pytest.raises(MatrixError, match=re.escape(message)):
        repro.run(args)
    assert sandbox.specs == []


def test_the_same_path_cannot_be_mounted_twice(sandbox: Recorder, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    head = ["--python", "3.12", "--memory", "64m", "--matrix", str(tmp_path / "m")]
    args = args_for(*head, "--model", str(model), "--mount", str(model), "--", "python", "-c", "1")
    with pytest.raises(MatrixError, match="given twice"):
        repro.run(args)


def test_docker_binds_the_model_and_every_mount_read_only(tmp_path: Path) -> None:
    from gguf_sandbox.sandbox.docker.backend import _volumes, container_argv

    model = tmp_path / "m.gguf"
    spec = CellSpec(
        cell_id="c",
        backend="docker",
        python="3.12",
        memory=64 * MIB,
        argv=("-c", "open('{model}')"),
        model=model,
        mounts=(Mount(tmp_path, "/data"),),
    )
    assert _volumes(spec) == {
        str(tmp_path): {"bind": "/data", "mode": "ro"},
        str(model): {"bind": "/models/m.gguf", "mode": "ro"},
    }
    assert container_argv(spec) == ["python", "-c", "open('/models/m.gguf')"]


PROBE = """\
import json, sys
from pathlib import Path
model, data = Path(sys.argv[1]), Path(sys.argv[2])
seen = f"model {model} {model.read_bytes()[:4].decode()} data {(data / 'note.txt').read_text().strip()}"
print(json.dumps({"workload": "probe", "seen": seen}))
"""


def _files_for_a_command(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF and more")
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("hello from the host\n")
    (data / "probe.py").write_text(PROBE)
    for path in (tmp_path, data, data / "note.txt", data / "probe.py", model):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the docker cell's user reads them
    return model, data, data / "probe.py"


def _repro(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "repro", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_a_command_reads_its_model_and_mounts_on_cgroup(tmp_path: Path) -> None:
    model, data, probe = _files_for_a_command(tmp_path)
    cell = ["--python", "3.11", "--memory", "64m", "--backend", "cgroup", "--model", str(model)]
    done = _repro(tmp_path, *cell, "--mount", str(data), "--", "python", str(probe), "{model}", str(data))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"model {model} GGUF data hello from the host" in done.stdout


@pytest.mark.docker
def test_a_command_reads_its_model_and_mounts_on_docker(tmp_path: Path) -> None:
    from gguf_sandbox.sandbox.docker.backend import DockerSandbox

    reason = DockerSandbox().unavailable_reason("3.12")
    if reason is not None:
        pytest.skip(reason)
    model, data, _ = _files_for_a_command(tmp_path)
    cell = ["--python", "3.12", "--memory", "64m", "--backend", "docker", "--model", str(model)]
    command = ["python", "/data/probe.py", "{model}", "/data"]
    done = _repro(tmp_path, *cell, "--mount", f"{data}:/data", "--", *command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model /models/tiny.gguf GGUF data hello from the host" in done.stdout
