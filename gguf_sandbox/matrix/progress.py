"""What `run` prints while cells run: one line per cell, and on a terminal a live status line below them."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from gguf_sandbox.sandbox.sampling import MemorySample

MIB = 1 << 20
# A status line redrawn more often than this only flickers.
REDRAW_INTERVAL_S = 0.25
CLEAR_LINE = "\r\x1b[K"


class Progress:
    """One line per cell: `[ 3/40] id … verdict peak/limit (time)`, the start written before the run
    (logs and CI show which cell is running)."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.width = len(str(total))

    def prefix(self, index: int, cell_id: str) -> str:
        return f"[{index:>{self.width}}/{self.total}] {cell_id} … "

    def start(self, index: int, cell_id: str, limit: int = 0) -> None:
        self.out.write(self.prefix(index, cell_id))
        self.out.flush()

    def finish(self, text: str, *, ran: bool = True) -> None:
        """The cell's result (`ran`: False for a cell taken from a previous run or skipped)."""
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def watch(self, sample: MemorySample) -> None:
        """A memory sample of the running cell: plain output shows none."""

    def close(self) -> None:
        """The run is over (or interrupted): leave the terminal as plain lines."""


class LiveProgress(Progress):
    """On a terminal: each finished cell's line, and under it a status line redrawn in place —
    `[ 3/40] id … 41/64M · 1:23 elapsed · ~4:56 left` — with the running cell's memory against its limit.

    The time left is the estimated seconds of the cells to go (`estimates`, one per cell), scaled by how
    long the cells run so far took against their own estimates. Samples arrive on a backend's thread.
    """

    def __init__(
        self,
        out: TextIO,
        estimates: Sequence[float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(out, len(estimates))
        self._estimates = list(estimates)
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._current: tuple[int, str, int] | None = None  # index, cell id, limit
        self._cell_started = self._started
        self._usage: int | None = None
        self._spent = 0.0  # seconds in cells that ran
        self._estimated_spent = 0.0  # what those cells were estimated to take
        self._drawn_at = float("-inf")
        self._closed = False

    def start(self, index: int, cell_id: str, limit: int = 0) -> None:
        with self._lock:
            self._current = (index, cell_id, limit)
            self._cell_started = self._clock()
            self._usage = None
            self._draw()

    def finish(self, text: str, *, ran: bool = True) -> None:
        with self._lock:
            if self._current is not None:
                index, cell_id, _ = self._current
                if ran:
                    self._spent += self._clock() - self._cell_started
                    self._estimated_spent += self._estimates[index - 1]
                self.out.write(CLEAR_LINE + self.prefix(index, cell_id) + text + "\n")
                self._current = (index + 1, "", 0) if index < self.total else None
            else:
                self.out.write(CLEAR_LINE + text + "\n")
            self._draw()

    def note(self, text: str) -> None:
        with self._lock:
            self.out.write(CLEAR_LINE + text + "\n")
            self._draw()

    def watch(self, sample: MemorySample) -> None:
        with self._lock:
            self._usage = sample.usage
            if self._clock() - self._drawn_at >= REDRAW_INTERVAL_S:
                self._draw()

    def close(self) -> None:
        with self._lock:
            self._current = None
            self.out.write(CLEAR_LINE)
            self.out.flush()
            self._closed = True

    def status(self) -> str:
        """The status line as it would be drawn now (without control characters)."""
        now = self._clock()
        parts = []
        if self._current is not None and self._current[1]:
            index, cell_id, limit = self._current
            memory = (
                f"{self._usage / MIB:.0f}/{limit / MIB:.0f}M" if self._usage is not None and limit else "…"
            )
            parts.append(f"{self.prefix(index, cell_id)}{memory}")
        parts.append(f"{_clock_text(now - self._started)} elapsed")
        left = self.seconds_left(now)
        if left is not None:
            parts.append(f"~{_clock_text(left)} left")
        return " · ".join(parts)

    def seconds_left(self, now: float) -> float | None:
        """The estimate of the time the run still needs; None before there is anything to go by."""
        if self._current is None:
            return 0.0
        index = self._current[0]
        scale = self._spent / self._estimated_spent if self._estimated_spent > 0 else 1.0
        running = self._estimates[index - 1] * scale - (now - self._cell_started) if self._current[1] else 0.0
        ahead = sum(self._estimates[index:]) if self._current[1] else sum(self._estimates[index - 1 :])
        return max(running, 0.0) + ahead * scale

    def _draw(self) -> None:
        if self._closed:
            return
        line = self.status()
        columns = _columns(self.out)
        self.out.write(CLEAR_LINE + (line if len(line) < columns else line[: columns - 2] + "…"))
        self.out.flush()
        self._drawn_at = self._clock()


def make_progress(out: TextIO, estimates: Sequence[float]) -> Progress:
    """Live on an interactive terminal, plain lines otherwise (logs, CI, pipes, TERM=dumb)."""
    interactive = getattr(out, "isatty", lambda: False)() and os.environ.get("TERM", "dumb") != "dumb"
    return LiveProgress(out, estimates) if interactive else Progress(out, len(estimates))


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _columns(out: TextIO) -> int:
    """The terminal's width; 80 when it does not say (a pty nobody sized reports 0)."""
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 80
    return columns if columns > 0 else 80
