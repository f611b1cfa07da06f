"""The host side of an mcp matrix cell: the server runs in the cell, this process is its MCP client."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.mcp.client import (
    FINISH_GRACE_S,
    SDK_REQUIREMENT,
    ClientRun,
    McpOptions,
    build_report,
    check_vectors,
    conclude,
    direct_vectors,
    drive,
    server_argv,
    text_pool,
)
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, AttachableSandbox, CellSpec, RunResult, Sandbox
from gguf_sandbox.sandbox.sampling import SampleWatcher
from gguf_sandbox.workloads import command as workload_command


def workload_options(argv: Sequence[str]) -> tuple[Path | None, McpOptions]:
    """The --model and options of a cell's `-m gguf_sandbox workload mcp …` argv."""
    words = list(argv)
    if "workload" not in words:
        raise SandboxError(f"not a workload argv: {shlex.join(words)}")
    parser = argparse.ArgumentParser(prog="gguf-sandbox workload", add_help=False)
    workload_command.add_arguments(parser)
    try:
        parsed = parser.parse_args(words[words.index("workload") + 1 :])
    except SystemExit:
        raise SandboxError(f"cannot parse the mcp workload's argv: {shlex.join(words)}") from None
    if parsed.name != "mcp":
        raise SandboxError(f"a host-side cell runs the mcp workload, not {parsed.name!r}")
    if parsed.count is None:
        parsed.count = McpOptions.count
    model = None if str(parsed.model) == MODEL_PLACEHOLDER else parsed.model
    return model, McpOptions.from_namespace(parsed)


def run_cell(sandbox: Sandbox, spec: CellSpec, watch: SampleWatcher | None = None) -> RunResult:
    """Run a host-side `mcp` cell: the server in the cell, this process as its MCP client.

    The runner calls this instead of sandbox.run(spec) for a host-side cell (Cell.host_side). The
    RunResult is the cell's (exit code, OOM signals, peak, timeline), with the client's report or the
    server's JSON error as stdout, so verdicts.decide applies unchanged. SandboxError when the harness
    cannot run it.
    """
    if not isinstance(sandbox, AttachableSandbox):
        raise SandboxError(
            f"cell {spec.cell_id}: the {sandbox.name} backend cannot attach a client to a cell "
            "(it has no attach()); hint: run the mcp workload on the cgroup or docker backend"
        )
    if spec.model is None:
        raise SandboxError(f"cell {spec.cell_id}: the mcp workload needs a model")
    if importlib.util.find_spec("mcp") is None:
        raise SandboxError(
            f"cell {spec.cell_id}: the mcp workload's client runs here and needs the MCP SDK; "
            f"hint: pip install 'gguf-sandbox[mcp]' ({SDK_REQUIREMENT})"
        )
    import anyio

    _, options = workload_options(spec.argv)
    inside = replace(spec, argv=server_argv(options.plan))
    pool = text_pool()
    with sandbox.attach(inside, watch=watch) as cell:
        run = anyio.run(drive, cell.command, cell.stderr, options, pool, spec.timeout)
        result = cell.finish(FINISH_GRACE_S)
    return _cell_result(run, result, options, spec.model, pool)


def _cell_result(
    run: ClientRun, result: RunResult, options: McpOptions, model: Path, pool: Sequence[str]
) -> RunResult:
    report = None
    if run.info is not None:
        check = check_vectors(run, direct_vectors(model, pool, run))
        readings = {"cgroup_limit": result.limit_bytes, "cgroup_peak": result.peak_bytes}
        report = build_report(run, check, options, model, readings).as_json()
    verdict = conclude(run, result.exit_code, result.stderr, report)
    notes = "".join(f"[gguf-sandbox mcp] {note}\n" for note in verdict.notes)
    return replace(
        result,
        exit_code=verdict.exit_code,
        stdout=verdict.stdout + "\n" if verdict.stdout else "",
        stderr=result.stderr + notes,
    )
