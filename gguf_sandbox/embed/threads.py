"""The compute pool: a forward pass's pieces on the CPUs the process may use, each with single-threaded BLAS.

OpenBLAS's own threads spin between calls and split even a 25-token product in two, which costs more than it
gains on small GEMMs (issue #15: 2 BLAS threads were slower than 1 for a sentence). The engine instead splits
its work itself — output columns of a product, sequences and heads of attention — into tasks that a few
threads run, each calling single-threaded BLAS: numpy releases the GIL inside matmul, exp and the like.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Final

import numpy as np

from gguf_sandbox.cgroupfs import cpu_quota
from gguf_sandbox.embed.rows import F32, FLOAT_BYTES

Task = Callable[[], object]
# Each compute thread's scratch, kept for the thread's life: a decoded weight piece or GELU's temporaries
# need no fresh array (nor its page faults) per call, and no allocation the thread's malloc arena keeps.
SCRATCH_BYTES: Final = 1 << 19
_thread_scratch = threading.local()
# How numpy's bundled OpenBLAS builds name their thread setting: plain, 64-bit-integer and scipy-openblas.
BLAS_THREAD_SETTERS: Final = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
)


def thread_scratch() -> F32:
    """This thread's scratch (float32, SCRATCH_BYTES), allocated at its first use.

    One user at a time per thread: a caller writes it, uses it and drops its views before returning, and
    calls nothing that also takes it meanwhile (decoding a weight piece, GELU).
    """
    buffer: F32 | None = getattr(_thread_scratch, "buffer", None)
    if buffer is None:
        buffer = _thread_scratch.buffer = np.empty(SCRATCH_BYTES // FLOAT_BYTES, dtype=np.float32)
    return buffer


def usable_cpus(root: Path = Path("/")) -> int:
    """CPUs this process may run on: its affinity mask, cut to its cgroup's CPU quota (rounded down), ≥ 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def _loaded_blas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (numpy's bundled one once numpy is loaded)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in text.splitlines() if "openblas" in line.rsplit("/", 1)[-1].lower()}
    return sorted(p for p in paths if p.startswith("/"))


@functools.cache
def single_threaded_blas() -> bool:
    """Set numpy's OpenBLAS to one thread at run time (ctypes), once per process; True when it was set.

    False where numpy links another BLAS or the library exports no known setter: nothing changes then.
    """
    for path in _loaded_blas_libraries():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in BLAS_THREAD_SETTERS:
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setter(1)
                return True
    return False


class _Batch:
    """Tasks handed out one at a time to whichever thread asks next; done when each has finished."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self._tasks = tasks
        self._next = itertools.count()  # next() on a count is atomic under the GIL
        self._left = len(tasks)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        # numpy's floating-point error handling is per thread, and a forward pass sets its own (corrupt
        # weights overflow: the pass ignores that and refuses the result once, in words). Helpers apply
        # the caller's, or a hostile file's one-line error would follow warnings from the helpers' tasks.
        self._errors = np.geterr()

    def drain(self) -> None:
        while (index := next(self._next)) < len(self._tasks):
            try:
                self._tasks[index]()
            except BaseException as error:  # re-raised in the caller by run()
                self.error = self.error or error
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self._done.set()

    def help(self) -> None:
        """drain() in a helper thread, under the numpy error handling of the thread that made the batch."""
        with np.errstate(**self._errors):
            self.drain()

    def wait(self) -> None:
        """Wait until every task has finished, then drop them (and the arrays they reference): a helper
        that takes this batch off the queue later finds nothing to do."""
        self._done.wait()
        self._tasks = ()


class ComputePool:
    """`threads` threads for a forward pass: the caller's own plus threads - 1 helpers (daemons).

    run() hands a list of independent tasks to the caller and the helpers and returns when all have
    finished; a task may itself call run() (the caller drains what no helper took). With one thread
    every task runs in the caller, in order.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a compute pool needs at least 1 thread, got {threads}")
        self.threads = threads
        self._jobs: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._helpers = [
            threading.Thread(target=self._help, name=f"gguf-compute-{n}", daemon=True)
            for n in range(threads - 1)
        ]
        for helper in self._helpers:
            helper.start()

    def _help(self) -> None:
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            batch.help()
            del batch  # its arrays are the caller's to free: hold no reference while idle

    def run(self, tasks: Sequence[Task]) -> None:
        """Run every task (on up to `threads` threads at once); the first exception a task raised, if any."""
        if len(tasks) <= 1 or not self._helpers:
            for task in tasks:
                task()
            return
        batch = _Batch(tasks)
        for _ in range(min(len(self._helpers), len(tasks) - 1)):
            self._jobs.put(batch)
        batch.drain()
        batch.wait()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        """Stop the helpers once they finish what they run."""
        helpers, self._helpers = self._helpers, []
        for _ in helpers:
            self._jobs.put(None)
        for helper in helpers:
            helper.join()


SERIAL: Final = ComputePool(1)
_current: ContextVar[ComputePool] = ContextVar("compute_pool", default=SERIAL)


def current_pool() -> ComputePool:
    """The pool the running forward pass splits its work over (SERIAL outside use_pool())."""
    return _current.get()


@contextmanager
def use_pool(pool: ComputePool) -> Iterator[ComputePool]:
    """Run the forward passes inside the block on `pool` (per thread and context: concurrent callers may
    each use their own)."""
    token = _current.set(pool)
    try:
        yield pool
    finally:
        _current.reset(token)


def spans(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, total) cut into at most `parts` near-equal consecutive spans whose inner bounds are multiples of
    `align` (none empty)."""
    units = -(-total // align)
    parts = max(1, min(parts, units))
    bounds = [min(total, (units * k // parts) * align) for k in range(parts + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def weighted_spans(weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Indices [0, len(weights)) cut into at most `parts` consecutive non-empty spans of near-equal total
    weight: the k-th inner bound is where the running total comes nearest to k/parts of the whole."""
    if not weights:
        return []
    parts = max(1, min(parts, len(weights)))
    totals = list(itertools.accumulate(weights, initial=0))  # totals[i]: weight of [0, i)
    bounds = [0]
    for k in range(1, parts):
        target = totals[-1] * k / parts
        # Leave at least one index for this span and for each one after it.
        lowest, highest = bounds[-1] + 1, len(weights) - (parts - k)
        nearest = bisect.bisect_left(totals, target, lowest, highest + 1)
        candidates = [b for b in (nearest - 1, nearest) if lowest <= b <= highest] or [highest]
        bounds.append(min(candidates, key=lambda b: abs(totals[b] - target)))
    bounds.append(len(weights))
    return list(itertools.pairwise(bounds))
