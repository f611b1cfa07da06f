"""The mcp workload in local mode: a real MCP client and `gguf-sandbox serve` as its plain child."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError
from gguf_sandbox.mcp.client import (
    EXIT_OK,
    EXIT_REFUSED,
    FINISH_GRACE_S,
    McpOptions,
    build_report,
    check_vectors,
    conclude,
    direct_vectors,
    drive,
    server_argv,
    text_pool,
)
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, AttachedCell, CellCommand, RunResult
from gguf_sandbox.workloads.report import Report


class _LocalServer:
    """The server as an ordinary child of the client (no limit): an AttachedCell without a cell."""

    def __init__(self, argv: Sequence[str], stderr: IO[str], status: Path) -> None:
        wrapper = 'status=$1; shift; "$@"; rc=$?; echo "$rc" > "$status"; exit "$rc"'
        self.command = CellCommand(("/bin/sh", "-c", wrapper, "sh", str(status), *argv))
        self.stderr = stderr
        self._status = status

    def finish(self, grace: float = 5.0) -> RunResult:
        stop = time.monotonic() + grace
        while not self._status.exists() and time.monotonic() < stop:
            time.sleep(0.02)
        try:
            exit_code: int | None = int(self._status.read_text().strip())
        except (OSError, ValueError):
            exit_code = None
        self.stderr.seek(0)
        return RunResult(exit_code, False, False, 0, None, 0, 0.0, "", self.stderr.read())


@contextlib.contextmanager
def local_server(argv: Sequence[str]) -> Iterator[AttachedCell]:
    with (
        tempfile.TemporaryDirectory(prefix="gguf-sandbox-mcp-") as scratch,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr,
    ):
        yield _LocalServer(argv, stderr, Path(scratch) / "status")


def local_workload(model: Path, options: argparse.Namespace) -> Report:
    """The mcp workload: `count` embed calls from a real MCP client to `gguf-sandbox serve` started as a
    plain child of this process (no limit). In matrix cells the client runs on the host and the server in
    the cell instead (mcp/cell.py).

    Raises BudgetExceeded when the server refused; GGUFSandboxError when the session failed or vectors
    differ (the cell mode, run_cell, reports the same through exit codes).
    """
    import anyio

    mcp_options = McpOptions.from_namespace(options)
    argv = [sys.executable, *server_argv(mcp_options.plan)]
    argv = [str(model.resolve()) if arg == MODEL_PLACEHOLDER else arg for arg in argv]
    pool = text_pool()
    with local_server(argv) as cell:
        run = anyio.run(drive, cell.command, cell.stderr, mcp_options, pool, 3600.0)
        result = cell.finish(FINISH_GRACE_S)
    report = None
    if run.info is not None:
        check = check_vectors(run, direct_vectors(model, pool, run))
        report = build_report(run, check, mcp_options, model, {})
    verdict = conclude(run, result.exit_code, result.stderr, None if report is None else report.as_json())
    if verdict.exit_code == EXIT_REFUSED:
        error = json.loads(verdict.stdout)
        raise BudgetExceeded(
            "gguf-sandbox serve",
            int(error.get("floor") or 0),
            int(error.get("limit") or 0),
            str(error.get("error", "")),
        )
    if verdict.exit_code != EXIT_OK or report is None:
        raise GGUFSandboxError("; ".join(verdict.notes) + f"\nserver stderr:\n{result.stderr[-2000:]}")
    return report
