"""Memory limit detection (cgroup v2, cgroup v1, physical RAM) and the MemoryBudget admitting allocations."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import psutil

from gguf_sandbox.errors import BudgetExceeded

LimitSource = Literal["cgroup2", "cgroup1", "physical"]

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); anything this
# large cannot be a real limit on any machine.
V1_UNLIMITED = 1 << 62

CGROUP_MOUNT = Path("sys/fs/cgroup")

# Default slack MemoryBudget.detect leaves for the interpreter, allocator fragmentation and page cache.
DEFAULT_HEADROOM = 8 << 20


@dataclass(frozen=True)
class MemoryLimit:
    """The memory this process may use, where that number comes from, and the cgroup its usage is read in."""

    limit_bytes: int
    source: LimitSource
    cgroup_path: Path | None = None
    limited_by: Path | None = None


@dataclass(frozen=True)
class _Layout:
    """Which files of one cgroup version hold the limit, the usage and the peak."""

    source: LimitSource
    limit_files: tuple[str, ...]
    usage_file: str
    peak_file: str


_V2 = _Layout("cgroup2", ("memory.max",), "memory.current", "memory.peak")
_V1 = _Layout(
    "cgroup1",
    ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "memory.usage_in_bytes",
    "memory.max_usage_in_bytes",
)
_LAYOUTS = {layout.source: layout for layout in (_V2, _V1)}


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup this process lives in: its version, its directory and the mount it hangs under."""

    source: LimitSource
    directory: Path
    mount: Path

    @property
    def layout(self) -> _Layout:
        return _LAYOUTS[self.source]


def _read_proc_cgroup(root: Path) -> dict[str, str]:
    """Map controller name ("" for the v2 unified line) to the cgroup path in /proc/self/cgroup."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _resolve(mount: Path, cgroup: str) -> Path | None:
    """The directory of `cgroup` under `mount`; inside a container the mount *is* our cgroup, so fall back."""
    candidate = mount / cgroup.strip("/")
    if candidate.is_dir():
        return candidate
    return mount if mount.is_dir() else None


def own_memory_cgroup(root: Path = Path("/")) -> MemoryCgroup | None:
    """Our memory cgroup; a v1 memory controller wins (hybrid hosts also show a bare "0::" line)."""
    paths = _read_proc_cgroup(root)
    mount_base = root / CGROUP_MOUNT
    if "memory" in paths:
        mount = mount_base / "memory"
        directory = _resolve(mount, paths["memory"])
        if directory is not None:
            return MemoryCgroup("cgroup1", directory, mount)
    if "" in paths and (mount_base / "cgroup.controllers").is_file():
        directory = _resolve(mount_base, paths[""])
        if directory is not None:
            return MemoryCgroup("cgroup2", directory, mount_base)
    return None


def _read_int(path: Path) -> int | None:
    """An integer cgroup file; None when absent, unreadable, "max" or the v1 "unlimited" sentinel."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= V1_UNLIMITED else value


def _ancestors(directory: Path, mount: Path) -> list[Path]:
    """`directory` and each parent up to and including the mount root."""
    chain = [directory]
    while chain[-1] != mount and chain[-1].parent != chain[-1] and mount in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def physical_memory() -> int:
    """Total RAM of the machine in bytes."""
    return int(psutil.virtual_memory().total)


def detect_limit(root: Path = Path("/")) -> MemoryLimit:
    """The tightest memory limit over our cgroup and its ancestors, or physical RAM when nothing is tighter.

    `root` is the filesystem root to look under; tests pass a fake tree.
    """
    physical = physical_memory()
    located = own_memory_cgroup(root)
    if located is None:
        return MemoryLimit(physical, "physical")
    best: tuple[int, Path] | None = None
    for directory in _ancestors(located.directory, located.mount):
        for name in located.layout.limit_files:
            value = _read_int(directory / name)
            if value is not None and (best is None or value < best[0]):
                best = (value, directory)
    if best is None or best[0] >= physical:
        return MemoryLimit(physical, "physical", located.directory)
    return MemoryLimit(best[0], located.layout.source, located.directory, best[1])


def _process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _process_peak_rss() -> int:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _cgroup_value(root: Path, pick: Callable[[_Layout], str]) -> int | None:
    located = own_memory_cgroup(root)
    if located is None:
        return None
    return _read_int(located.directory / pick(located.layout))


def current_usage(root: Path = Path("/")) -> int:
    """Bytes charged to our memory cgroup now (incl. page cache), else this process's RSS."""
    value = _cgroup_value(root, lambda layout: layout.usage_file)
    return value if value is not None else _process_rss()


def peak_usage(root: Path = Path("/")) -> int:
    """Highest usage of our memory cgroup so far (memory.peak / max_usage_in_bytes), else peak RSS."""
    value = _cgroup_value(root, lambda layout: layout.peak_file)
    return value if value is not None else _process_peak_rss()


def _usage_at(origin: MemoryLimit) -> int:
    """Usage charged where the limit bites (an ancestor's limit counts its whole subtree), else our RSS."""
    layout = _LAYOUTS.get(origin.source)
    if layout is None or origin.limited_by is None:
        return _process_rss()
    value = _read_int(origin.limited_by / layout.usage_file)
    return value if value is not None else _process_rss()


class Reservation:
    """Bytes held against a MemoryBudget until released; a context manager, release() is idempotent."""

    __slots__ = ("_budget", "_released", "nbytes", "purpose")

    def __init__(self, budget: MemoryBudget, purpose: str, nbytes: int) -> None:
        self._budget = budget
        self._released = False
        self.purpose = purpose
        self.nbytes = nbytes

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._budget._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Reservation({self.purpose!r}, {self.nbytes:,} bytes, {state})"


_HINT_CAP = "split the work into chunks of at most {cap:,} bytes (stream rows instead of whole tensors)"
_HINT_LIMIT = (
    "raise the memory limit{origin}, or use a streaming plan / a smaller batch so less is held at once"
)


class MemoryBudget:
    """Admission control for memory: reservations above `cap` or beyond `limit - baseline` are refused.

    `limit` is the total the process may use, `baseline` what is already spent outside the budget
    (interpreter, imports), `cap` the largest single reservation. Thread-safe.
    """

    def __init__(
        self,
        limit: int,
        cap: int = 1 << 20,
        baseline: int = 0,
        origin: MemoryLimit | None = None,
    ) -> None:
        if limit < 0 or cap < 0 or baseline < 0:
            raise ValueError(f"MemoryBudget: limit={limit}, cap={cap}, baseline={baseline} must be >= 0")
        self.limit = limit
        self.cap = cap
        self.baseline = baseline
        self.origin = origin
        self._in_use = 0
        self._peak = 0
        self._room = threading.Condition(threading.Lock())

    @classmethod
    def detect(
        cls, cap: int = 1 << 20, headroom: int = DEFAULT_HEADROOM, root: Path = Path("/")
    ) -> MemoryBudget:
        """A budget sized from the detected limit, minus what is already used and `headroom` of slack."""
        origin = detect_limit(root)
        usage = _usage_at(origin)
        limit = max(origin.limit_bytes - headroom, 0)
        return cls(limit, cap=cap, baseline=min(usage, limit), origin=origin)

    @property
    def in_use(self) -> int:
        with self._room:
            return self._in_use

    @property
    def peak(self) -> int:
        """The most bytes held at once through this budget."""
        with self._room:
            return self._peak

    @property
    def available(self) -> int:
        with self._room:
            return self._free()

    def _free(self) -> int:
        return max(self.limit - self.baseline - self._in_use, 0)

    def _limit_hint(self) -> str:
        origin = ""
        if self.origin is not None:
            where = f" at {self.origin.limited_by}" if self.origin.limited_by else ""
            origin = f" ({self.origin.source}{where}: {self.origin.limit_bytes:,} bytes)"
        return _HINT_LIMIT.format(origin=origin)

    def _check_size(self, purpose: str, nbytes: int, cap: int) -> None:
        """Refuse what can never fit, whatever else is released."""
        if nbytes < 0:
            raise ValueError(f"{purpose}: cannot reserve a negative size ({nbytes})")
        if nbytes > cap:
            raise BudgetExceeded(purpose, nbytes, cap, _HINT_CAP.format(cap=cap))
        if nbytes > self.limit - self.baseline:
            raise BudgetExceeded(purpose, nbytes, self._free(), self._limit_hint())

    def _grant(self, purpose: str, nbytes: int) -> Reservation:
        self._in_use += nbytes
        self._peak = max(self._peak, self._in_use)
        return Reservation(self, purpose, nbytes)

    def reserve(self, purpose: str, nbytes: int, *, cap: int | None = None) -> Reservation:
        """Hold `nbytes` for `purpose` or raise BudgetExceeded; `cap` overrides the single-reservation cap."""
        with self._room:
            self._check_size(purpose, nbytes, self.cap if cap is None else cap)
            if nbytes > self._free():
                raise BudgetExceeded(purpose, nbytes, self._free(), self._limit_hint())
            return self._grant(purpose, nbytes)

    def reserve_blocking(
        self, purpose: str, nbytes: int, timeout: float | None = None, *, cap: int | None = None
    ) -> Reservation:
        """Like reserve(), but wait up to `timeout` seconds for others to release room (queue, don't fail)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            self._check_size(purpose, nbytes, self.cap if cap is None else cap)
            while nbytes > self._free():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BudgetExceeded(
                        purpose,
                        nbytes,
                        self._free(),
                        f"waited {timeout:.1f} s for room; " + self._limit_hint(),
                    )
                self._room.wait(remaining)
            return self._grant(purpose, nbytes)

    def _release(self, reservation: Reservation) -> None:
        with self._room:
            if reservation._released:
                return
            reservation._released = True
            self._in_use -= reservation.nbytes
            self._room.notify_all()

    def __repr__(self) -> str:
        return (
            f"MemoryBudget(limit={self.limit:,}, baseline={self.baseline:,}, cap={self.cap:,}, "
            f"in_use={self.in_use:,}, peak={self.peak:,})"
        )
