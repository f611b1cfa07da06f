"""The `mcp` workload: a real MCP client on the host drives `gguf-sandbox serve` running inside a cell.

The client (the SDK's ClientSession over stdio) stays outside the memory limit, as an MCP host does; the
server runs in the cell, started through the backend's attach(). The client sends `count` embed calls in
three phases — single texts, batches, and `threads` concurrent streams — while a poller measures how fast
model_info answers, then checks every returned vector against the engine called directly and prints the
workload report (the keys of workloads.report.Report, with the cell's memory readings).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.matrix.verdicts import parse_report
from gguf_sandbox.mcp.server import MAX_TEXTS
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellCommand
from gguf_sandbox.workloads.corpus import corpus
from gguf_sandbox.workloads.report import Report, finish_vectors, percentile

# The SDK line this client is written and tested against (the `mcp` extra pins it); 2.x also works. The
# server in the cell needs no SDK.
SDK_REQUIREMENT = "mcp>=1.21.1,<2"
# The structured `kind` of a tool error the server's budget refused (mcp_server.error_reply).
REFUSED_KIND = "BudgetExceeded"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 3
DEFAULT_BATCH = 16  # texts per call in the batch phase when --batch is left at 1
# Distinct texts the calls cycle through: every vector is checked, each text is embedded directly once.
TEXT_POOL = 500
# Shares of the calls: single texts, batches, concurrent streams (the rest).
SINGLE_SHARE = 0.45
BATCH_SHARE = 0.05
# A cell may run another weight plan than the direct engine: components then differ by ~1e-6.
VECTOR_TOL = 1e-4
MODEL_INFO_INTERVAL_S = 0.05
STARTUP_TIMEOUT_S = 120.0
FINISH_GRACE_S = 10.0


# -- what to send --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class McpOptions:
    """The workload's knobs (the workload options of matrix.yaml)."""

    count: int = 1000
    threads: int = 8
    batch: int = DEFAULT_BATCH
    plan: str = "auto"

    @classmethod
    def from_namespace(cls, options: argparse.Namespace) -> McpOptions:
        batch = options.batch if options.batch > 1 else DEFAULT_BATCH
        return cls(options.count, options.threads, min(batch, MAX_TEXTS), options.plan)


@dataclass(frozen=True)
class Phase:
    """Calls sent one after another (streams=1) or spread round-robin over `streams` concurrent tasks."""

    name: str
    calls: tuple[tuple[int, ...], ...]  # indices into the text pool, one tuple per embed call
    streams: int = 1


def plan_phases(options: McpOptions, pool: int = TEXT_POOL) -> tuple[Phase, ...]:
    """The `count` embed calls: single texts, then batches of `batch`, then `threads` concurrent streams."""
    singles = int(options.count * SINGLE_SHARE)
    batches = max(int(options.count * BATCH_SHARE), 1 if options.count >= 3 else 0)
    concurrent = options.count - singles - batches
    cursor = 0

    def take(size: int) -> tuple[int, ...]:
        nonlocal cursor
        indices = tuple((cursor + i) % pool for i in range(size))
        cursor += size
        return indices

    return (
        Phase("single", tuple(take(1) for _ in range(singles))),
        Phase("batch", tuple(take(options.batch) for _ in range(batches))),
        Phase("concurrent", tuple(take(1) for _ in range(concurrent)), streams=options.threads),
    )


# -- one client session ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolError:
    """A call answered with isError: the structured content's `kind` (its error class) and the message."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class ClientRun:
    """What one session saw: per call the pool indices, the vectors or the error, and the latency."""

    info: dict[str, Any] | None = None
    final_info: dict[str, Any] | None = None
    indices: list[tuple[int, ...]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    phase_latencies_s: dict[str, list[float]] = field(default_factory=dict)
    model_info_latencies_s: list[float] = field(default_factory=list)
    tool_errors: list[ToolError] = field(default_factory=list)
    failure: str | None = None
    seconds: float = 0.0

    @property
    def calls(self) -> int:
        return len(self.vectors)


def _attribute(result: Any, *names: str) -> Any:
    """A CallToolResult field under its 1.x (camelCase) or 2.x (snake_case) attribute name."""
    for name in names:
        if hasattr(result, name):
            return getattr(result, name)
    return None


def tool_payload(result: Any) -> tuple[dict[str, Any] | None, ToolError | None]:
    """(structured content, None) of a successful call, (None, ToolError) of a tool error: its kind is
    the structured content's `kind`, "unknown" when a server sends none."""
    content = _attribute(result, "content") or []
    text = " ".join(str(getattr(block, "text", "")) for block in content)
    structured = _attribute(result, "structuredContent", "structured_content")
    if _attribute(result, "isError", "is_error"):
        kind = structured.get("kind") if isinstance(structured, dict) else None
        return None, ToolError(kind if isinstance(kind, str) else "unknown", text or "no message")
    if isinstance(structured, dict):
        return structured, None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None, ToolError("BadResult", f"no structured content and no JSON text: {text[:200]!r}")
    if isinstance(parsed, dict):
        return parsed, None
    return None, ToolError("BadResult", f"unexpected content {text[:200]!r}")


async def drive(
    command: CellCommand, stderr: IO[str], options: McpOptions, pool: Sequence[str], timeout: float
) -> ClientRun:
    """Start the server with `command`, run every phase, and return what was seen (never raises for
    the server's failures: they end the session and are recorded in `failure`)."""
    import anyio

    # Typed Any: the calls below are the same in both SDK majors, their type stubs are not.
    sdk: Any = importlib.import_module("mcp")
    run = ClientRun()
    params = sdk.StdioServerParameters(
        command=command.argv[0],
        args=list(command.argv[1:]),
        env=None if command.env is None else dict(command.env),
    )
    try:
        with anyio.fail_after(timeout):
            async with (
                sdk.stdio_client(params, errlog=stderr) as (read, write),
                sdk.ClientSession(read, write) as session,
            ):
                with anyio.fail_after(STARTUP_TIMEOUT_S):
                    await session.initialize()
                    listed = {tool.name for tool in (await session.list_tools()).tools}
                missing = {"embed", "model_info"} - listed
                if missing:
                    run.failure = f"the server does not offer {', '.join(sorted(missing))} (tools: {listed})"
                    return run
                run.info = await _model_info(session)
                await _phases(session, run, options, pool)
                run.final_info = await _model_info(session)
    except Exception as error:  # the server died, refused or hung: the cell's readings tell which
        run.failure = run.failure or describe(error)
    return run


def describe(error: BaseException) -> str:
    """`Type: message` of the first leaf of a (nested) exception group, else of the error itself."""
    nested = getattr(error, "exceptions", None)
    while isinstance(nested, (list, tuple)) and nested and isinstance(nested[0], BaseException):
        error = nested[0]
        nested = getattr(error, "exceptions", None)
    return f"{type(error).__name__}: {error}".strip()


async def _model_info(session: Any) -> dict[str, Any]:
    payload, error = tool_payload(await session.call_tool("model_info", {}))
    if payload is None:
        raise SandboxError(f"model_info failed: {error}")
    return payload


async def _phases(session: Any, run: ClientRun, options: McpOptions, pool: Sequence[str]) -> None:
    import anyio

    done = anyio.Event()

    async def poll_model_info() -> None:
        while not done.is_set():
            began = time.perf_counter()
            await _model_info(session)
            run.model_info_latencies_s.append(time.perf_counter() - began)
            with anyio.move_on_after(MODEL_INFO_INTERVAL_S):
                await done.wait()

    async def one(phase: str, indices: tuple[int, ...]) -> None:
        began = time.perf_counter()
        result = await session.call_tool("embed", {"texts": [pool[i] for i in indices]})
        latency = time.perf_counter() - began
        payload, error = tool_payload(result)
        if payload is None:
            run.tool_errors.append(error or ToolError("BadResult", "no payload"))
            return
        vectors = np.asarray(payload.get("vectors"), dtype=np.float32)  # [k, dim]
        if vectors.ndim != 2 or vectors.shape[0] != len(indices):
            run.tool_errors.append(
                ToolError("BadResult", f"embed returned shape {vectors.shape} for {len(indices)} texts")
            )
            return
        run.indices.append(indices)
        run.vectors.append(vectors)
        run.latencies_s.append(latency)
        run.phase_latencies_s.setdefault(phase, []).append(latency)

    async def stream(phase: Phase, first: int) -> None:
        for indices in phase.calls[first :: phase.streams]:
            await one(phase.name, indices)

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        group.start_soon(poll_model_info)
        try:
            for phase in plan_phases(options, len(pool)):
                async with anyio.create_task_group() as streams:
                    for first in range(phase.streams):
                        streams.start_soon(stream, phase, first)
        finally:
            done.set()
    run.seconds = time.perf_counter() - start


# -- checking and reporting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """Every returned vector against the engine's own vector for the same text."""

    vectors: int
    mismatches: int
    max_abs_diff: float


def check_vectors(run: ClientRun, expected: Mapping[int, np.ndarray]) -> Check:
    """Compare each call's vectors with `expected` (pool index → the direct engine's vector)."""
    mismatches, worst, total = 0, 0.0, 0
    for indices, vectors in zip(run.indices, run.vectors, strict=True):
        total += len(indices)
        reference = np.stack([expected[i] for i in indices])  # [k, dim]
        if vectors.shape != reference.shape:
            mismatches += len(indices)
            worst = float("inf")
            continue
        diff = np.abs(vectors - reference).max(axis=1)  # [k]
        mismatches += int((diff > VECTOR_TOL).sum())
        worst = max(worst, float(diff.max()))
    return Check(total, mismatches, worst)


def direct_vectors(
    model: Path, pool: Sequence[str], run: ClientRun, plan: str = "auto"
) -> dict[int, np.ndarray]:
    """The engine called in this process, unconstrained, on every pool text the run used: the vectors
    every served one must match."""
    from gguf_sandbox.embed.engine import Embedder

    used = sorted({i for indices in run.indices for i in indices})
    if not used:
        return {}
    with Embedder.open(model, plan=plan) as embedder:
        vectors = embedder.embed([pool[i] for i in used])  # [len(used), dim]
    return dict(zip(used, vectors, strict=True))


def text_pool(count: int = TEXT_POOL) -> list[str]:
    return corpus(count)


def _percentile_ms(values: Sequence[float], percent: int) -> float | None:
    return percentile(sorted(1e3 * v for v in values), percent)


def build_report(
    run: ClientRun, check: Check, options: McpOptions, model: Path, readings: Mapping[str, Any]
) -> Report:
    """The workload report: Report's keys, the server's plan and the cell's memory readings."""
    info = run.final_info or run.info or {}
    memory = info.get("memory") or {}
    report = Report("mcp", model.name, unit_name="embeddings")
    report.plan = info.get("plan")
    report.preferred_plan = info.get("preferred_plan")
    report.count = check.vectors
    report.errors = len(run.tool_errors)
    report.latencies_s = list(run.latencies_s)
    report.seconds = run.seconds
    sums = np.asarray([v.astype(np.float64).sum(axis=0) for v in run.vectors])
    finish_vectors(report, sums, check.vectors)
    server = info.get("server") or {}
    report.extra = {
        **({"python": server["python"]} if "python" in server else {}),
        **({"versions": server["versions"]} if "versions" in server else {}),
        "calls": run.calls,
        "calls_by_phase": {name: len(values) for name, values in run.phase_latencies_s.items()},
        "latency_ms_by_phase": {
            name: {"p50": _percentile_ms(values, 50), "p95": _percentile_ms(values, 95)}
            for name, values in run.phase_latencies_s.items()
        },
        "model_info_ms": {
            "count": len(run.model_info_latencies_s),
            "p50": _percentile_ms(run.model_info_latencies_s, 50),
            "p95": _percentile_ms(run.model_info_latencies_s, 95),
        },
        "streams": options.threads,
        "batch": options.batch,
        "dimension": info.get("dimension"),
        "mismatches": check.mismatches,
        "max_abs_diff": check.max_abs_diff,
        "tool_errors": [str(error) for error in run.tool_errors[:5]],
        "server": info.get("server"),
        # The server's readings, not this client's: the client runs outside the limit (and may run
        # another Python with other packages: floors record what the cell ran).
        "peak_rss": memory.get("peak_rss_bytes"),
        "cgroup_limit": readings.get("cgroup_limit", memory.get("limit_bytes")),
        "cgroup_peak": readings.get("cgroup_peak", memory.get("peak_bytes")),
        "limit_source": readings.get("limit_source", memory.get("limit_source")),
    }
    return report


def refusal_from(stderr: str) -> dict[str, Any] | None:
    """The server's JSON error ({"error", "kind"}) from its stderr, the last one when several."""
    return parse_report(stderr, required=("error", "kind"))


@dataclass(frozen=True)
class Verdict:
    """The workload's own conclusion: exit code, the stdout line, and notes for stderr."""

    exit_code: int
    stdout: str
    notes: tuple[str, ...] = ()


def conclude(
    run: ClientRun,
    server_exit: int | None,
    server_stderr: str,
    report: Mapping[str, Any] | None,
) -> Verdict:
    """Exit 3 + the JSON error when the server refused (at start, or every call by its budget); the
    server's exit code when it died (137 …); 1 when calls failed or vectors differ; else 0 + the report."""
    refusal = refusal_from(server_stderr)
    if run.info is None and (server_exit == EXIT_REFUSED or refusal is not None):
        error = refusal or {"error": "the server exited 3 without a JSON error", "kind": "unknown"}
        return Verdict(EXIT_REFUSED, json.dumps(error), (f"server refused: {error.get('error')}",))
    died = server_exit not in (None, EXIT_OK, EXIT_REFUSED)
    failed = server_exit if died and server_exit is not None else EXIT_FAILED
    if run.failure is not None:
        return Verdict(failed, "", (f"client: the session ended early: {run.failure}",))
    if run.tool_errors and run.calls == 0 and all(e.kind == REFUSED_KIND for e in run.tool_errors):
        error = {"error": run.tool_errors[0].message, "kind": REFUSED_KIND}
        return Verdict(EXIT_REFUSED, json.dumps(error), ("every embed call was refused by the budget",))
    notes = []
    if run.tool_errors:
        notes.append(f"{len(run.tool_errors)} embed calls failed, first: {run.tool_errors[0]}")
    if report is not None and report.get("mismatches"):
        notes.append(
            f"{report['mismatches']} vectors differ from the engine's by more than {VECTOR_TOL} "
            f"(max {report.get('max_abs_diff')})"
        )
    if server_exit != EXIT_OK:
        notes.append(f"the server exited {server_exit} after the session closed (expected 0)")
    line = json.dumps(report) if report is not None else ""
    return Verdict(failed if notes else EXIT_OK, line, tuple(notes))


# -- what the cell runs ----------------------------------------------------------------------------------


def server_argv(plan: str) -> tuple[str, ...]:
    """What runs inside the cell, after `python`."""
    return ("-m", "gguf_sandbox", "serve", "--model", MODEL_PLACEHOLDER, "--plan", plan)
