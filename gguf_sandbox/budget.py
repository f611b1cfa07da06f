"""Memory limit detection (cgroup v2, cgroup v1, physical RAM) and the MemoryBudget admitting allocations.

The planning rule: a budget is sized against the *working set* where the limit bites, not against raw
usage. The working set is usage minus inactive file pages (cgroup v2 `memory.stat` `inactive_file`, v1
`total_inactive_file`), as kubelet computes it: clean inactive page cache — the interpreter's, numpy's and
the model file's pages, charged to the cell when it read them — is reclaimed by the kernel before it
OOM-kills anything, so counting it as spent refused work that fits (and whether it did depended on what the
page cache held). Active file pages, anonymous memory and kernel memory stay counted. Three refinements:

- the baseline is re-measured when a reservation would not fit (the working set then, minus reservations
  marked allocated), so pages that became reclaimable after detection count as room;
- file pages the engine itself needs resident — a streaming plan's weights kept in page cache — are
  reserved explicitly by the engine (`Plan.cached_bytes`), so the room they take is never handed out;
- `headroom` (8 MiB by default) is left for allocator slack, Python objects and transient page cache.
"""

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
    """Which files of one cgroup version hold the limit, the usage, the peak and the reclaimable pages."""

    source: LimitSource
    limit_files: tuple[str, ...]
    usage_file: str
    peak_file: str
    inactive_file_key: str  # in memory.stat, counting the whole subtree


STAT_FILE = "memory.stat"
_V2 = _Layout("cgroup2", ("memory.max",), "memory.current", "memory.peak", "inactive_file")
_V1 = _Layout(
    "cgroup1",
    ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "memory.usage_in_bytes",
    "memory.max_usage_in_bytes",
    "total_inactive_file",
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


def _read_stat(path: Path, key: str) -> int | None:
    """One counter of a memory.stat file; None when the file or the key is missing or unreadable."""
    try:
        with path.open(encoding="ascii") as stat_file:
            for line in stat_file:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _working_set_of(directory: Path, layout: _Layout) -> int | None:
    """Usage of one cgroup minus its inactive file pages (never below 0); None without a usage figure."""
    usage = _read_int(directory / layout.usage_file)
    if usage is None:
        return None
    inactive = _read_stat(directory / STAT_FILE, layout.inactive_file_key) or 0
    return max(usage - inactive, 0)


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


def working_set(root: Path = Path("/")) -> int:
    """Bytes of our memory cgroup that cannot be reclaimed: usage minus inactive file pages, else our RSS."""
    located = own_memory_cgroup(root)
    value = None if located is None else _working_set_of(located.directory, located.layout)
    return value if value is not None else _process_rss()


def peak_usage(root: Path = Path("/")) -> int:
    """Highest usage of our memory cgroup so far (memory.peak / max_usage_in_bytes), else peak RSS."""
    value = _cgroup_value(root, lambda layout: layout.peak_file)
    return value if value is not None else _process_peak_rss()


def working_set_at(origin: MemoryLimit) -> int:
    """The working set where the limit bites (an ancestor's limit counts its whole subtree), else our RSS."""
    layout = _LAYOUTS.get(origin.source)
    if layout is None or origin.limited_by is None:
        return _process_rss()
    value = _working_set_of(origin.limited_by, layout)
    return value if value is not None else _process_rss()


class Reservation:
    """Bytes held against a MemoryBudget until released; a context manager, release() is idempotent."""

    __slots__ = ("_allocated", "_budget", "_released", "nbytes", "purpose")

    def __init__(self, budget: MemoryBudget, purpose: str, nbytes: int) -> None:
        self._budget = budget
        self._released = False
        self._allocated = False
        self.purpose = purpose
        self.nbytes = nbytes

    @property
    def released(self) -> bool:
        return self._released

    def mark_allocated(self) -> None:
        """Say the bytes are now allocated and stay so until release (e.g. loaded weights).

        A re-measured baseline subtracts them from the working set instead of counting them twice.
        """
        self._budget._mark_allocated(self)

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
    (interpreter, imports), `cap` the largest single reservation. With `measure` (a function returning the
    current working set, as detect() passes), a reservation that would not fit first re-measures the
    baseline: the working set now minus the reservations marked allocated. Thread-safe.
    """

    def __init__(
        self,
        limit: int,
        cap: int = 1 << 20,
        baseline: int = 0,
        origin: MemoryLimit | None = None,
        measure: Callable[[], int] | None = None,
    ) -> None:
        if limit < 0 or cap < 0 or baseline < 0:
            raise ValueError(f"MemoryBudget: limit={limit}, cap={cap}, baseline={baseline} must be >= 0")
        self.limit = limit
        self.cap = cap
        self.baseline = baseline
        self.origin = origin
        self._measure = measure
        self._in_use = 0
        self._allocated = 0
        self._peak = 0
        self._room = threading.Condition(threading.Lock())

    @classmethod
    def detect(
        cls, cap: int = 1 << 20, headroom: int = DEFAULT_HEADROOM, root: Path = Path("/")
    ) -> MemoryBudget:
        """A budget sized from the detected limit, minus the working set now and `headroom` of slack."""
        origin = detect_limit(root)
        limit = max(origin.limit_bytes - headroom, 0)

        def measure() -> int:
            return working_set_at(origin)

        return cls(limit, cap=cap, baseline=min(measure(), limit), origin=origin, measure=measure)

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

    def _remeasure(self) -> bool:
        """Re-read the baseline from the working set (lock held); False when this budget cannot measure."""
        if self._measure is None:
            return False
        self.baseline = min(max(self._measure() - self._allocated, 0), self.limit)
        return True

    def _fits(self, nbytes: int) -> bool:
        """Whether `nbytes` fit now, re-measuring the baseline before saying no (lock held)."""
        if nbytes <= self._free():
            return True
        return self._remeasure() and nbytes <= self._free()

    def _limit_hint(self) -> str:
        origin = ""
        if self.origin is not None:
            where = f" at {self.origin.limited_by}" if self.origin.limited_by else ""
            origin = f" ({self.origin.source}{where}: {self.origin.limit_bytes:,} bytes)"
        return _HINT_LIMIT.format(origin=origin)

    def _check_size(self, purpose: str, nbytes: int, cap: int) -> None:
        """Refuse a negative size or one over the single-reservation cap."""
        if nbytes < 0:
            raise ValueError(f"{purpose}: cannot reserve a negative size ({nbytes})")
        if nbytes > cap:
            raise BudgetExceeded(purpose, nbytes, cap, _HINT_CAP.format(cap=cap))

    def _never_fits(self, nbytes: int) -> bool:
        """Whether waiting cannot help (lock held, baseline just measured): `nbytes` exceed the room left
        beside the baseline, and no reservation is held whose memory a re-measured baseline may include."""
        unmarked = self._in_use - self._allocated
        return nbytes > self.limit - self.baseline and (self._measure is None or unmarked == 0)

    def _grant(self, purpose: str, nbytes: int) -> Reservation:
        self._in_use += nbytes
        self._peak = max(self._peak, self._in_use)
        return Reservation(self, purpose, nbytes)

    def reserve(self, purpose: str, nbytes: int, *, cap: int | None = None) -> Reservation:
        """Hold `nbytes` for `purpose` or raise BudgetExceeded; `cap` overrides the single-reservation cap."""
        with self._room:
            self._check_size(purpose, nbytes, self.cap if cap is None else cap)
            if not self._fits(nbytes):
                raise BudgetExceeded(purpose, nbytes, self._free(), self._limit_hint())
            return self._grant(purpose, nbytes)

    def reserve_blocking(
        self, purpose: str, nbytes: int, timeout: float | None = None, *, cap: int | None = None
    ) -> Reservation:
        """Like reserve(), but wait up to `timeout` seconds for others to release room (queue, don't fail).

        What can never fit, whatever is released, is refused at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            self._check_size(purpose, nbytes, self.cap if cap is None else cap)
            while not self._fits(nbytes):
                if self._never_fits(nbytes):
                    raise BudgetExceeded(purpose, nbytes, self._free(), self._limit_hint())
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BudgetExceeded(
                        purpose,
                        nbytes,
                        self._free(),
                        f"waited {timeout:.1f} s for room while {self._in_use:,} bytes stayed reserved; "
                        + self._limit_hint(),
                    )
                self._room.wait(remaining)
            return self._grant(purpose, nbytes)

    def _mark_allocated(self, reservation: Reservation) -> None:
        with self._room:
            if reservation._released or reservation._allocated:
                return
            reservation._allocated = True
            self._allocated += reservation.nbytes

    def _release(self, reservation: Reservation) -> None:
        with self._room:
            if reservation._released:
                return
            reservation._released = True
            self._in_use -= reservation.nbytes
            if reservation._allocated:
                self._allocated -= reservation.nbytes
            self._room.notify_all()

    def __repr__(self) -> str:
        return (
            f"MemoryBudget(limit={self.limit:,}, baseline={self.baseline:,}, cap={self.cap:,}, "
            f"in_use={self.in_use:,}, peak={self.peak:,})"
        )
