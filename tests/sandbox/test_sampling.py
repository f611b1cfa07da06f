"""Tests for sandbox/sampling.py: bounded timelines that keep every peak, and the OOM-kill moment."""

from __future__ import annotations

import json

import pytest

from gguf_sandbox.sandbox.sampling import MAX_POINTS, MemorySample, Timeline, TimelineRecorder, downsample

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_downsampling_keeps_the_peak_and_the_time_order() -> None:
    samples = [MemorySample(i / 10, (i % 97) * MIB, (i % 89) * MIB) for i in range(10_000)]
    samples[4321] = MemorySample(432.1, 999 * MIB, 5 * MIB)
    kept = downsample(samples, 500)
    assert len(kept) <= 500
    assert [s.t_s for s in kept] == sorted(s.t_s for s in kept)
    peak = max(kept, key=lambda s: s.usage)
    assert (peak.t_s, peak.usage) == (432.1, 999 * MIB)
    assert max(s.working_set for s in kept) == 88 * MIB


def test_a_short_timeline_is_kept_as_it_is() -> None:
    samples = [MemorySample(0.0, MIB, MIB), MemorySample(0.1, 2 * MIB, MIB)]
    assert downsample(samples, 500) == tuple(samples)


def test_the_recorder_stays_bounded_and_evenly_spaced_over_a_long_cell(clock: FakeClock) -> None:
    recorder = TimelineRecorder(started=100.0, clock=clock)
    for i in range(50_000):  # 40 minutes at 50 ms
        clock.now = 100.0 + i * 0.05
        recorder.add(10 * MIB + (MIB if i == 31_337 else 0), 8 * MIB, 0)
    timeline = recorder.timeline()
    assert MAX_POINTS < len(timeline.samples) <= 2 * MAX_POINTS
    gaps = {round(b.t_s - a.t_s, 2) for a, b in zip(timeline.samples, timeline.samples[1:], strict=False)}
    assert len(gaps - {max(gaps)}) <= 2  # one stride, give or take the point at the peak
    assert timeline.peak_usage == 11 * MIB
    stored = timeline.to_json()["timeline"]
    assert len(stored) <= MAX_POINTS and max(point[1] for point in stored) == 11 * MIB


def test_the_first_rise_of_the_oom_counter_marks_the_kill(clock: FakeClock) -> None:
    recorder = TimelineRecorder(started=100.0, clock=clock)
    for t, kills in ((0.0, 0), (0.05, 0), (0.1, 1), (0.15, 2)):
        clock.now = 100.0 + t
        recorder.add(40 * MIB, 39 * MIB, kills)
    assert recorder.timeline().oom_kill_s == 0.1


def test_a_kill_before_the_first_reading_still_counts(clock: FakeClock) -> None:
    recorder = TimelineRecorder(started=100.0, clock=clock)
    clock.now = 100.2
    recorder.add(None, None, 1)  # the cgroup is empty by now: no usage, but the counter says it
    timeline = recorder.timeline()
    assert timeline == Timeline((), 0.2)


def test_working_set_never_exceeds_usage_and_missing_readings_are_skipped(clock: FakeClock) -> None:
    seen: list[MemorySample] = []
    recorder = TimelineRecorder(started=100.0, watch=seen.append, clock=clock)
    recorder.add(10 * MIB, None)
    recorder.add(10 * MIB, 12 * MIB)
    recorder.add(None, 5 * MIB)
    samples = recorder.timeline().samples
    assert [(s.usage, s.working_set) for s in samples] == [(10 * MIB, 10 * MIB)] * 2
    assert seen == list(samples)


def test_the_record_fields_are_plain_json() -> None:
    timeline = Timeline((MemorySample(0.05, 3 * MIB, 2 * MIB),), None)
    assert json.loads(json.dumps(timeline.to_json())) == {
        "timeline": [[0.05, 3 * MIB, 2 * MIB]],
        "oom_kill_s": None,
    }


def test_a_kill_no_sample_saw_is_put_at_the_end() -> None:
    seen = Timeline((MemorySample(0.1, MIB, MIB),), None)
    assert seen.killed_by_then(1.2345) == Timeline(seen.samples, 1.234)  # rounded like samples
    marked = Timeline(seen.samples, 0.5)
    assert marked.killed_by_then(1.2) is marked
