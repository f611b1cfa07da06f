"""Tests for matrix/progress.py: plain lines for logs, a live status line (memory, time left) on a TTY."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_sandbox.matrix.progress import CLEAR_LINE, LiveProgress, Progress, make_progress
from gguf_sandbox.sandbox.sampling import MemorySample

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def live(estimates: list[float]) -> tuple[LiveProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return LiveProgress(out, estimates, clock=clock), out, clock


def test_the_status_line_shows_the_running_cell_against_its_limit() -> None:
    progress, out, clock = live([10.0, 10.0])
    progress.start(1, "cgroup-py3.12-64m-embed", 64 * MIB)
    clock.now = 1.0
    progress.watch(MemorySample(1.0, 41 * MIB, 40 * MIB))
    assert progress.status() == "[1/2] cgroup-py3.12-64m-embed … 41/64M · 0:01 elapsed · ~0:19 left"
    assert out.getvalue().endswith(CLEAR_LINE + progress.status())


def test_time_left_is_scaled_by_how_the_finished_cells_compared_with_their_estimates() -> None:
    progress, _, clock = live([10.0, 10.0, 10.0])
    progress.start(1, "a", 64 * MIB)
    clock.now = 20.0  # twice its estimate
    progress.finish("pass 30/64M (20.0s)")
    progress.start(2, "b", 64 * MIB)
    clock.now = 25.0
    # b: 2 × 10 s expected, 5 s in → 15 s; c: 2 × 10 s.
    assert progress.seconds_left(clock.now) == pytest.approx(35.0)
    assert "~0:35 left" in progress.status() and "0:25 elapsed" in progress.status()


def test_resumed_and_skipped_cells_do_not_skew_the_estimate() -> None:
    progress, _, clock = live([10.0, 10.0, 10.0])
    progress.start(1, "a")
    progress.finish("pass 30/64M (resumed)", ran=False)
    progress.start(2, "b")
    assert progress.seconds_left(clock.now) == pytest.approx(20.0)


def test_finished_cells_stay_as_plain_lines_above_the_status_line() -> None:
    progress, out, clock = live([1.0, 1.0])
    progress.start(1, "a", 64 * MIB)
    progress.note("reference a-ref …")
    clock.now = 1.5
    progress.finish("pass 30/64M (1.5s)")
    progress.start(2, "b", 64 * MIB)
    progress.finish("oom 64/64M (0.4s)  UNEXPECTED")
    lines = [line.rsplit(CLEAR_LINE, 1)[-1] for line in out.getvalue().split("\n")]
    assert lines[:3] == [
        "reference a-ref …",
        "[1/2] a … pass 30/64M (1.5s)",
        "[2/2] b … oom 64/64M (0.4s)  UNEXPECTED",
    ]
    assert lines[3].endswith("~0:00 left")
    progress.close()
    progress.note("the grids")  # nothing is drawn once closed
    assert out.getvalue().endswith(CLEAR_LINE + "the grids\n")


def test_a_status_line_wider_than_the_terminal_is_cut() -> None:
    progress, out, _ = live([1.0])
    progress.start(1, "x" * 300, 64 * MIB)
    drawn = out.getvalue().rsplit(CLEAR_LINE, 1)[-1]
    assert len(drawn) < 80 and drawn.endswith("…")


@pytest.mark.parametrize(
    ("stream", "term", "kind"),
    [(io.StringIO(), "xterm", Progress), (Terminal(), "xterm", LiveProgress), (Terminal(), "dumb", Progress)],
    ids=["pipe", "terminal", "dumb-terminal"],
)
def test_live_only_on_an_interactive_terminal(
    stream: io.StringIO, term: str, kind: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERM", term)
    assert type(make_progress(stream, [1.0])) is kind


def test_plain_progress_writes_the_cell_before_it_runs() -> None:
    out = io.StringIO()
    progress = Progress(out, 12)
    progress.start(3, "a", 64 * MIB)
    assert out.getvalue() == "[ 3/12] a … "
    progress.watch(MemorySample(0.1, MIB, MIB))
    progress.finish("pass 1/64M (0.1s)")
    assert out.getvalue() == "[ 3/12] a … pass 1/64M (0.1s)\n"


MATRIX = """\
version: 1
pythons: ["{python}"]
memory: [64m]
backends: [cgroup]
timeout: 60
workloads:
  slow:
    command: ["-c", "import time; b = bytearray(24 << 20); b[::4096] = b'x' * 6144; time.sleep(2)"]
"""


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_run_on_a_terminal_draws_the_running_cells_memory(tmp_path: Path) -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(MATRIX.format(python=python))
    primary, secondary = pty.openpty()
    argv = [sys.executable, "-m", "gguf_sandbox", "run", str(matrix), "--backend", "cgroup"]
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "200"}
    process = subprocess.Popen(
        [*argv, "--results", str(tmp_path / "r.jsonl")],
        stdin=secondary,
        stdout=secondary,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    # Redrawn in place while the cell ran, with its memory (≥ 24 MiB of 64) and the clock.
    statuses = [part for part in text.split(CLEAR_LINE) if "elapsed" in part and "/64M" in part]
    assert statuses, text
    assert any(int(part.split(" … ")[1].split("/")[0]) >= 24 for part in statuses if " … " in part)
    assert f"cgroup-py{python}-64m-slow … pass" in text
