"""The cgroup v2 fallback without delegation: a transient systemd scope holds the cell."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gguf_sandbox.cgroupfs import (
    CGROUP_MOUNT,
    OOM_KILL_KEY,
    PROCS_FILE,
    V2,
    read_int,
    read_key,
    working_set_of,
)
from gguf_sandbox.sandbox.cgroup.child import SHELL
from gguf_sandbox.sandbox.cgroup.control import kill_until_empty, unique_name
from gguf_sandbox.sandbox.isolation import CellCgroup, Tools

# Inside a systemd scope the cell's cgroup disappears with its last process, so a small shell stays as
# the cell's parent and saves memory.peak and memory.events to the report file before exiting. It uses
# builtins only: an unjailed cell's sweeper spares this shell but kills every other process of the scope,
# a `cat` of the report too.
_RUN_AND_REPORT = (
    'report=$1; shift; "$@"; rc=$?; cg=; '
    "while IFS= read -r line; do case $line in 0::*) cg=${line#0::};; esac; done < /proc/self/cgroup; "
    """copy() { while IFS= read -r line; do printf '%s\\n' "$line"; done < "$1"; }; """
    f'{{ printf "peak "; copy "/{CGROUP_MOUNT}$cg/{V2.peak}"; copy "/{CGROUP_MOUNT}$cg/{V2.events}"; }} '
    '> "$report" 2>/dev/null; exit $rc'
)

SCOPE_ATTACH_TIMEOUT = 10.0
# What `systemd-run --user` finds the user's manager by. A jailed cell's environment is an allow-list
# without them (systemd-run then fails: "Failed to connect to bus: No medium found"), so the scope command
# sets them for systemd-run alone and the scope's shell drops them before the cell starts.
USER_MANAGER_VARIABLES = ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")


def user_manager_env(environ: Mapping[str, str], uid: int) -> dict[str, str]:
    """The variables `systemd-run --user` needs, from the runner's environment; XDG_RUNTIME_DIR defaults
    to /run/user/UID (pam_systemd's), so a runner started without a login session (sudo -u, runuser,
    cron) still reaches a lingering user manager."""
    env = {name: environ[name] for name in USER_MANAGER_VARIABLES if environ.get(name)}
    env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{uid}")
    return env


def systemd_scope_command(
    unit: str,
    limit: int,
    report: Path,
    argv: Sequence[str],
    *,
    user: bool,
    pids_limit: int | None = None,
    manager_env: Mapping[str, str] | None = None,
    setpriv: str | None = None,
) -> list[str]:
    """systemd-run argv placing `argv` in a transient scope with MemoryMax=`limit` and swap off.

    `manager_env` (see user_manager_env) is set for systemd-run through env(1) and unset again by the
    scope's shell, whatever environment the command is started with. With `setpriv` the scope's shell
    dies with the runner (systemd-run execs it, so the runner is its parent): the cell's own guard,
    whose parent is that shell, then ends the cell.
    """
    tasks = ["-p", f"TasksMax={pids_limit}"] if pids_limit is not None else []
    prefix: list[str] = []
    shell = _RUN_AND_REPORT
    if manager_env:
        prefix = ["env", *(f"{name}={value}" for name, value in manager_env.items())]
        shell = f"unset {' '.join(manager_env)}; {_RUN_AND_REPORT}"
    return [
        *prefix,
        "systemd-run",
        *(["--user"] if user else []),
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        "-p",
        f"MemoryMax={limit}",
        "-p",
        "MemorySwapMax=0",
        *tasks,
        # Keep the reporting shell alive after an OOM kill instead of stopping the whole scope.
        "-p",
        "OOMPolicy=continue",
        "--",
        *([setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []),
        SHELL,
        "-c",
        shell,
        "sh",
        str(report),
        *argv,
    ]


def parse_scope_report(text: str) -> tuple[int | None, int]:
    """(peak, oom_kill count) from the report the scope's shell wrote."""
    peak: int | None = None
    oom_kills = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "peak":
                peak = int(parts[1])
            elif parts[0] == OOM_KILL_KEY:
                oom_kills = int(parts[1])
    return peak, oom_kills


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (children first seen, then the rest as they show up)."""
    import psutil

    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()


class SystemdScope:
    """cgroup v2 without delegation: `systemd-run --scope` creates and removes the limited cgroup."""

    def __init__(self, root: Path, limit: int, report: Path, pids_limit: int | None = None) -> None:
        self.root = root
        self.limit = limit
        self.report = report
        self.pids_limit = pids_limit
        self.unit = unique_name()
        self.user = os.geteuid() != 0
        self.path: Path | None = None
        self.pid: int | None = None
        self.notes: list[str] = []
        self.pids_missing: str | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        return systemd_scope_command(
            self.unit,
            self.limit,
            self.report,
            argv,
            user=self.user,
            pids_limit=self.pids_limit,
            manager_env=user_manager_env(os.environ, os.getuid()) if self.user else None,
            setpriv=Tools.find().setpriv,
        )

    def attach(self, pid: int) -> None:
        """Find the scope's cgroup once systemd-run has moved itself there (it then execs the cell)."""
        self.pid = pid
        stop = time.monotonic() + SCOPE_ATTACH_TIMEOUT
        while time.monotonic() < stop:
            try:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                break
            for line in lines:
                if line.startswith("0::") and line.endswith(f"/{self.unit}.scope"):
                    self.path = self.root / CGROUP_MOUNT / line[3:].lstrip("/")
                    return
            time.sleep(0.005)
        self.notes.append(f"scope {self.unit}.scope not seen in /proc/{pid}/cgroup: no samples")

    def cell_cgroup(self) -> CellCgroup:
        """systemd names the scope's cgroup once the cell runs: the sweeper finds it by the unit."""
        return CellCgroup(scope_unit=self.unit)

    def _file(self, name: str) -> Path | None:
        return None if self.path is None else self.path / name

    def usage(self) -> int | None:
        path = self._file(V2.usage)
        return None if path is None else read_int(path)

    def working_set(self) -> int | None:
        return None if self.path is None else working_set_of(self.path, V2)

    def _report(self) -> tuple[int | None, int] | None:
        try:
            return parse_scope_report(self.report.read_text())
        except OSError:
            return None

    def peak(self) -> int | None:
        report = self._report()
        if report is not None and report[0] is not None:
            return report[0]
        path = self._file(V2.peak)
        return None if path is None else read_int(path)

    def oom_kills(self) -> int:
        report = self._report()
        if report is not None:
            return report[1]
        path = self._file(V2.events)
        return 0 if path is None else read_key(path, OOM_KILL_KEY) or 0

    def kill_all(self, deadline: float = 5.0) -> None:
        """Kill the scope's processes: through its cgroup when found, else the unit and the process tree."""
        procs = self._file(PROCS_FILE)
        if procs is not None:
            kill_until_empty(procs, deadline)
            return
        systemctl = shutil.which("systemctl")
        if systemctl is not None:
            command = [systemctl, *(["--user"] if self.user else []), "kill", "--signal=SIGKILL"]
            env = {**os.environ, **user_manager_env(os.environ, os.getuid())} if self.user else None
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*command, f"{self.unit}.scope"],
                    capture_output=True,
                    timeout=deadline,
                    check=False,
                    env=env,
                )
        if self.pid is not None:
            _kill_tree(self.pid)

    def remove(self, deadline: float = 5.0) -> None:
        """systemd removes the scope once its last process is gone (--collect also when it failed)."""


def systemd_run() -> str | None:
    """The systemd-run program (the cgroup v2 fallback when we may not create cgroups), if installed."""
    return shutil.which("systemd-run")
