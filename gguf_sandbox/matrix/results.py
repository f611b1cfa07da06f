"""The JSONL results store: one durable line per finished cell, resume, and the run's summary."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gguf_sandbox import log
from gguf_sandbox.atomic import check_replaceable
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.verdicts import MAX_SIZE, Verdict
from gguf_sandbox.signals import deferred_signals

LOG = log.get(__name__)

CELL = "cell"  # a decided cell (verdict)
SKIP = "skip"  # a cell its backend cannot run here (reason)
ERROR = "error"  # the harness could not run the cell (model preparation, backend failure)
REFERENCE = "reference"  # an unconstrained run whose checksum cells must reproduce
RUN = "run"  # a header written when a run starts
KINDS = frozenset({CELL, SKIP, ERROR, REFERENCE, RUN})
# A record is a few KB (the report and a log tail); a line beyond this is damage, not a record.
MAX_RECORD_BYTES = 16 << 20
# Whether a file is ours is decided by its first MiB: one valid record there.
OWNERSHIP_PROBE_BYTES = 1 << 20
MAX_WARNINGS = 10
# C0, DEL and C1: in a cell id or another name the grid prints, they would drive the terminal that reads it
# (clear it, retitle it, hide a line). No record we write has them there; free text is escaped when shown.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
    repro: str = ""  # the `gguf-sandbox repro …` line (absent from records written before it was kept)

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
        """The record of a decoded line; ValueError names the first field that is missing or malformed."""
        verdict = data.get("verdict")
        expected = data.get("expected", ())
        if not isinstance(expected, list | tuple):
            raise ValueError(f"'expected' is {type(expected).__name__}, not a list of verdicts")
        model = _field(data, "model", str, None)
        _check_plain(model, "model")
        return cls(
            kind=_field(data, "kind", str),
            cell_id=_field(data, "cell_id", str),
            backend=_name(data, "backend"),
            python=_name(data, "python"),
            memory=_size(data, "memory", 0),
            memory_label=_name(data, "memory_label"),
            workload=_name(data, "workload"),
            model=model,
            expected=frozenset(Verdict(v) for v in expected),
            verdict=Verdict(verdict) if verdict else None,
            peak=_size(data, "peak", None),
            limit=_size(data, "limit", None),
            reason=str(data.get("reason", "")),
            fingerprint=str(data.get("fingerprint", "")),
            repro=str(data.get("repro") or ""),
        )


def _size(data: Mapping[str, Any], key: str, default: int | None) -> Any:
    """data[key] when a size from 0 to MAX_SIZE bytes, else `default` when absent; ValueError otherwise."""
    value: int | None = _field(data, key, int, default)
    if value is not None and not 0 <= value <= MAX_SIZE:
        raise ValueError(f"{key!r} is {'negative' if value < 0 else 'over 1 EiB'}, not a size in bytes")
    return value


def _name(data: Mapping[str, Any], key: str) -> str:
    """str(data[key]), '' when absent: a name grids print, so ValueError when it has control characters."""
    text = str(data.get(key, ""))
    _check_plain(text, key)
    return text


def _check_plain(text: str | None, key: str) -> None:
    if text is not None and has_control(text):
        raise ValueError(f"{key!r} has control characters")


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL, C1)."""
    return _CONTROL.search(text) is not None


def escaped(text: str) -> str:
    """`text` with each control character written as its escape (`\\x1b`, `\\n`): safe on a terminal."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


_T = TypeVar("_T")
_REQUIRED: Any = object()


def _field(data: Mapping[str, Any], key: str, kind: type[_T], default: Any = _REQUIRED) -> Any:
    """data[key] when it is a `kind` (bool is no int here), else `default`; ValueError when malformed."""
    if key not in data or data[key] is None:
        if default is _REQUIRED:
            raise ValueError(f"no {key!r}")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key!r} is {type(value).__name__}, not {kind.__name__}")
    return value


@dataclass(frozen=True)
class Damage:
    """A line of a results file that is not a record (skipped by every reader)."""

    line: int
    problem: str


@dataclass(frozen=True)
class Scan:
    """What a results file holds: its valid records, its damaged lines, and a torn last line if any."""

    records: tuple[dict[str, Any], ...]
    damaged: tuple[Damage, ...]
    complete_bytes: int  # where the last complete line ends
    torn_bytes: int  # bytes after it: a line a killed writer left without its newline
    lines: tuple[int, ...] = ()  # the line number of each record

    def report(self, path: Path, warn: Callable[[str], None]) -> None:
        """One line per damaged line (the first MAX_WARNINGS), then how many more."""
        for damage in self.damaged[:MAX_WARNINGS]:
            warn(f"results file {path}: line {damage.line}: {damage.problem}; skipped")
        if len(self.damaged) > MAX_WARNINGS:
            warn(f"results file {path}: {len(self.damaged) - MAX_WARNINGS} more damaged lines skipped")


def scan(path: Path, limit: int | None = None) -> Scan:
    """Read a results file line by line (stopping after about `limit` bytes), validating every record."""
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    damaged: list[Damage] = []
    complete = torn = 0
    try:
        with path.open("rb") as handle:
            for number in itertools.count(1):
                if limit is not None and complete >= limit:
                    break
                line = handle.readline(MAX_RECORD_BYTES + 1)
                length = len(line)
                oversized = length > MAX_RECORD_BYTES
                while oversized and not line.endswith(b"\n") and (limit is None or length < limit):
                    line = handle.readline(MAX_RECORD_BYTES)  # skip the rest of a line that is no record
                    length += len(line)
                if not line.endswith(b"\n"):
                    torn = length
                    break
                complete += length
                record, problem = (
                    (None, f"longer than {MAX_RECORD_BYTES >> 20} MiB") if oversized else _decode(line)
                )
                if record is not None:
                    records.append(record)
                    numbers.append(number)
                else:
                    damaged.append(Damage(number, problem))
    except OSError as error:
        raise GGUFSandboxError(f"results file {path}: cannot read ({error.strerror})") from None
    return Scan(tuple(records), tuple(damaged), complete, torn, tuple(numbers))


def _decode(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the record, "") or (None, what is wrong with the line)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past json's limit
        return None, "not JSON"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not a record"
    if value.get("kind") not in KINDS:
        return None, f"unknown kind {str(value.get('kind'))[:40]!r}"
    if not isinstance(value.get("cell_id"), str):
        return None, "a record without a cell_id"
    if has_control(value["cell_id"]):
        return None, "a cell_id with control characters"
    if value["kind"] in (CELL, SKIP, ERROR):
        try:
            CellRecord.from_json(value)
        except (ValueError, TypeError) as error:
            return None, f"a malformed {value['kind']} record ({error})"
    return value, ""


def read_records(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every valid record of the store, in order; damaged lines are reported through `warn` (stderr by
    default) with their line number and skipped, a torn last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    found = scan(path)
    found.report(path, warn or _to_stderr)
    return list(found.records)


def is_results_file(path: Path) -> bool:
    """Whether an existing regular file is one of ours: empty, or a valid record among its first lines."""
    if path.stat().st_size == 0:
        return True
    return bool(scan(path, limit=OWNERSHIP_PROBE_BYTES).records)


def _to_stderr(message: str) -> None:
    LOG.warning(message)


class ResultStore:
    """Append-only JSONL; every append is written and fsynced before it returns, or removed again."""

    def __init__(self, path: Path, fd: int, previous: list[dict[str, Any]]) -> None:
        self.path = path
        self._fd = fd
        self._records = previous
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, path: str | Path, resume: bool = False, warn: Callable[[str], None] | None = None
    ) -> ResultStore:
        """Open for a run: with `resume` keep what is there, else move an old results file aside to
        `<name>.prev`. Anything at `path` that is not a gguf-sandbox results file is refused untouched."""
        path = Path(path)
        warn = warn or _to_stderr
        previous: list[dict[str, Any]] = []
        if check_ours(path, "--results"):
            if resume:
                found = scan(path)
                found.report(path, warn)
                previous = list(found.records)
                if found.torn_bytes:
                    _truncate(path, found.complete_bytes)
                    warn(
                        f"results file {path}: removed a torn last line ({found.torn_bytes} bytes) "
                        "left by an interrupted run"
                    )
            elif path.stat().st_size > 0:
                aside = path.with_name(path.name + ".prev")
                if aside.exists() or aside.is_symlink():
                    check_ours(aside, "the previous results")
                _rename(path, aside)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise GGUFSandboxError(
                f"results file {path}: cannot open for writing ({error.strerror}); choose another --results"
            ) from None
        return cls(path, fd, previous)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line, durably; Ctrl-C during the write is delivered after it.

        A failed write (disk full, I/O error) is cut off again, so the file still ends with the last
        complete record, and raised as a one-line error naming the file.
        """
        line = json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=True) + "\n"
        data = line.encode("utf-8")
        with self._lock, deferred_signals():
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, end)
                raise GGUFSandboxError(
                    f"results file {self.path}: cannot write ({error.strerror}); the "
                    f"{len(self._records)} records before this one are intact — free space or choose "
                    "another --results, then rerun with --resume"
                ) from None
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


def check_ours(path: Path, what: str) -> bool:
    """True when `path` is one of our results files, False when nothing is there; else refuse it."""
    kind = f"a gguf-sandbox results file (a record in its first {OWNERSHIP_PROBE_BYTES >> 20} MiB)"
    return check_replaceable(path, what, kind, is_results_file, file_name="results.jsonl")


def _rename(path: Path, aside: Path) -> None:
    try:
        os.replace(path, aside)
    except OSError as error:
        raise GGUFSandboxError(
            f"results file {path}: cannot move the previous results to {aside} ({error.strerror})"
        ) from None


def _truncate(path: Path, size: int) -> None:
    try:
        os.truncate(path, size)
    except OSError as error:
        raise GGUFSandboxError(
            f"results file {path}: cannot remove its torn last line ({error.strerror})"
        ) from None


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
                f"{len(self.skipped)} skipped: "
                + "; ".join(f"{n}× {escaped(why)}" for why, n in reasons.items())
            )
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} outside expect:")
            for record in self.unexpected:
                got = record.verdict.value if record.verdict else f"error ({escaped(record.reason)})"
                allowed = "|".join(sorted(v.value for v in record.expected))
                lines.append(f"  {record.cell_id}: {got} (expected {allowed})")
                if record.repro:
                    lines.append(f"    reproduce: {escaped(record.repro)}")
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
