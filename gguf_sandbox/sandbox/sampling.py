"""A cell's memory over time, as a backend samples it: usage and working set, bounded, and the OOM moment."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Called with each sample as it is read (a live progress line); must return quickly.
SampleWatcher = Callable[["MemorySample"], None]

# A record keeps at most this many points per cell: enough to see a ramp, a plateau and a kill, and small
# enough that the default matrix's results file grows by a few MB at most.
MAX_POINTS = 500


@dataclass(frozen=True)
class MemorySample:
    """Memory at one moment of a cell: seconds since it started, usage and working set in bytes."""

    t_s: float
    usage: int
    working_set: int

    def merged(self, other: MemorySample) -> MemorySample:
        """One point standing for both: the larger of each figure (a peak survives downsampling), at the
        moment of the larger usage."""
        t_s = self.t_s if self.usage >= other.usage else other.t_s
        return MemorySample(t_s, max(self.usage, other.usage), max(self.working_set, other.working_set))


@dataclass(frozen=True)
class Timeline:
    """What a backend saw of a cell's memory: samples in time order and when the OOM killer first struck."""

    samples: tuple[MemorySample, ...] = ()
    oom_kill_s: float | None = None

    def killed_by_then(self, end_s: float) -> Timeline:
        """This timeline for a cell the OOM killer struck: where no sample saw the counter rise (the
        cgroup vanished with the cell, as a container's does), the kill is the moment it ended."""
        return self if self.oom_kill_s is not None else Timeline(self.samples, round(end_s, 3))

    @property
    def peak_usage(self) -> int | None:
        return max((s.usage for s in self.samples), default=None)

    def to_json(self) -> dict[str, Any]:
        """The record fields: `timeline` as [[t_s, usage, working_set], …] (≤ MAX_POINTS) and `oom_kill_s`."""
        return {
            "timeline": [[s.t_s, s.usage, s.working_set] for s in downsample(self.samples, MAX_POINTS)],
            "oom_kill_s": self.oom_kill_s,
        }


def downsample(samples: Sequence[MemorySample], max_points: int) -> tuple[MemorySample, ...]:
    """At most `max_points` samples: neighbours merged pairwise (peaks kept) until they fit."""
    points = tuple(samples)
    while len(points) > max_points:
        points = _halved(points)
    return points


def _halved(points: Sequence[MemorySample]) -> tuple[MemorySample, ...]:
    pairs = [points[i].merged(points[i + 1]) for i in range(0, len(points) - 1, 2)]
    return (*pairs, points[-1]) if len(points) % 2 else tuple(pairs)


class TimelineRecorder:
    """Collects a cell's samples as they are read, in bounded memory at any duration.

    Past 2 × MAX_POINTS points the recorded ones are merged pairwise and each later point stands for
    twice as many readings, so spacing stays even and every peak is kept. `watch`, when given, sees each
    reading as it comes (the live progress line); `clock` is time.monotonic but in tests. One thread
    records; timeline() is read after it stopped.
    """

    def __init__(
        self,
        started: float,
        watch: SampleWatcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._started = started
        self._clock = clock
        self._watch = watch
        self._points: list[MemorySample] = []
        self._pending: MemorySample | None = None
        self._pending_count = 0
        self._stride = 1
        self._oom_kills = 0  # a cell's cgroup is new: its counter starts at 0
        self._oom_kill_s: float | None = None

    def add(self, usage: int | None, working_set: int | None, oom_kills: int | None = None) -> None:
        """One reading (None where the source could not tell); a rise of the OOM-kill counter marks now."""
        now = round(self._clock() - self._started, 3)
        if oom_kills is not None and oom_kills > self._oom_kills:
            self._oom_kills = oom_kills
            if self._oom_kill_s is None:
                self._oom_kill_s = now
        if usage is None:
            return
        sample = MemorySample(now, usage, min(working_set if working_set is not None else usage, usage))
        if self._watch is not None:
            self._watch(sample)
        self._pending = sample if self._pending is None else self._pending.merged(sample)
        self._pending_count += 1
        if self._pending_count < self._stride:
            return
        self._points.append(self._pending)
        self._pending, self._pending_count = None, 0
        if len(self._points) >= 2 * MAX_POINTS:
            self._points = list(_halved(self._points))
            self._stride *= 2

    def timeline(self) -> Timeline:
        points = [*self._points, *([self._pending] if self._pending is not None else [])]
        return Timeline(tuple(points), self._oom_kill_s)
