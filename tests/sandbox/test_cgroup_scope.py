"""Tests for the parts of the cgroup backend that need no writable cgroup: argv building and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER
from gguf_sandbox.sandbox.cgroup import parse_scope_report, substitute_model, systemd_scope_command

V2_EVENTS = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n"


def test_substitute_model(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    argv = ("-m", "w", f"--model={MODEL_PLACEHOLDER}", MODEL_PLACEHOLDER)
    assert substitute_model(argv, model) == ("-m", "w", f"--model={model}", str(model))
    assert substitute_model(("-c", "pass"), None) == ("-c", "pass")
    with pytest.raises(SandboxError, match="has no model"):
        substitute_model(argv, None)


@pytest.mark.parametrize("user", [True, False], ids=["user-manager", "system-manager"])
def test_systemd_scope_command_sets_limit_and_swap_off(user: bool, tmp_path: Path) -> None:
    command = systemd_scope_command(
        "gguf-sandbox-1-ab", 64 << 20, tmp_path / "r", ["python3", "-V"], user=user
    )
    options = command[: command.index("--")]
    assert options[0] == "systemd-run" and ("--user" in options) is user
    assert {"--scope", "--collect", "--unit=gguf-sandbox-1-ab"} <= set(options)
    properties = {options[i + 1] for i, option in enumerate(options) if option == "-p"}
    assert properties == {f"MemoryMax={64 << 20}", "MemorySwapMax=0", "OOMPolicy=continue"}
    assert command[-2:] == ["python3", "-V"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [("pass", 0), ("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 9)", 137)],
    ids=["ok", "exit-3", "sigkill"],
)
def test_scope_shell_keeps_exit_status_and_writes_report(code: str, expected: int, tmp_path: Path) -> None:
    report = tmp_path / "report"
    command = systemd_scope_command("u", 1, report, [sys.executable, "-c", code], user=True)
    inside = command[command.index("--") + 1 :]
    assert subprocess.run(inside, check=False).returncode == expected
    assert report.read_text().startswith("peak")


def test_parse_scope_report() -> None:
    assert parse_scope_report(f"peak 67108864\n{V2_EVENTS}") == (67108864, 1)
    assert parse_scope_report("peak \n") == (None, 0)
    assert parse_scope_report("") == (None, 0)
