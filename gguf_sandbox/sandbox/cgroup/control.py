"""Operations on one cgroup directory: name a child, kill what it holds, remove it; v1 hierarchies."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
import uuid
from pathlib import Path

from gguf_sandbox.cgroupfs import CGROUP_MOUNT, KILL_FILE, PROCS_FILE, read_pids
from gguf_sandbox.errors import SandboxError

CHILD_PREFIX = "gguf-sandbox-"
STALE_NAME = re.compile(rf"^{re.escape(CHILD_PREFIX)}(\d+)-[0-9a-f]+$")


def unique_name() -> str:
    return f"{CHILD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def kill_until_empty(procs_file: Path, deadline: float) -> None:
    """SIGKILL every process listed in `procs_file` until it is empty (new forks included)."""
    stop = time.monotonic() + deadline
    while (pids := read_pids(procs_file)) and time.monotonic() < stop:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def kill_cgroup(path: Path, deadline: float = 5.0) -> None:
    """SIGKILL everything in cgroup `path` (v2: cgroup.kill first) until it is empty."""
    if (path / KILL_FILE).exists():
        with contextlib.suppress(OSError):
            (path / KILL_FILE).write_text("1")
    kill_until_empty(path / PROCS_FILE, deadline)


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
                    f"cannot remove cgroup {path}: {error} (procs: {read_pids(path / PROCS_FILE)}); "
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
            mount = root / CGROUP_MOUNT / controller
            directory = mount / parts[2].strip("/")
            if directory.is_dir():
                return directory
            return mount if mount.is_dir() else None
    return None
