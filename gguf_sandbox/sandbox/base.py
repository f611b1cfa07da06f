"""The sandbox contract: what a cell is, what running it yields, and the Protocol every backend meets."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

# Token in CellSpec.argv replaced by the path at which the backend makes the model visible.
MODEL_PLACEHOLDER = "{model}"


class Verdict(str, enum.Enum):
    """How a cell ended. Graceful verdicts are what a well-behaved workload may produce."""

    PASS = "pass"
    DEGRADED = "degraded"
    REFUSED = "refused"
    OOM = "oom"
    CRASH = "crash"
    TIMEOUT = "timeout"
    WRONG = "wrong"

    @property
    def graceful(self) -> bool:
        return self in (Verdict.PASS, Verdict.DEGRADED, Verdict.REFUSED)


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
    expect: frozenset[Verdict] = frozenset({Verdict.PASS, Verdict.DEGRADED, Verdict.REFUSED})


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
    samples: tuple[tuple[float, int], ...] = ()

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

    def run(self, spec: CellSpec) -> RunResult:
        """Run the cell to completion or timeout; always clean up; never raise for the cell's own failure."""
        ...
