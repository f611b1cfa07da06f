"""The sandbox contract: what a cell is, what running it yields, and the Protocol every backend meets."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from gguf_sandbox.sandbox.sampling import SampleWatcher, Timeline

# Token in CellSpec.argv replaced by the path at which the backend makes the model visible.
MODEL_PLACEHOLDER = "{model}"
# Tasks (processes and threads) one cell may have, on every backend.
PIDS_LIMIT = 256


@dataclass(frozen=True)
class Mount:
    """A host file or directory the cell sees read-only at `target` (an absolute path inside the cell).

    Docker bind-mounts it there; the cgroup backend runs on the host's filesystem, where it is at `source`
    (repro only builds cgroup mounts whose target is their source).
    """

    source: Path
    target: str


@dataclass(frozen=True)
class CellSpec:
    """One cell: run `python <argv>` with interpreter version `python` under `memory` bytes."""

    cell_id: str
    backend: str
    python: str
    memory: int
    argv: tuple[str, ...]
    timeout: float = 300.0
    model: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # PyPI requirements the cell's Python needs beyond gguf-sandbox's own (the peers of a peer cell): the
    # cgroup backend installs them into a separate cached venv, docker runs the cell in the peers' image;
    # both take source-only packages from the wheelhouse (sandbox/wheelhouse.py).
    requirements: tuple[str, ...] = ()
    # Extra host paths the argv names (`repro --mount`); matrix cells have none.
    mounts: tuple[Mount, ...] = ()


class Isolation(str, enum.Enum):
    """What a cell is kept from, beyond its memory limit; each backend says which of these a cell had."""

    NON_ROOT = "non-root user"  # not uid 0 on the host
    NO_NEW_PRIVILEGES = "no new privileges"  # no capabilities, setuid binaries do not elevate
    NO_NETWORK = "no network"  # a network namespace with nothing but loopback
    PRIVATE_FILESYSTEM = "private filesystem"  # sees only what it needs, read-only, and a private /tmp
    READ_ONLY_MODEL = "read-only model"
    PIDS_LIMIT = "pids limit"  # a fork bomb stops at a bound
    PRIVATE_PROCESSES = "private processes"  # sees and signals no host process; dies as one


@dataclass(frozen=True)
class IsolationReport:
    """The isolation a cell had: `missing` maps each property it lacked to why (empty: it had them all)."""

    held: frozenset[Isolation] = frozenset()
    missing: Mapping[Isolation, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for a report: what held, then what was missing and why."""
        held = ", ".join(item.value for item in Isolation if item in self.held) or "none"
        if not self.missing:
            return f"isolation: {held}"
        lacking = "; ".join(f"{item.value} ({why})" for item, why in self.missing.items())
        return f"isolation: {held}; missing: {lacking}"

    def to_json(self) -> dict[str, object]:
        return {
            "held": [item.value for item in Isolation if item in self.held],
            "missing": {item.value: why for item, why in self.missing.items()},
        }


@dataclass(frozen=True)
class RunResult:
    """What a backend observed, before any verdict: exit, OOM signals, memory, output."""

    exit_code: int | None
    timed_out: bool
    oom_killed_flag: bool
    oom_kill_count: int
    peak_bytes: int | None
    limit_bytes: int
    duration_s: float
    stdout: str
    stderr: str
    # Memory over the cell's life (usage, working set, the OOM moment), sampled by the backend.
    timeline: Timeline = field(default_factory=Timeline)
    # Which isolation the cell had (empty when the backend does not say, e.g. a plain run_limited child).
    isolation: IsolationReport = IsolationReport()

    @property
    def killed_by_sigkill(self) -> bool:
        return self.exit_code in (137, -9)


@runtime_checkable
class Sandbox(Protocol):
    """A backend that runs a CellSpec under a hard memory limit with swap off."""

    name: str

    def unavailable_reason(self, python: str) -> str | None:
        """None when cells for this Python version can run here, else why not (used as a skip reason)."""
        ...

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        """Run the cell to completion or timeout; always clean up; never raise for the cell's own failure.
        `watch` sees each memory sample as the backend takes it."""
        ...


@dataclass(frozen=True)
class CellCommand:
    """A host command whose stdin and stdout are those of the cell's process: start it yourself."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None  # None: inherit the caller's environment


class AttachedCell(Protocol):
    """A prepared cell (limit set, hardening checked) whose process the caller starts with `command`.

    Implementations may provide `command` and `stderr` as plain attributes.
    """

    @property
    def command(self) -> CellCommand: ...

    @property
    def stderr(self) -> IO[str]:
        """A file to give the started command as its stderr; the backend reads it back in finish()."""
        ...

    def finish(self, grace: float = 5.0) -> RunResult:
        """Wait up to `grace` s for the process to exit (its stdin is closed by now), kill what is left of
        the cell, and return what was observed (stdout is empty: the caller read it)."""
        ...


@runtime_checkable
class AttachableSandbox(Sandbox, Protocol):
    """A backend that can also hand a cell's stdin/stdout to a client on the host (the `mcp` workload)."""

    def attach(
        self, spec: CellSpec, *, watch: SampleWatcher | None = None
    ) -> AbstractContextManager[AttachedCell]:
        """Prepare the cell for spec.argv and yield how to start it; everything is removed on exit.

        The wall-clock timeout runs from entry; a cell still running then is killed and reported timed out.
        """
        ...
