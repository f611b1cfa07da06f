"""Tests for the `mcp` workload: its pure parts, and end to end — the client on the host, the server in a
real cgroup cell (and a docker cell when an engine and an image with the SDK are there)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.matrix.verdicts import Verdict, decide, parse_report
from gguf_sandbox.mcp.cell import run_cell, workload_options
from gguf_sandbox.mcp.client import (
    DEFAULT_BATCH,
    VECTOR_TOL,
    Check,
    ClientRun,
    McpOptions,
    ToolError,
    check_vectors,
    conclude,
    describe,
    plan_phases,
    refusal_from,
    server_argv,
    tool_payload,
)
from gguf_sandbox.mcp.server import serve_floor
from gguf_sandbox.mcp.session import PROTOCOL_VERSIONS
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellSpec, RunResult
from gguf_sandbox.sandbox.sampling import SampleWatcher

MiB = 1 << 20
MATRIX_ARGV = (
    "-m",
    "gguf_sandbox",
    "workload",
    "mcp",
    "--model",
    MODEL_PLACEHOLDER,
    "--count",
    "1000",
    "--threads",
    "8",
    "--batch",
    "16",
)


# -- pure parts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("count", "threads", "batch"),
    [
        pytest.param(1000, 8, 16, id="matrix-1000"),
        pytest.param(60, 8, 4, id="test-60"),
        pytest.param(3, 2, 2, id="tiny-3"),
        pytest.param(1, 8, 16, id="one-call"),
    ],
)
def test_phases_send_exactly_count_calls_of_each_kind(count: int, threads: int, batch: int) -> None:
    phases = {phase.name: phase for phase in plan_phases(McpOptions(count, threads, batch), pool=50)}
    assert sum(len(phase.calls) for phase in phases.values()) == count
    assert all(len(call) == 1 for call in phases["single"].calls)
    assert all(len(call) == batch for call in phases["batch"].calls)
    assert all(len(call) == 1 for call in phases["concurrent"].calls)
    assert phases["concurrent"].streams == threads and phases["single"].streams == 1
    assert all(0 <= i < 50 for phase in phases.values() for call in phase.calls for i in call)
    if count >= 3:
        assert all(phase.calls for phase in phases.values()), "every kind of call is exercised"


def test_the_matrix_argv_gives_model_and_options() -> None:
    model, options = workload_options(MATRIX_ARGV)
    assert model is None  # the placeholder: the cell's model is spec.model
    assert options == McpOptions(count=1000, threads=8, batch=16, plan="auto")
    _, defaults = workload_options(("-m", "gguf_sandbox", "workload", "mcp", "--model", "m.gguf"))
    assert defaults.count == 1000 and defaults.batch == DEFAULT_BATCH


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("-m", "gguf_sandbox", "workload", "embed", "--model", "m"), id="other-workload"),
        pytest.param(("-c", "print(1)"), id="not-a-workload"),
        pytest.param(("-m", "gguf_sandbox", "workload", "mcp"), id="no-model"),
    ],
)
def test_other_argvs_are_not_mcp_cells(argv: tuple[str, ...]) -> None:
    with pytest.raises(SandboxError):
        workload_options(argv)


def test_the_cell_runs_the_server_on_the_cells_model() -> None:
    assert server_argv("streaming") == (
        "-m",
        "gguf_sandbox",
        "serve",
        "--model",
        MODEL_PLACEHOLDER,
        "--plan",
        "streaming",
    )


@dataclass
class _Block:
    text: str


@dataclass
class _ResultV1:
    content: list[_Block]
    structuredContent: dict[str, Any] | None  # noqa: N815 - the SDK's 1.x spelling
    isError: bool  # noqa: N815


@dataclass
class _ResultV2:
    content: list[_Block]
    structured_content: dict[str, Any] | None
    is_error: bool


@pytest.mark.parametrize("result_type", [_ResultV1, _ResultV2], ids=["sdk-1.x", "sdk-2.x"])
def test_tool_payload_reads_both_sdk_spellings(result_type: Any) -> None:
    ok = result_type([_Block('{"a": 1}')], {"a": 1}, False)
    assert tool_payload(ok) == ({"a": 1}, None)
    text_only = result_type([_Block('{"b": 2}')], None, False)
    assert tool_payload(text_only) == ({"b": 2}, None)
    message = "embed: refused by the memory budget: …"
    refused = result_type([_Block(message)], {"error": message, "kind": "BudgetExceeded"}, True)
    assert tool_payload(refused) == (None, ToolError("BudgetExceeded", message))
    unstructured = result_type([_Block("embed: texts is empty")], None, True)
    assert tool_payload(unstructured) == (None, ToolError("unknown", "embed: texts is empty"))


def test_refusal_is_the_last_json_error_line_of_stderr() -> None:
    stderr = (
        'noise\n{"error": "old", "kind": "X"}\ngguf-sandbox serve: refused: …\n{"error": "e", "kind": "K"}\n'
    )
    assert refusal_from(stderr) == {"error": "e", "kind": "K"}
    assert refusal_from('{"not": "an error"}\nTraceback …') is None


class _Group(Exception):
    """Shaped like an (anyio/PEP 654) exception group, which Python 3.10 lacks."""

    def __init__(self, *exceptions: BaseException) -> None:
        super().__init__("unhandled errors in a TaskGroup")
        self.exceptions = exceptions


def test_exception_groups_are_described_by_their_first_leaf() -> None:
    group = _Group(_Group(OSError("Connection closed")), ValueError("second"))
    assert describe(group) == "OSError: Connection closed"
    assert describe(ValueError("plain")) == "ValueError: plain"


def _run(calls: int = 2) -> ClientRun:
    run = ClientRun(info={"plan": "streaming"})
    for index in range(calls):
        run.indices.append((index,))
        run.vectors.append(np.full((1, 4), 0.5, dtype=np.float32))
    return run


def test_check_counts_every_vector_off_by_more_than_the_tolerance() -> None:
    run = _run(3)
    expected = {i: np.full(4, 0.5, dtype=np.float32) for i in range(3)}
    assert check_vectors(run, expected) == Check(3, 0, 0.0)
    expected[1] = expected[1] + 10 * VECTOR_TOL
    check = check_vectors(run, expected)
    assert (
        check.vectors == 3
        and check.mismatches == 1
        and check.max_abs_diff == pytest.approx(10 * VECTOR_TOL, rel=1e-4)
    )


@pytest.mark.parametrize(
    ("run", "server_exit", "stderr", "report", "expected"),
    [
        pytest.param(
            ClientRun(failure="MCPError: Connection closed"),
            3,
            '{"error": "needs 74 MiB", "kind": "BudgetExceeded"}\n',
            None,
            3,
            id="refused-at-start",
        ),
        pytest.param(
            ClientRun(failure="MCPError: Connection closed"), 137, "", None, 137, id="server-killed"
        ),
        pytest.param(_run(), 0, "", {"mismatches": 2, "max_abs_diff": 0.3}, 1, id="vectors-differ"),
        pytest.param(_run(), 0, "", {"mismatches": 0}, 0, id="all-good"),
        pytest.param(_run(), 1, "", {"mismatches": 0}, 1, id="server-failed-on-exit"),
        pytest.param(
            ClientRun(info={}, tool_errors=[ToolError("BudgetExceeded", "embed: refused: …")]),
            0,
            "",
            {"mismatches": 0},
            3,
            id="every-call-refused",
        ),
        pytest.param(
            ClientRun(info={}, tool_errors=[ToolError("GGUFError", "embed: the memory budget of NaN …")]),
            0,
            "",
            {"mismatches": 0},
            1,
            id="failed-calls-whose-text-mentions-the-budget",
        ),
        pytest.param(ClientRun(info={}, failure="TimeoutError: "), None, "", None, 1, id="session-failed"),
    ],
)
def test_conclusion_exit_codes(
    run: ClientRun, server_exit: int | None, stderr: str, report: dict[str, Any] | None, expected: int
) -> None:
    verdict = conclude(run, server_exit, stderr, report)
    assert verdict.exit_code == expected, verdict
    if expected == 3:
        assert json.loads(verdict.stdout)["kind"] == "BudgetExceeded"
    if expected == 0:
        assert json.loads(verdict.stdout) == report and not verdict.notes


class _RunOnly:
    name = "run-only"

    def unavailable_reason(self, python: str) -> str | None:
        return None

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        raise AssertionError("a host-side cell must not be run inside")


def test_a_backend_without_attach_is_refused(tmp_path: Path) -> None:
    spec = CellSpec("c", "run-only", "3.11", 96 * MiB, MATRIX_ARGV, model=tmp_path / "m.gguf")
    with pytest.raises(SandboxError, match="cannot attach"):
        run_cell(_RunOnly(), spec)


# -- attach: a cell whose process the caller starts ---------------------------------------------------------
_ECHO = (
    "import sys; line = sys.stdin.readline(); print('got ' + line.strip(), flush=True); "
    "print('to stderr', file=sys.stderr); sys.exit(int(sys.argv[1]))"
)


def _talk(cell: Any, data: bytes) -> tuple[int, bytes]:
    """Start the cell's command as an MCP client would (own session, stderr to the cell's file)."""
    process = subprocess.Popen(
        list(cell.command.argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=cell.stderr,
        env=None if cell.command.env is None else dict(cell.command.env),
        start_new_session=True,
    )
    out, _ = process.communicate(data, timeout=120)
    return process.returncode, out


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@pytest.mark.parametrize("code", [0, 5], ids=["exit-0", "exit-5"])
def test_attached_cgroup_cell_passes_stdio_and_reports_exit_code_and_peak(code: int) -> None:
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    with attach_limited([sys.executable, "-c", _ECHO, str(code)], 64 * MiB, 60) as cell:
        returned, out = _talk(cell, b"hello\n")
        result = cell.finish()
    assert out == b"got hello\n" and returned == code
    assert result.exit_code == code and result.stdout == "" and "to stderr" in result.stderr
    assert result.peak_bytes is not None and 0 < result.peak_bytes < 64 * MiB
    assert result.oom_kill_count == 0 and not result.timed_out and result.limit_bytes == 64 * MiB


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_attached_cgroup_cell_over_its_limit_is_oom_killed() -> None:
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    hog = "import sys; sys.stdin.readline(); data = b'x' * (200 << 20)"
    with attach_limited([sys.executable, "-c", hog], 64 * MiB, 60) as cell:
        _talk(cell, b"go\n")
        result = cell.finish()
    assert result.exit_code == 137 and result.oom_kill_count >= 1 and result.oom_killed_flag
    assert result.peak_bytes is not None and result.peak_bytes >= 60 * MiB


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_attached_cgroup_cell_is_killed_at_its_timeout_and_removed() -> None:
    from gguf_sandbox.cgroupfs import own_memory_cgroup
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited
    from gguf_sandbox.sandbox.cgroup.control import CHILD_PREFIX

    parent = own_memory_cgroup()
    assert parent is not None

    def children() -> set[str]:
        # Only this process's: other suites or matrix runs may make cells under the same parent meanwhile.
        mine = f"{CHILD_PREFIX}{os.getpid()}-"
        return {entry.name for entry in parent.directory.iterdir() if entry.name.startswith(mine)}

    before = children()
    with attach_limited([sys.executable, "-c", "import time; time.sleep(60)"], 64 * MiB, 1.0) as cell:
        _talk(cell, b"")
        result = cell.finish()
    assert result.timed_out and result.exit_code == 137 and result.duration_s < 30
    assert children() == before, "the cell's cgroup is removed"


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_attached_cell_never_started_has_no_exit_code() -> None:
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    with attach_limited([sys.executable, "-c", "pass"], 64 * MiB, 60) as cell:
        result = cell.finish(grace=0.1)
    assert result.exit_code is None and not result.timed_out


@pytest.mark.docker
def test_attached_docker_cell_is_hardened_and_passes_stdio() -> None:
    pytest.importorskip("docker")
    from gguf_sandbox.sandbox.docker.backend import DockerSandbox

    sandbox = DockerSandbox()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    reason = sandbox.unavailable_reason(python)
    if reason is not None:
        pytest.skip(reason)
    spec = CellSpec("attach-test", "docker", python, 64 * MiB, ("-c", _ECHO, "5"), timeout=120)
    with sandbox.attach(spec) as cell:
        assert cell.command.argv[1:4] == ("start", "--attach", "--interactive")
        container_id = cell.command.argv[-1]
        inspected = json.loads(
            subprocess.run(["docker", "inspect", container_id], capture_output=True, check=True).stdout
        )[0]
        assert inspected["Config"]["OpenStdin"] and inspected["Config"]["StdinOnce"]
        assert (
            inspected["HostConfig"]["Memory"] == 64 * MiB and inspected["HostConfig"]["NetworkMode"] == "none"
        )
        returned, out = _talk(cell, b"hello\n")
        result = cell.finish()
    assert out == b"got hello\n" and returned == 5
    assert result.exit_code == 5 and result.stderr == "to stderr\n", "the wrapper's report lines are stripped"
    assert result.peak_bytes is not None and 0 < result.peak_bytes < 64 * MiB
    gone = subprocess.run(["docker", "inspect", container_id], capture_output=True, check=False)
    assert gone.returncode != 0, "the container is removed"


# -- end to end ------------------------------------------------------------------------------------------
needs_sdk = pytest.mark.skipif(
    importlib.util.find_spec("mcp") is None,
    reason="the MCP SDK is not installed: pip install 'gguf-sandbox[mcp]'",
)
SERVED_AT = 64 * MiB  # the matrix's smallest cell
BELOW_FLOOR = serve_floor() - 4 * MiB
CELL_COUNT = "60"  # calls per end-to-end cell here; the matrix sends 1000


@pytest.fixture(scope="module")
def model(minilm_gguf: Callable[[str], Path]) -> Path:
    """all-MiniLM-L6-v2 as Q8_0 GGUF (converted once per session, shared with the engine tests)."""
    return minilm_gguf("q8_0")


def _spec(backend: str, memory: int, model: Path) -> CellSpec:
    argv = list(MATRIX_ARGV)
    argv[argv.index("--count") + 1] = CELL_COUNT
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return CellSpec(
        f"{backend}-py{python}-{memory // MiB}m-mcp-minilm_q8_0",
        backend,
        python,
        memory,
        tuple(argv),
        timeout=600,
        model=model,
    )


def test_the_floor_lets_the_smallest_cell_serve() -> None:
    assert BELOW_FLOOR < serve_floor() <= SERVED_AT


def _assert_passes(result: RunResult, memory: int) -> dict[str, Any]:
    report = parse_report(result.stdout)
    outcome = decide(result, report)
    assert outcome.verdict in (Verdict.PASS, Verdict.DEGRADED), outcome.failure_message()
    assert report is not None
    assert report["workload"] == "mcp" and report["calls"] == int(CELL_COUNT)
    assert report["calls_by_phase"]["batch"] >= 1 and report["calls_by_phase"]["concurrent"] >= 8
    assert report["mismatches"] == 0 and report["errors"] == 0
    assert report["plan"] in ("resident-f32", "resident-quant", "streaming")
    assert report["cgroup_limit"] == memory and 0 < report["cgroup_peak"] <= memory
    assert report["server"]["protocol_versions"] == list(PROTOCOL_VERSIONS)
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    return report


def _figures(report: dict[str, Any]) -> str:
    return (
        f"plan {report['plan']}, peak {report['cgroup_peak'] / MiB:.1f} MiB, "
        f"model_info during the run {report['model_info_ms']}"
    )


def _assert_refused(result: RunResult, memory: int) -> None:
    outcome = decide(result, parse_report(result.stdout))
    assert outcome.verdict is Verdict.REFUSED, outcome.failure_message()
    error = json.loads(result.stdout)
    assert error["kind"] == "BudgetExceeded" and error["floor"] == serve_floor()
    assert error["limit"] == memory
    assert result.peak_bytes is not None and result.peak_bytes < 40 * MiB, "numpy was never imported"


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("cgroup", marks=pytest.mark.cgroup),
        pytest.param("docker", marks=pytest.mark.docker),
    ],
)
def cell_sandbox(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each backend that can run a cell here (the server in the cell needs no MCP SDK)."""
    if request.param == "docker":
        pytest.importorskip("docker")
    from gguf_sandbox.matrix.runner import make_sandbox

    sandbox = make_sandbox(request.param)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    reason = sandbox.unavailable_reason(python)
    if reason is not None:
        pytest.skip(reason)
    yield sandbox


@needs_sdk
@pytest.mark.slow
def test_cell_at_the_smallest_limit_serves(cell_sandbox: Any, model: Path) -> None:
    backend = cell_sandbox.name
    report = _assert_passes(run_cell(cell_sandbox, _spec(backend, SERVED_AT, model)), SERVED_AT)
    print(f"{backend} {SERVED_AT // MiB}m: {_figures(report)}")


@needs_sdk
def test_cell_below_the_floor_is_refused(cell_sandbox: Any, model: Path) -> None:
    backend = cell_sandbox.name
    _assert_refused(run_cell(cell_sandbox, _spec(backend, BELOW_FLOOR, model)), BELOW_FLOOR)


@needs_sdk
def test_local_workload_prints_the_report(model: Path) -> None:
    """`gguf-sandbox workload mcp`: client and server on this machine, no cell."""
    done = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "workload", "mcp", "--model", str(model), "--count", "20"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["workload"] == "mcp" and report["calls"] == 20 and report["mismatches"] == 0
    texts = sum(len(call) for phase in plan_phases(McpOptions(count=20)) for call in phase.calls)
    assert report["count"] == texts and report["batch"] == DEFAULT_BATCH
