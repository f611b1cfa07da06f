"""Attached cgroup cells: the caller starts the command (an MCP stdio client spawning its server)."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from gguf_sandbox.cgroupfs import read_int
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import CellCommand, RunResult
from gguf_sandbox.sandbox.cgroup.child import SHELL
from gguf_sandbox.sandbox.cgroup.control import CHILD_PREFIX
from gguf_sandbox.sandbox.cgroup.placement import Placement, cell_placement
from gguf_sandbox.sandbox.cgroup.process import (
    NOTE_PREFIX,
    OUTPUT_LIMIT,
    SAMPLE_INTERVAL,
    Chain,
    Sampler,
    cell_chain,
    setup_failure,
)
from gguf_sandbox.sandbox.isolation import (
    Jail,
    Tools,
)
from gguf_sandbox.sandbox.sampling import SampleWatcher

# The outer shell stays outside the cgroup and records the exit status the caller's process handle keeps to
# itself; the inner one writes the pid that enters the cell (a systemd scope is found through it), then execs
# the placement's command.
_STATUS_AND_PID = (
    'status=$1; pidfile=$2; shift 2; sh -c \'echo $$ > "$0"; exec "$@"\' "$pidfile" "$@"; '
    'rc=$?; echo "$rc" > "$status"; exit "$rc"'
)

ATTACH_POLL = 0.02
STATUS_WAIT = 0.5


def _process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    return not fields or fields[0] in ("Z", "X")


class LimitedCell:
    """A cgroup prepared for a process the caller starts with `command` (an AttachedCell)."""

    def __init__(
        self,
        placement: Placement,
        chain: Chain,
        *,
        scratch: Path,
        stderr: IO[str],
        memory_bytes: int,
        timeout: float,
        env: Mapping[str, str] | None,
        sample_interval: float,
        output_limit: int,
        watch: SampleWatcher | None = None,
    ) -> None:
        self._placement = placement
        self._status = scratch / "status"
        self._pidfile = scratch / "pid"
        self._memory = memory_bytes
        self._output_limit = output_limit
        self._started = time.monotonic()
        self.cell_chain = chain
        self.stderr = stderr
        setpriv = Tools.find().setpriv
        # The outer shell dies with the caller (the runner); the chain inside then dies with it.
        pdeathsig = (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()
        self.command = CellCommand(
            (
                *pdeathsig,
                SHELL,
                "-c",
                _STATUS_AND_PID,
                "sh",
                str(self._status),
                str(self._pidfile),
                *placement.command(chain.argv),
            ),
            None if env is None else dict(env),
        )
        self._timed_out = threading.Event()
        self._done = threading.Event()
        self._sampler = Sampler(placement, self._started, sample_interval, watch)
        self._watchdog = threading.Thread(
            target=self._watch, args=(timeout,), name="gguf-sandbox attach watchdog", daemon=True
        )
        self._result: RunResult | None = None
        self._sampler.start()
        self._watchdog.start()

    def _watch(self, timeout: float) -> None:
        """Attach a systemd scope once its pid is known; kill the cell at the wall-clock timeout."""
        deadline = self._started + timeout
        attached = False
        while not self._done.is_set():
            if not attached and (pid := read_int(self._pidfile)) is not None:
                self._placement.attach(pid)
                attached = True
            if time.monotonic() >= deadline:
                self._timed_out.set()
                self._placement.kill_all()
                return
            self._done.wait(ATTACH_POLL)

    def _exit_status(self) -> int | None:
        return read_int(self._status)

    def finish(self, grace: float = 5.0) -> RunResult:
        if self._result is not None:
            return self._result
        stop = time.monotonic() + grace
        pid = read_int(self._pidfile)
        gone_since: float | None = None
        # Without a status the outer shell was killed too (the caller's own cleanup): then waiting for the
        # cell's process to be gone is all there is to do.
        while pid is not None and self._exit_status() is None and time.monotonic() < stop:
            if _process_gone(pid):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > STATUS_WAIT:
                    break
            time.sleep(ATTACH_POLL)
        self._done.set()
        self._placement.kill_all()
        self._watchdog.join()
        duration = time.monotonic() - self._started
        timeline = self._sampler.stop()
        oom_kills = self._placement.oom_kills()
        peak = self._placement.peak()
        if peak is None:
            peak = timeline.peak_usage
        notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in (*self._placement.notes, *self.cell_chain.notes))
        self.stderr.flush()
        self.stderr.seek(0)
        stderr = self.stderr.read()
        if len(stderr) > self._output_limit:
            stderr = (
                f"[{len(stderr) - self._output_limit:,} characters cut]\n" + stderr[-self._output_limit :]
            )
        self._result = RunResult(
            exit_code=self._exit_status(),
            timed_out=self._timed_out.is_set(),
            oom_killed_flag=oom_kills > 0,
            oom_kill_count=oom_kills,
            peak_bytes=peak,
            limit_bytes=self._memory,
            duration_s=duration,
            stdout="",
            stderr=notes + stderr,
            timeline=timeline,
            isolation=self.cell_chain.isolation,
        )
        failure = setup_failure(self._result.exit_code, stderr)
        if failure is not None:
            raise SandboxError(f"{failure}; hint: run as root, or see which isolation this host lacks")
        return self._result

    def close(self) -> None:
        """Stop the helper threads (finish() if nobody did)."""
        self.finish(grace=0.0)


@contextlib.contextmanager
def attach_limited(
    argv: Sequence[str],
    memory_bytes: int,
    timeout: float,
    env: Mapping[str, str] | None = None,
    *,
    root: Path = Path("/"),
    sample_interval: float = SAMPLE_INTERVAL,
    output_limit: int = OUTPUT_LIMIT,
    pids_limit: int | None = None,
    jail: Jail | None = None,
    watch: SampleWatcher | None = None,
) -> Iterator[LimitedCell]:
    """A fresh memory cgroup (swap off) for `argv`, which the caller starts with the yielded cell's command.

    The caller owns the process (its stdin/stdout, e.g. an MCP client's stdio transport) and calls
    finish() once it has ended for the exit code, peak and OOM signals. On exit everything left in the
    cgroup is killed and the cgroup removed; exit codes are those of `argv` (the wrapper adds none).
    `pids_limit`, `jail` and `watch` as for run_limited.
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"attach_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr,
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
        cell = LimitedCell(
            placement,
            chain,
            scratch=Path(scratch),
            stderr=stderr,
            memory_bytes=memory_bytes,
            timeout=timeout,
            env=env,
            sample_interval=sample_interval,
            output_limit=output_limit,
            watch=watch,
        )
        try:
            yield cell
        finally:
            cell.close()
