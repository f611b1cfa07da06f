"""Where a cgroup cell runs: a fresh child cgroup (memory, pids) or a systemd scope; stale ones swept."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from gguf_sandbox.cgroupfs import (
    PROCS_FILE,
    SUBTREE_FILE,
    MemoryCgroup,
    own_memory_cgroup,
    read_pids,
)
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.cgroup.child import ChildCgroup, controllers, remove_stale_cgroups
from gguf_sandbox.sandbox.cgroup.control import own_v1_cgroup, unique_name
from gguf_sandbox.sandbox.cgroup.scope import (
    SystemdScope,
    systemd_run,
    systemd_scope_command,
    user_manager_env,
)
from gguf_sandbox.sandbox.isolation import CellCgroup
from gguf_sandbox.signals import deferred_signals

PROBE_LIMIT = 64 << 20


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

    def cell_cgroup(self) -> CellCgroup:
        """The cell's cgroup, for its sweeper."""
        ...

    def usage(self) -> int | None: ...

    def working_set(self) -> int | None:
        """Usage minus inactive file pages (what the kernel cannot just reclaim); None when unknown."""
        ...

    def peak(self) -> int | None: ...

    def oom_kills(self) -> int: ...

    def kill_all(self, deadline: float = 5.0) -> None: ...

    def remove(self, deadline: float = 5.0) -> None: ...


def direct_or_scope(root: Path, limit: int, report: Path, *, pids_limit: int | None = None) -> Placement:
    """A child cgroup of ours when we may create one, else (cgroup v2) a systemd scope."""
    parent = own_memory_cgroup(root)
    if parent is None:
        raise SandboxError("no memory cgroup controller under /sys/fs/cgroup; hint: use the docker backend")
    try:
        pids_parent = own_v1_cgroup("pids", root) if parent.source == "cgroup1" else None
        remove_stale_cgroups(parent, *([pids_parent] if pids_parent is not None else []))
        return ChildCgroup(parent, limit, root=root, pids_limit=pids_limit)
    except SandboxError as error:
        if parent.source != "cgroup2" or systemd_run() is None:
            raise
        direct_error = error
    placement = SystemdScope(root, limit, report, pids_limit)
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
            probe = ChildCgroup(parent, PROBE_LIMIT, root=root, enable=False, watched=False)
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
    if parent.source != "cgroup2" or "memory" not in controllers(parent.directory):
        return False
    if not os.access(parent.directory / SUBTREE_FILE, os.W_OK):
        return False
    return parent.directory == parent.mount or not read_pids(parent.directory / PROCS_FILE)


def _scope_reason(direct: str) -> str | None:
    """None when `systemd-run --scope` with MemoryMax works (the v2 fallback), else both reasons."""
    user = os.geteuid() != 0
    command = systemd_scope_command(
        unique_name(),
        PROBE_LIMIT,
        Path(os.devnull),
        ["true"],
        user=user,
        manager_env=user_manager_env(os.environ, os.getuid()) if user else None,
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{direct}; systemd-run: {error}"
    if done.returncode != 0:
        return f"{direct}; systemd-run --scope failed: {done.stderr.strip()[-300:]}"
    return None
