"""A fresh child memory cgroup (and pids limit) for one cell, and the sweep of dead runners' ones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from gguf_sandbox.cgroupfs import (
    CONTROLLERS_FILE,
    OOM_GROUP,
    OOM_KILL_KEY,
    PIDS_MAX,
    PROCS_FILE,
    SUBTREE_FILE,
    SWAPPINESS,
    MemoryCgroup,
    read_int,
    read_key,
    read_pids,
    working_set_of,
)
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.cgroup.control import (
    STALE_NAME,
    kill_cgroup,
    own_v1_cgroup,
    remove_cgroup,
    unique_name,
)
from gguf_sandbox.sandbox.isolation import CellCgroup
from gguf_sandbox.sandbox.reaper import CGROUP, GUARD

SHELL = "/bin/sh"
# The child joins each cgroup itself (the procs files before "--"), then execs: it is inside before it
# allocates anything, and no Python code runs between fork and exec (preexec_fn is unsafe once the
# parent has threads).
_JOIN_AND_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def controllers(directory: Path) -> set[str]:
    try:
        return set((directory / CONTROLLERS_FILE).read_text().split())
    except OSError:
        return set()


def _subtree(directory: Path) -> set[str]:
    try:
        return set((directory / SUBTREE_FILE).read_text().split())
    except OSError:
        return set()


class ChildCgroup:
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
        self.files = parent.files
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
            (self.parent.directory / SUBTREE_FILE).write_text(f"+{controller}")
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
            swappiness = self.path / SWAPPINESS
            with contextlib.suppress(OSError):
                swappiness.write_text("0")
            self.notes.append(
                f"{self.files.swap_limit} absent (swap accounting off): set memory.swappiness=0 instead, "
                "swap may still hide an OOM"
            )
        # v2: on OOM kill the whole cell at once rather than one process of it.
        with contextlib.suppress(OSError):
            (self.path / OOM_GROUP).write_text("1")

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
        return self.path / PROCS_FILE

    def command(self, argv: Sequence[str]) -> list[str]:
        procs = [str(self.procs_file), *(str(path / PROCS_FILE) for path in self.extra)]
        return [SHELL, "-c", _JOIN_AND_EXEC, "sh", *procs, "--", *argv]

    def attach(self, pid: int) -> None:
        """Nothing to do: the child joins the cgroup itself before exec."""

    def cell_cgroup(self) -> CellCgroup:
        return CellCgroup(directory=self.path)

    def usage(self) -> int | None:
        return read_int(self.path / self.files.usage)

    def working_set(self) -> int | None:
        return working_set_of(self.path, self.files)

    def peak(self) -> int | None:
        return read_int(self.path / self.files.peak)

    def oom_kills(self) -> int:
        return read_key(self.path / self.files.events, OOM_KILL_KEY) or 0

    def pids(self) -> list[int]:
        return read_pids(self.procs_file)

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
            match = STALE_NAME.match(entry.name)
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
