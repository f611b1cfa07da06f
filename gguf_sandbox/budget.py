"""Memory limit detection (cgroup v2, cgroup v1, physical RAM) and the MemoryBudget admitting allocations.

The planning rule: a budget is sized against the *working set* where the limit bites, not against raw
usage. The working set is usage minus inactive file pages (cgroup v2 `memory.stat` `inactive_file`, v1
`total_inactive_file`), as kubelet computes it: clean inactive page cache — the interpreter's, numpy's and
the model file's pages, charged to the cell when it read them — is reclaimed by the kernel before it
OOM-kills anything, so counting it as spent refused work that fits (and whether it did depended on what the
page cache held). Active file pages, anonymous memory and kernel memory stay counted. Three refinements:

- the baseline is re-measured when a reservation would not fit (the working set then, minus reservations
  marked allocated), so pages that became reclaimable after detection count as room; if it still does
  not fit, the C heap's free pages are given back to the kernel first (glibc `malloc_trim`: memory freed
  by earlier requests stays in the process otherwise, and a long-running server would refuse a large
  request for room it only holds on to) and the working set is read once more;
- file pages the engine itself needs resident — a streaming plan's weights kept in page cache — are
  reserved explicitly by the engine (`Plan.cached_bytes`), so the room they take is never handed out;
- `headroom` (8 MiB by default) is left for allocator slack, Python objects and transient page cache.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from gguf_sandbox.cgroupfs import (
    FILES,
    CgroupFiles,
    LimitSource,
    ancestors,
    own_memory_cgroup,
    read_int,
    working_set_of,
)
from gguf_sandbox.errors import BudgetExceeded

# Default slack MemoryBudget.detect leaves for the interpreter, allocator fragmentation and page cache.
DEFAULT_HEADROOM = 8 << 20


@dataclass(frozen=True)
class MemoryLimit:
    """The memory this process may use, where that number comes from, and the cgroup its usage is read in."""

    limit_bytes: int
    source: LimitSource
    cgroup_path: Path | None = None
    limited_by: Path | None = None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc `malloc_trim(0)`); nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return function


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
    for directory in ancestors(located.directory, located.mount):
        for name in located.files.limit_files:
            value = read_int(directory / name)
            if value is not None and (best is None or value < best[0]):
                best = (value, directory)
    if best is None or best[0] >= physical:
        return MemoryLimit(physical, "physical", located.directory)
    return MemoryLimit(best[0], located.source, located.directory, best[1])


def _process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's RSS high-water mark: VmHWM, which restarts at exec, unlike ru_maxrss (a child
    inherits its forking parent's on Linux); ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _cgroup_value(root: Path, pick: Callable[[CgroupFiles], str]) -> int | None:
    located = own_memory_cgroup(root)
    if located is None:
        return None
    return read_int(located.directory / pick(located.files))


def current_usage(root: Path = Path("/")) -> int:
    """Bytes charged to our memory cgroup now (incl. page cache), else this process's RSS."""
    value = _cgroup_value(root, lambda files: files.usage)
    return value if value is not None else _process_rss()


def working_set(root: Path = Path("/")) -> int:
    """Bytes of our memory cgroup that cannot be reclaimed: usage minus inactive file pages, else our RSS."""
    located = own_memory_cgroup(root)
    value = None if located is None else working_set_of(located.directory, located.files)
    return value if value is not None else _process_rss()


def peak_usage(root: Path = Path("/")) -> int:
    """Highest usage of our memory cgroup so far (the cgroupfs peak file), else peak RSS."""
    value = _cgroup_value(root, lambda files: files.peak)
    return value if value is not None else peak_rss()


def working_set_at(origin: MemoryLimit) -> int:
    """The working set where the limit bites (an ancestor's limit counts its whole subtree), else our RSS."""
    if origin.source == "physical" or origin.limited_by is None:
        return _process_rss()
    value = working_set_of(origin.limited_by, FILES[origin.source])
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
        *,
        reclaim: Callable[[], None] | None = None,
    ) -> None:
        if limit < 0 or cap < 0 or baseline < 0:
            raise ValueError(f"MemoryBudget: limit={limit}, cap={cap}, baseline={baseline} must be >= 0")
        self.limit = limit
        self.cap = cap
        self.baseline = baseline
        self.origin = origin
        self._measure = measure
        self._reclaim = reclaim
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

        return cls(
            limit,
            cap=cap,
            baseline=min(measure(), limit),
            origin=origin,
            measure=measure,
            reclaim=release_free_heap,
        )

    def emptied(self) -> MemoryBudget:
        """A budget like this one — limit, cap, origin, baseline, how it re-measures and reclaims — holding
        no reservation."""
        with self._room:
            return MemoryBudget(
                self.limit,
                cap=self.cap,
                baseline=self.baseline,
                origin=self.origin,
                measure=self._measure,
                reclaim=self._reclaim,
            )

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
        """Whether `nbytes` fit now, re-measuring the baseline before saying no — and once more after
        giving free heap back to the kernel (lock held)."""
        if nbytes <= self._free():
            return True
        if not self._remeasure():
            return False
        if nbytes <= self._free():
            return True
        if self._reclaim is None:
            return False
        self._reclaim()
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
