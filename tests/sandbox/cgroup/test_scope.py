"""Tests for the parts of the cgroup backend that need no writable cgroup: argv building and reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, IsolationReport
from gguf_sandbox.sandbox.cgroup import placement
from gguf_sandbox.sandbox.cgroup import scope as scope_module
from gguf_sandbox.sandbox.cgroup.attach import LimitedCell
from gguf_sandbox.sandbox.cgroup.backend import substitute_model
from gguf_sandbox.sandbox.cgroup.child import SHELL
from gguf_sandbox.sandbox.cgroup.placement import cgroups_writable
from gguf_sandbox.sandbox.cgroup.process import Chain
from gguf_sandbox.sandbox.cgroup.scope import parse_scope_report, systemd_scope_command
from tests.sandbox.waiting import wait_for

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


def test_user_manager_env_comes_from_the_runner_or_defaults_to_the_runtime_dir() -> None:
    assert scope_module.user_manager_env({}, 1000) == {"XDG_RUNTIME_DIR": "/run/user/1000"}
    given = {"XDG_RUNTIME_DIR": "/run/user/7", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/b", "HOME": "/h"}
    assert scope_module.user_manager_env(given, 1000) == {
        "XDG_RUNTIME_DIR": "/run/user/7",
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/b",
    }


def test_user_scope_reaches_the_manager_from_a_jailed_environment(tmp_path: Path) -> None:
    """A jailed cell starts with an allow-listed environment (no XDG_RUNTIME_DIR): systemd-run --user must
    still get the variables that find the user's manager (found on cgroup v2: "Failed to connect to bus:
    No medium found"), and the cell must not inherit them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "systemd-run.env"
    fake = bin_dir / "systemd-run"
    # Records its environment, then runs what follows "--" as the real one does in scope mode.
    fake.write_text(f'#!/bin/sh\nenv > {seen}\nwhile [ "$1" != -- ]; do shift; done; shift; exec "$@"\n')
    fake.chmod(0o755)
    manager = scope_module.user_manager_env({"DBUS_SESSION_BUS_ADDRESS": "unix:path=/bus"}, 4242)
    cell_env = tmp_path / "cell.env"
    command = systemd_scope_command(
        "u", 64 << 20, tmp_path / "report", ["sh", "-c", f"env > {cell_env}"], user=True, manager_env=manager
    )
    jailed = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    assert subprocess.run(command, env=jailed, check=False).returncode == 0
    assert {"XDG_RUNTIME_DIR=/run/user/4242", "DBUS_SESSION_BUS_ADDRESS=unix:path=/bus"} <= set(
        seen.read_text().splitlines()
    )
    assert not any(
        line.startswith(("XDG_RUNTIME_DIR=", "DBUS_")) for line in cell_env.read_text().splitlines()
    )


def test_user_scope_placement_passes_the_manager_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/55")
    monkeypatch.setattr(os, "geteuid", lambda: 55)
    command = scope_module.SystemdScope(Path("/"), 64 << 20, tmp_path / "r").command(["true"])
    assert command[:2] == ["env", "XDG_RUNTIME_DIR=/run/user/55"]
    assert "--user" in command


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


def _fake_v2_host(root: Path) -> Path:
    """A cgroup v2 tree under `root` where we sit in /runner and memory is offered but not turned on."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/runner\n")
    mount = root / "sys/fs/cgroup"
    ours = mount / "runner"
    ours.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu memory pids\n")
    (ours / "cgroup.controllers").write_text("cpu memory pids\n")
    (ours / "cgroup.subtree_control").write_text("")
    (ours / "cgroup.procs").write_text("")
    return ours


def test_availability_probe_changes_nothing_in_our_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probing must not turn the memory controller on for our cgroup's children (it used to, for good)."""
    ours = _fake_v2_host(tmp_path)
    monkeypatch.setattr(placement, "systemd_run", lambda: None)  # no systemd-run fallback to try
    before = {path.name: path.read_text() for path in ours.iterdir() if path.is_file()}
    reason = cgroups_writable(tmp_path)
    assert {path.name: path.read_text() for path in ours.iterdir() if path.is_file()} == before
    assert [path.name for path in ours.iterdir() if path.is_dir()] == []
    # Memory is offered to us, the file is writable and we hold no process: cells can turn it on.
    assert reason is None


def test_availability_probe_says_why_when_memory_cannot_be_turned_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = _fake_v2_host(tmp_path)
    (ours / "cgroup.procs").write_text("4242\n")  # the no-internal-processes rule forbids it
    monkeypatch.setattr(placement, "systemd_run", lambda: None)
    reason = cgroups_writable(tmp_path)
    assert reason is not None and "memory" in reason
    assert (ours / "cgroup.subtree_control").read_text() == ""


class _ScopeWithoutSystemd(scope_module.SystemdScope):
    """A systemd scope whose cgroup never shows up (systemd-run stands aside: the cell runs directly)."""

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)


def test_attached_cell_in_an_unseen_scope_is_still_killed_at_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scope_module, "SCOPE_ATTACH_TIMEOUT", 0.2)
    scope = _ScopeWithoutSystemd(Path("/"), 64 << 20, tmp_path / "report")
    chain = Chain([sys.executable, "-c", "import time; time.sleep(120)"], IsolationReport(), ())
    with tempfile.TemporaryFile("w+") as stderr:
        cell = LimitedCell(
            scope,
            chain,
            scratch=tmp_path,
            stderr=stderr,
            memory_bytes=64 << 20,
            timeout=1.0,
            env=None,
            sample_interval=0.05,
            output_limit=1 << 20,
        )
        process = subprocess.Popen(cell.command.argv, stdin=subprocess.DEVNULL)
        try:
            assert process.wait(timeout=30) == 128 + signal.SIGKILL  # the status shell outlives the cell
            result = cell.finish()
        finally:
            if process.poll() is None:
                process.kill()
            cell.close()
    assert result.timed_out and result.exit_code == 128 + signal.SIGKILL
    assert any("not seen" in note for note in scope.notes)


def test_a_scope_cell_dies_with_its_runner(tmp_path: Path) -> None:
    """systemd-run execs the scope's shell, so the runner is its parent and the cell's guard is that
    shell's child: the shell must die with the runner for the guard to end the cell (it had lived on to its
    deadline). systemd-run is a stand-in here that runs what follows "--" as the real one does."""
    from gguf_sandbox.sandbox.isolation import guard_command

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemd-run"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != -- ]; do shift; done; shift; exec "$@"\n')
    fake.chmod(0o755)
    marker = f"{4000 + os.getpid() % 1000}.{time.time_ns() % 10**6:06d}"
    scope = scope_module.SystemdScope(Path("/"), 64 << 20, tmp_path / "report")
    command = scope.command(guard_command(["sleep", marker], deadline=120, cgroup=scope.cell_cgroup()))
    runner = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *command],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    try:
        wait_for(lambda: bool(_sleeping(marker)), 30, "the cell never started")
        runner.kill()
        runner.wait()
        wait_for(lambda: not _sleeping(marker), 30, "the cell outlived its runner")
    finally:
        for pid in _sleeping(marker):
            os.kill(pid, signal.SIGKILL)


def _sleeping(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["cmdline"] == ["sleep", marker] and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.pid)
    return found


def test_scope_shell_runs_no_program_after_the_cell(tmp_path: Path) -> None:
    """After the cell the scope's shell writes its report with builtins alone: an unjailed cell's sweeper
    kills every process of the scope but that shell (found on cgroup v2: it killed the shell's `cat` of
    memory.events, and an OOM kill went unreported)."""
    spy = tmp_path / "bin"
    spy.mkdir()
    ran = tmp_path / "ran"
    for name in ("cat", "head", "tr", "sed", "awk", "printf", "cp"):
        (spy / name).write_text(f"#!/bin/sh\necho {name} >> {ran}\n")
        (spy / name).chmod(0o755)
    command = systemd_scope_command("u", 1, tmp_path / "report", [sys.executable, "-c", "pass"], user=True)
    inside = command[command.index("--") + 1 :]
    shell = inside[inside.index(SHELL) :]
    done = subprocess.run(shell, env={"PATH": str(spy)}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not ran.exists(), ran.read_text()
    assert (tmp_path / "report").read_text().startswith("peak")
