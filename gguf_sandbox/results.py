"""The JSONL results store: one durable line per finished cell, resume, and the run's summary."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.sandbox.base import Verdict

CELL = "cell"  # a decided cell (verdict)
SKIP = "skip"  # a cell its backend cannot run here (reason)
ERROR = "error"  # the harness could not run the cell (model preparation, backend failure)
REFERENCE = "reference"  # an unconstrained run whose checksum cells must reproduce
RUN = "run"  # a header written when a run starts


@dataclass(frozen=True)
class CellRecord:
    """One line of the store about a cell, in the fields grids and summaries need."""

    kind: str
    cell_id: str
    backend: str
    python: str
    memory: int
    memory_label: str
    workload: str
    model: str | None
    expected: frozenset[Verdict]
    verdict: Verdict | None = None
    peak: int | None = None
    limit: int | None = None
    reason: str = ""
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        """Decided and allowed; skipped cells are not failures, harness errors are."""
        if self.kind == SKIP:
            return True
        return self.verdict is not None and self.verdict in self.expected

    @property
    def finished(self) -> bool:
        """Done for --resume: decided or a harness error would rerun; only decided cells count."""
        return self.kind == CELL

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CellRecord:
        verdict = data.get("verdict")
        return cls(
            kind=str(data["kind"]),
            cell_id=str(data["cell_id"]),
            backend=str(data.get("backend", "")),
            python=str(data.get("python", "")),
            memory=int(data.get("memory", 0)),
            memory_label=str(data.get("memory_label", "")),
            workload=str(data.get("workload", "")),
            model=data.get("model"),
            expected=frozenset(Verdict(v) for v in data.get("expected", ())),
            verdict=Verdict(verdict) if verdict else None,
            peak=data.get("peak"),
            limit=data.get("limit"),
            reason=str(data.get("reason", "")),
            fingerprint=str(data.get("fingerprint", "")),
        )


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of the store; a torn last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    records.append(value)
    return records


class ResultStore:
    """Append-only JSONL; every append is flushed and fsynced before it returns."""

    def __init__(self, path: Path, handle: IO[str], previous: list[dict[str, Any]]) -> None:
        self.path = path
        self._handle = handle
        self._records = previous
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, resume: bool = False) -> ResultStore:
        """Open for a run: with `resume` keep what is there, else move an old file aside to `<name>.prev`."""
        path = Path(path)
        previous = read_records(path) if resume else []
        if not resume and path.exists() and path.stat().st_size > 0:
            os.replace(path, path.with_name(path.name + ".prev"))
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                torn = existing.read(1) != b"\n"
        try:
            handle = path.open("a", encoding="utf-8")
        except OSError as error:
            raise GGUFSandboxError(f"results file {path}: cannot open ({error.strerror})") from error
        if torn:
            handle.write("\n")  # end a torn line so the next record starts clean
            handle.flush()
        return cls(path, handle, previous)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line, durably; Ctrl-C during the write is delivered after it."""
        line = json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=True) + "\n"
        with self._lock, _deferred_sigint():
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._records.append(json.loads(line))

    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def finished(self) -> dict[str, CellRecord]:
        """cell_id → the latest decided record (what --resume skips)."""
        out: dict[str, CellRecord] = {}
        for record in self._records:
            if record.get("kind") == CELL:
                out[str(record["cell_id"])] = CellRecord.from_json(record)
        return out

    def references(self) -> dict[str, dict[str, Any]]:
        """reference id → the latest reference record."""
        return {str(r["cell_id"]): r for r in self._records if r.get("kind") == REFERENCE}


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold SIGINT (main thread only) so a record is never half written, then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def latest_cells(records: Iterable[Mapping[str, Any]]) -> list[CellRecord]:
    """The latest cell/skip/error record per cell id, in first-seen order."""
    latest: dict[str, CellRecord] = {}
    for record in records:
        if record.get("kind") in (CELL, SKIP, ERROR):
            latest[str(record["cell_id"])] = CellRecord.from_json(record)
    return list(latest.values())


@dataclass(frozen=True)
class Summary:
    """Counts per verdict, the unexpected cells, the skipped cells."""

    total: int
    verdicts: Mapping[str, int]
    unexpected: tuple[CellRecord, ...]
    skipped: tuple[CellRecord, ...]
    errors: tuple[CellRecord, ...]

    @property
    def ok(self) -> bool:
        return not self.unexpected

    def render(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in sorted(self.verdicts.items())) or "no cells decided"
        lines = [f"{self.total} cells: {counts}"]
        if self.skipped:
            reasons = Counter(r.reason for r in self.skipped)
            lines.append(
                f"{len(self.skipped)} skipped: " + "; ".join(f"{n}× {why}" for why, n in reasons.items())
            )
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} outside expect:")
            for record in self.unexpected:
                got = record.verdict.value if record.verdict else f"error ({record.reason})"
                allowed = "|".join(sorted(v.value for v in record.expected))
                lines.append(f"  {record.cell_id}: {got} (expected {allowed})")
        else:
            lines.append("every decided cell is within its expect")
        return "\n".join(lines)


def summarize(cells: Iterable[CellRecord]) -> Summary:
    cells = list(cells)
    return Summary(
        total=len(cells),
        verdicts=dict(Counter(c.verdict.value for c in cells if c.verdict is not None)),
        unexpected=tuple(c for c in cells if not c.ok),
        skipped=tuple(c for c in cells if c.kind == SKIP),
        errors=tuple(c for c in cells if c.kind == ERROR),
    )
