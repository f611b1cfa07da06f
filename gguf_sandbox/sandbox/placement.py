"""Where a cgroup cell runs: a fresh child cgroup (memory, pids) or a systemd scope; stale ones swept."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gguf_sandbox.budget import MemoryCgroup, own_memory_cgroup
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.reaper import CGROUP, GUARD
from gguf_sandbox.signals import deferred_signals

CHILD_PREFIX = "gguf-sandbox-"
SHELL = "/bin/sh"
PROBE_LIMIT = 64 << 20

# The child joins each cgroup itself (the procs files before "--"), then execs: it is inside before it
# allocates anything, and no Python code runs between fork and exec (preexec_fn is unsafe once the
# parent has threads).
_JOIN_AND_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'

_STALE_NAME = re.compile(rf"^{re.escape(CHILD_PREFIX)}(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class _Files:
    """The control files of one cgroup version, and the swap-off settings to write after the limit."""

    limit: str
    swap_limit: str
    swap_limit_value: str
    usage: str
    peak: str
    events: str
    kill: str | None


_FILES = {
    "cgroup1": _Files(
        limit="memory.limit_in_bytes",
        swap_limit="memory.memsw.limit_in_bytes",
        swap_limit_value="{limit}",
        usage="memory.usage_in_bytes",
        peak="memory.max_usage_in_bytes",
        events="memory.oom_control",
        kill=None,
    ),
    "cgroup2": _Files(
        limit="memory.max",
        swap_limit="memory.swap.max",
        swap_limit_value="0",
        usage="memory.current",
        peak="memory.peak",
        events="memory.events",
        kill="cgroup.kill",
    ),
}
PIDS_MAX = "pids.max"
V2_KILL = "cgroup.kill"


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_counter(path: Path, key: str) -> int:
    """`key N` from a flat keyed file (memory.oom_control, memory.events); 0 when absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def unique_name() -> str:
    return f"{CHILD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pids(procs_file: Path) -> list[int]:
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_until_empty(procs_file: Path, deadline: float) -> None:
    """SIGKILL every process listed in `procs_file` until it is empty (new forks included)."""
    stop = time.monotonic() + deadline
    while (pids := _pids(procs_file)) and time.monotonic() < stop:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def kill_cgroup(path: Path, deadline: float = 5.0) -> None:
    """SIGKILL everything in cgroup `path` (v2: cgroup.kill first) until it is empty."""
    if (path / V2_KILL).exists():
        with contextlib.suppress(OSError):
            (path / V2_KILL).write_text("1")
    _kill_until_empty(path / "cgroup.procs", deadline)


def remove_cgroup(path: Path, deadline: float = 5.0) -> None:
    """Kill what is in cgroup `path` and rmdir it, retrying while the kernel tears killed tasks down."""
    stop = time.monotonic() + deadline
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() >= stop:
                raise SandboxError(
                    f"cannot remove cgroup {path}: {error} (procs: {_pids(path / 'cgroup.procs')}); "
                    "hint: kill the listed processes and rmdir it"
                ) from error
        kill_cgroup(path, deadline=0.1)
        time.sleep(0.02)


def own_v1_cgroup(controller: str, root: Path = Path("/")) -> Path | None:
    """Our cgroup directory in the v1 hierarchy of `controller` (e.g. pids), None when not mounted."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            mount = root / "sys/fs/cgroup" / controller
            directory = mount / parts[2].strip("/")
            if directory.is_dir():
                return directory
            return mount if mount.is_dir() else None
    return None


class Placement(Protocol):
    """Where a cell runs: a cgroup we create ourselves, or a transient systemd scope."""

    notes: list[str]
    # None when the pids limit asked for is in place (or none was asked for), else why it is not.
    pids_missing: str | None

    def command(self, argv: Sequence[str]) -> list[str]:
        """The command to start so that `argv` runs inside the limited cgroup."""
        ...

    def attach(self, pid: int) -> None:
        """Called right after the start with the started pid."""
        ...

    def usage(self) -> int | None: ...

    def peak(self) -> int | None: ...

    def oom_kills(self) -> int: ...

    def kill_all(self, deadline: float = 5.0) -> None: ...

    def remove(self, deadline: float = 5.0) -> None: ...


def _controllers(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _subtree(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.subtree_control").read_text().split())
    except OSError:
        return set()


class _ChildCgroup:
    """A fresh memory cgroup under ours: created with the limit set, killed empty and removed at the end.

    With a pids limit it also caps the number of tasks: in the same cgroup on v2 (pids.max), in a
    sibling cgroup of the same name under our cgroup of the v1 pids hierarchy. `enable` lets it turn on
    a v2 controller in our cgroup.subtree_control when missing (a probe passes False: it changes nothing).
    `watched` hands it to the reaper, which removes it if this process dies first.
    """

    def __init__(
        self,
        parent: MemoryCgroup,
        limit: int,
        *,
        root: Path = Path("/"),
        pids_limit: int | None = None,
        enable: bool = True,
        watched: bool = True,
    ) -> None:
        self.files = _FILES[parent.source]
        self.parent = parent
        self.path = parent.directory / unique_name()
        self.notes: list[str] = []
        self.pids_missing: str | None = None
        self.extra: list[Path] = []  # cgroups in other v1 hierarchies, joined and removed with this one
        self._watched = watched
        self._made(self.path, f"cannot create cgroup {self.path}")
        try:
            self._configure(limit, enable)
            if pids_limit is not None:
                self._limit_pids(pids_limit, root, enable)
        except OSError as error:
            self.remove()
            raise SandboxError(f"cannot set the memory limit of cgroup {self.path}: {error}") from error
        except BaseException:
            self.remove()
            raise

    def _made(self, path: Path, what: str) -> None:
        try:
            path.mkdir()
        except OSError as error:
            raise SandboxError(f"{what}: {error}; hint: run as root or in a delegated cgroup") from error
        if self._watched:
            GUARD.watch(CGROUP, str(path))

    def _enable(self, controller: str, enable: bool) -> bool:
        """v2: whether `controller` is on for our children, turning it on when allowed (a real cell)."""
        if controller in _subtree(self.parent.directory):
            return True
        if not enable:
            return False
        # Fails (EBUSY) when our cgroup holds processes and is not the root: then systemd-run is needed.
        with contextlib.suppress(OSError):
            (self.parent.directory / "cgroup.subtree_control").write_text(f"+{controller}")
            self.notes.append(
                f"enabled {controller} in {self.parent.directory}/cgroup.subtree_control "
                "(left on: other cells may rely on it)"
            )
        return controller in _subtree(self.parent.directory)

    def _configure(self, limit: int, enable: bool) -> None:
        limit_file = self.path / self.files.limit
        if not limit_file.exists() and self.parent.source == "cgroup2":
            # Turning the controller on gives existing children its files at once.
            self._enable("memory", enable)
        if not limit_file.exists():
            raise SandboxError(
                f"cgroup {self.path} has no {self.files.limit}: the memory controller is not enabled for "
                "children of our cgroup; hint: enable it in cgroup.subtree_control or use systemd-run"
            )
        limit_file.write_text(str(limit))
        swap_file = self.path / self.files.swap_limit
        if swap_file.exists():
            swap_file.write_text(self.files.swap_limit_value.format(limit=limit))
        else:
            swappiness = self.path / "memory.swappiness"
            with contextlib.suppress(OSError):
                swappiness.write_text("0")
            self.notes.append(
                f"{self.files.swap_limit} absent (swap accounting off): set memory.swappiness=0 instead, "
                "swap may still hide an OOM"
            )
        # v2: on OOM kill the whole cell at once rather than one process of it.
        with contextlib.suppress(OSError):
            (self.path / "memory.oom.group").write_text("1")

    def _limit_pids(self, pids_limit: int, root: Path, enable: bool) -> None:
        if self.parent.source == "cgroup2":
            if not (self.path / PIDS_MAX).exists() and not self._enable("pids", enable):
                self.pids_missing = f"the pids controller is not enabled in {self.parent.directory}"
                return
            if not (self.path / PIDS_MAX).exists():
                self.pids_missing = f"{self.path} has no {PIDS_MAX}"
                return
            (self.path / PIDS_MAX).write_text(str(pids_limit))
            return
        pids_parent = own_v1_cgroup("pids", root)
        if pids_parent is None:
            self.pids_missing = "no cgroup v1 pids controller mounted at /sys/fs/cgroup/pids"
            return
        path = pids_parent / self.path.name
        try:
            self._made(path, f"cannot create pids cgroup {path}")
        except SandboxError as error:
            self.pids_missing = str(error)
            return
        self.extra.append(path)
        (path / PIDS_MAX).write_text(str(pids_limit))

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def command(self, argv: Sequence[str]) -> list[str]:
        procs = [str(self.procs_file), *(str(path / "cgroup.procs") for path in self.extra)]
        return [SHELL, "-c", _JOIN_AND_EXEC, "sh", *procs, "--", *argv]

    def attach(self, pid: int) -> None:
        """Nothing to do: the child joins the cgroup itself before exec."""

    def usage(self) -> int | None:
        return read_int(self.path / self.files.usage)

    def peak(self) -> int | None:
        return read_int(self.path / self.files.peak)

    def oom_kills(self) -> int:
        return _read_counter(self.path / self.files.events, "oom_kill")

    def pids(self) -> list[int]:
        return _pids(self.procs_file)

    def kill_all(self, deadline: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until it is empty (new forks included)."""
        for path in (self.path, *self.extra):
            kill_cgroup(path, deadline)

    def remove(self, deadline: float = 5.0) -> None:
        """rmdir every cgroup of the cell, retrying while the kernel finishes tearing down killed tasks."""
        for path in (self.path, *self.extra):
            remove_cgroup(path, deadline)
            if self._watched:
                GUARD.forget(CGROUP, str(path))


def remove_stale_cgroups(parent: MemoryCgroup, *others: Path) -> list[Path]:
    """Remove the child cgroups of gguf-sandbox processes that died (a SIGKILLed runner or pytest).

    Under our memory cgroup and each directory in `others` (e.g. our v1 pids cgroup): every entry named
    `gguf-sandbox-<pid>-<hex>` whose pid no longer runs — whatever it still holds is killed first.
    """
    removed: list[Path] = []
    for directory in (parent.directory, *others):
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = _STALE_NAME.match(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(SandboxError, OSError):
                remove_cgroup(entry, deadline=1.0)
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Inside a systemd scope the cell's cgroup disappears with its last process, so a small shell stays as
# the cell's parent and saves memory.peak and memory.events to the report file before exiting.
_RUN_AND_REPORT = (
    'report=$1; shift; "$@"; rc=$?; cg=; '
    "while IFS= read -r line; do case $line in 0::*) cg=${line#0::};; esac; done < /proc/self/cgroup; "
    '{ printf "peak "; cat "/sys/fs/cgroup$cg/memory.peak"; cat "/sys/fs/cgroup$cg/memory.events"; } '
    '> "$report" 2>/dev/null; exit $rc'
)
SCOPE_ATTACH_TIMEOUT = 10.0


def systemd_scope_command(
    unit: str,
    limit: int,
    report: Path,
    argv: Sequence[str],
    *,
    user: bool,
    pids_limit: int | None = None,
) -> list[str]:
    """systemd-run argv placing `argv` in a transient scope with MemoryMax=`limit` and swap off."""
    tasks = ["-p", f"TasksMax={pids_limit}"] if pids_limit is not None else []
    return [
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
        SHELL,
        "-c",
        _RUN_AND_REPORT,
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
            elif parts[0] == "oom_kill":
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


class _SystemdScope:
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
            self.unit, self.limit, self.report, argv, user=self.user, pids_limit=self.pids_limit
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
                    self.path = self.root / "sys/fs/cgroup" / line[3:].lstrip("/")
                    return
            time.sleep(0.005)
        self.notes.append(f"scope {self.unit}.scope not seen in /proc/{pid}/cgroup: no samples")

    def _file(self, name: str) -> Path | None:
        return None if self.path is None else self.path / name

    def usage(self) -> int | None:
        path = self._file("memory.current")
        return None if path is None else read_int(path)

    def _report(self) -> tuple[int | None, int] | None:
        try:
            return parse_scope_report(self.report.read_text())
        except OSError:
            return None

    def peak(self) -> int | None:
        report = self._report()
        if report is not None and report[0] is not None:
            return report[0]
        path = self._file("memory.peak")
        return None if path is None else read_int(path)

    def oom_kills(self) -> int:
        report = self._report()
        if report is not None:
            return report[1]
        path = self._file("memory.events")
        return 0 if path is None else _read_counter(path, "oom_kill")

    def kill_all(self, deadline: float = 5.0) -> None:
        """Kill the scope's processes: through its cgroup when found, else the unit and the process tree."""
        procs = self._file("cgroup.procs")
        if procs is not None:
            _kill_until_empty(procs, deadline)
            return
        systemctl = shutil.which("systemctl")
        if systemctl is not None:
            command = [systemctl, *(["--user"] if self.user else []), "kill", "--signal=SIGKILL"]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*command, f"{self.unit}.scope"], capture_output=True, timeout=deadline, check=False
                )
        if self.pid is not None:
            _kill_tree(self.pid)

    def remove(self, deadline: float = 5.0) -> None:
        """systemd removes the scope once its last process is gone (--collect also when it failed)."""


def systemd_run() -> str | None:
    """The systemd-run program (the cgroup v2 fallback when we may not create cgroups), if installed."""
    return shutil.which("systemd-run")


def direct_or_scope(root: Path, limit: int, report: Path, *, pids_limit: int | None = None) -> Placement:
    """A child cgroup of ours when we may create one, else (cgroup v2) a systemd scope."""
    parent = own_memory_cgroup(root)
    if parent is None:
        raise SandboxError("no memory cgroup controller under /sys/fs/cgroup; hint: use the docker backend")
    try:
        pids_parent = own_v1_cgroup("pids", root) if parent.source == "cgroup1" else None
        remove_stale_cgroups(parent, *([pids_parent] if pids_parent is not None else []))
        return _ChildCgroup(parent, limit, root=root, pids_limit=pids_limit)
    except SandboxError as error:
        if parent.source != "cgroup2" or systemd_run() is None:
            raise
        direct_error = error
    placement = _SystemdScope(root, limit, report, pids_limit)
    placement.notes.append(f"running in a systemd scope: {direct_error}")
    return placement


@contextlib.contextmanager
def cell_placement(
    root: Path, limit: int, report: Path, *, pids_limit: int | None = None
) -> Iterator[Placement]:
    """A fresh placement for one cell: everything in it killed and it removed on exit, whatever happens.

    Creation and removal run with SIGINT/SIGTERM deferred and the name is bound before any can fire, so
    an interrupt at any moment leaves either no cgroup or one this block removes.
    """
    placement: Placement | None = None
    try:
        with deferred_signals():
            placement = direct_or_scope(root, limit, report, pids_limit=pids_limit)
        yield placement
    finally:
        if placement is not None:
            with deferred_signals():
                placement.kill_all()
                placement.remove()


def cgroups_writable(root: Path = Path("/")) -> str | None:
    """None when run_limited can run a child under a memory limit here, else why not (a skip reason).

    Probes by creating and removing one child cgroup; it never changes our own cgroup's settings (a v2
    controller that cells would turn on in cgroup.subtree_control only has to be turnable on).
    """
    parent = own_memory_cgroup(root)
    if parent is None:
        return "no memory cgroup controller mounted under /sys/fs/cgroup"
    try:
        with deferred_signals():
            probe = _ChildCgroup(parent, PROBE_LIMIT, root=root, enable=False, watched=False)
    except (SandboxError, OSError) as error:
        if _could_enable_memory(parent):
            return None
        direct = f"{parent.source} memory cgroup {parent.directory} is not writable: {error}"
        if parent.source != "cgroup2" or systemd_run() is None:
            return direct
        return _scope_reason(direct)
    try:
        with deferred_signals():
            probe.remove()
    except SandboxError as error:
        return str(error)
    return None


def _could_enable_memory(parent: MemoryCgroup) -> bool:
    """v2: cells could turn the memory controller on for our children (it is offered to us, the file is
    writable, and our cgroup holds no process — the kernel's no-internal-processes rule — or is the root)."""
    if parent.source != "cgroup2" or "memory" not in _controllers(parent.directory):
        return False
    if not os.access(parent.directory / "cgroup.subtree_control", os.W_OK):
        return False
    return parent.directory == parent.mount or not _pids(parent.directory / "cgroup.procs")


def _scope_reason(direct: str) -> str | None:
    """None when `systemd-run --scope` with MemoryMax works (the v2 fallback), else both reasons."""
    command = systemd_scope_command(
        unique_name(), PROBE_LIMIT, Path(os.devnull), ["true"], user=os.geteuid() != 0
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{direct}; systemd-run: {error}"
    if done.returncode != 0:
        return f"{direct}; systemd-run --scope failed: {done.stderr.strip()[-300:]}"
    return None
