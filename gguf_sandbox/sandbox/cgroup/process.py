"""Local cgroup backend: run a child in a fresh memory cgroup with swap off, sample it, always clean up.

Cells of CgroupSandbox are also jailed (sandbox/isolation.py): nobody, private namespaces, a read-only
root holding only their interpreter, package and model, and a pids limit. Every child, jailed or not,
dies with the runner and at its own deadline even when the runner is gone (parent-death signal,
`timeout`), and the reaper (sandbox/reaper.py) removes its cgroups if the runner is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import IsolationReport, RunResult
from gguf_sandbox.sandbox.cgroup.control import CHILD_PREFIX
from gguf_sandbox.sandbox.cgroup.placement import Placement, cell_placement
from gguf_sandbox.sandbox.isolation import (
    DEADLINE_GRACE_S,
    SETUP_MARKER,
    Jail,
    Tools,
    guard_command,
    guard_notes,
    jail_command,
    jail_support,
)
from gguf_sandbox.sandbox.sampling import SampleWatcher, Timeline, TimelineRecorder

SAMPLE_INTERVAL = 0.05
OUTPUT_LIMIT = 1 << 20
NOTE_PREFIX = "[gguf-sandbox] "
SETUP_FAILED_EXIT = 125


@dataclass(frozen=True)
class Chain:
    """The exec chain that runs a child's argv, the isolation it gives, and notes on what it lacks."""

    argv: list[str]
    isolation: IsolationReport
    notes: tuple[str, ...]


def cell_chain(
    argv: Sequence[str],
    *,
    placement: Placement,
    scratch: Path,
    memory_bytes: int,
    timeout: float,
    jail: Jail | None,
) -> Chain:
    deadline = timeout + DEADLINE_GRACE_S
    if jail is None:
        tools = Tools.find()
        notes = guard_notes(tools)
        if placement.pids_missing is not None:
            notes.append(f"no pids limit: {placement.pids_missing}")
        command = guard_command(argv, deadline=deadline, tools=tools, cgroup=placement.cell_cgroup())
        return Chain(command, IsolationReport(), tuple(notes))
    support = jail_support()
    mountpoint = scratch / "root"
    mountpoint.mkdir()
    command = jail_command(
        argv,
        jail=jail,
        support=support,
        mountpoint=mountpoint,
        tmp_bytes=memory_bytes,
        deadline=deadline,
        cgroup=placement.cell_cgroup(),
    )
    report = support.report(pids_limit=placement.pids_missing)
    notes = guard_notes(support.tools, unjailed=not support.jails)
    if report.missing:
        notes.append(report.describe())
    return Chain(command, report, tuple(notes))


def setup_failure(exit_code: int | None, stderr: str) -> str | None:
    """The jail's own setup error (a harness failure, not the cell's), if that is why the child ended."""
    if exit_code != SETUP_FAILED_EXIT:
        return None
    for line in stderr.splitlines():
        if line.startswith(SETUP_MARKER + " "):
            return line[len(SETUP_MARKER) + 1 :]
    return None


class Sampler(threading.Thread):
    """Reads the cell's usage, working set and OOM-kill count every `interval` seconds into a Timeline."""

    def __init__(
        self, placement: Placement, started: float, interval: float, watch: SampleWatcher | None = None
    ) -> None:
        super().__init__(name="gguf-sandbox sampler", daemon=True)
        self._placement = placement
        self._interval = interval
        self._stop_event = threading.Event()
        self._recorder = TimelineRecorder(started, watch)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._read()
            self._stop_event.wait(self._interval)
        self._read()  # once more at the end: an OOM kill just before it is counted by now

    def _read(self) -> None:
        placement = self._placement
        self._recorder.add(placement.usage(), placement.working_set(), placement.oom_kills())

    def stop(self) -> Timeline:
        self._stop_event.set()
        self.join()
        return self._recorder.timeline()


def _tail(stream: IO[bytes], limit: int) -> str:
    """The last `limit` bytes of a stream, marking what was cut (reports and tracebacks come last)."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(size - limit, 0))
    text = stream.read().decode("utf-8", errors="replace")
    return f"[{size - limit:,} bytes cut]\n{text}" if size > limit else text


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def run_limited(
    argv: Sequence[str],
    memory_bytes: int,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    *,
    root: Path = Path("/"),
    sample_interval: float = SAMPLE_INTERVAL,
    output_limit: int = OUTPUT_LIMIT,
    pids_limit: int | None = None,
    jail: Jail | None = None,
    watch: SampleWatcher | None = None,
) -> RunResult:
    """Run `argv` in a new memory cgroup limited to `memory_bytes` (swap off) for at most `timeout` s.

    The child's own failures (OOM kill, crash, timeout) are reported in the RunResult; SandboxError is
    raised only when the cgroup or the jail itself cannot be set up. The cgroup is removed in every case.
    `pids_limit` caps its tasks; `jail` isolates it (then it runs in its own /tmp and `cwd` is refused);
    `watch` sees each memory sample as it is taken.
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"run_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    if jail is not None and cwd is not None:
        raise ValueError("run_limited: a jailed child runs in its own /tmp; cwd cannot be set")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        cell_placement(root, memory_bytes, Path(scratch) / "report", pids_limit=pids_limit) as placement,
    ):
        chain = cell_chain(
            argv,
            placement=placement,
            scratch=Path(scratch),
            memory_bytes=memory_bytes,
            timeout=timeout,
            jail=jail,
        )
        result = _run_placed(
            placement,
            chain,
            memory_bytes=memory_bytes,
            timeout=timeout,
            env=env,
            cwd=cwd,
            sample_interval=sample_interval,
            output_limit=output_limit,
            watch=watch,
        )
    failure = setup_failure(result.exit_code, result.stderr)
    if failure is not None:
        raise SandboxError(f"{failure}; hint: run as root, or see which isolation this host lacks")
    return result


def _run_placed(
    placement: Placement,
    chain: Chain,
    *,
    memory_bytes: int,
    timeout: float,
    env: Mapping[str, str] | None,
    cwd: Path | str | None,
    sample_interval: float,
    output_limit: int,
    watch: SampleWatcher | None,
) -> RunResult:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(
            placement.command(chain.argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = False
        sampler: Sampler | None = None
        try:
            placement.attach(process.pid)
            sampler = Sampler(placement, started, sample_interval, watch)
            sampler.start()
            process.wait(max(timeout - (time.monotonic() - started), 0.001))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Also reached on KeyboardInterrupt: nothing of the cell may outlive this call.
            if process.poll() is None:
                _kill_group(process)
                placement.kill_all()
            process.wait()
            duration = time.monotonic() - started
            timeline = sampler.stop() if sampler is not None else Timeline()
        placement.kill_all()
        # Peak and OOM counter vanish with the cgroup: read them first.
        oom_kills = placement.oom_kills()
        peak = placement.peak()
        if peak is None:
            peak = timeline.peak_usage
        notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in (*placement.notes, *chain.notes))
        return RunResult(
            exit_code=process.returncode,
            timed_out=timed_out,
            oom_killed_flag=oom_kills > 0,
            oom_kill_count=oom_kills,
            peak_bytes=peak,
            limit_bytes=memory_bytes,
            duration_s=duration,
            stdout=_tail(out, output_limit),
            stderr=notes + _tail(err, output_limit),
            timeline=timeline,
            isolation=chain.isolation,
        )


# -- attached cells: the caller starts the command (e.g. an MCP stdio client spawning its server) ------------
