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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gguf_sandbox
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import (
    MODEL_PLACEHOLDER,
    PIDS_LIMIT,
    CellCommand,
    CellSpec,
    IsolationReport,
    RunResult,
)
from gguf_sandbox.sandbox.interpreters import Interpreter, find_interpreter, parse_version
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
from gguf_sandbox.sandbox.placement import (
    CHILD_PREFIX,
    SHELL,
    Placement,
    cell_placement,
    cgroups_writable,
    parse_scope_report,
    read_int,
    remove_stale_cgroups,
    systemd_scope_command,
)
from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS, ensure_venv, package_root

__all__ = [
    "CHILD_PREFIX",
    "CgroupSandbox",
    "LimitedCell",
    "attach_limited",
    "cgroups_writable",
    "parse_scope_report",
    "remove_stale_cgroups",
    "run_limited",
    "substitute_model",
    "systemd_scope_command",
]

SAMPLE_INTERVAL = 0.05
OUTPUT_LIMIT = 1 << 20
NOTE_PREFIX = "[gguf-sandbox] "
SETUP_FAILED_EXIT = 125


@dataclass(frozen=True)
class _Chain:
    """The exec chain that runs a child's argv, the isolation it gives, and notes on what it lacks."""

    argv: list[str]
    isolation: IsolationReport
    notes: tuple[str, ...]


def _chain(
    argv: Sequence[str],
    *,
    placement: Placement,
    scratch: Path,
    memory_bytes: int,
    timeout: float,
    jail: Jail | None,
) -> _Chain:
    deadline = timeout + DEADLINE_GRACE_S
    if jail is None:
        tools = Tools.find()
        notes = guard_notes(tools)
        if placement.pids_missing is not None:
            notes.append(f"no pids limit: {placement.pids_missing}")
        return _Chain(guard_command(argv, deadline=deadline, tools=tools), IsolationReport(), tuple(notes))
    support = jail_support()
    mountpoint = scratch / "root"
    mountpoint.mkdir()
    command = jail_command(
        argv, jail=jail, support=support, mountpoint=mountpoint, tmp_bytes=memory_bytes, deadline=deadline
    )
    report = support.report(pids_limit=placement.pids_missing)
    notes = guard_notes(support.tools)
    if report.missing:
        notes.append(report.describe())
    return _Chain(command, report, tuple(notes))


def _setup_failure(exit_code: int | None, stderr: str) -> str | None:
    """The jail's own setup error (a harness failure, not the cell's), if that is why the child ended."""
    if exit_code != SETUP_FAILED_EXIT:
        return None
    for line in stderr.splitlines():
        if line.startswith(SETUP_MARKER + " "):
            return line[len(SETUP_MARKER) + 1 :]
    return None


class _Sampler(threading.Thread):
    """Reads the cell's memory usage every `interval` seconds into (seconds since start, bytes)."""

    def __init__(self, placement: Placement, started: float, interval: float) -> None:
        super().__init__(name="gguf-sandbox sampler", daemon=True)
        self._placement = placement
        self._t0 = started
        self._interval = interval
        self._stop_event = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while True:
            value = self._placement.usage()
            if value is not None:
                self.samples.append((round(time.monotonic() - self._t0, 4), value))
            if self._stop_event.wait(self._interval):
                return

    def stop(self) -> tuple[tuple[float, int], ...]:
        self._stop_event.set()
        self.join()
        return tuple(self.samples)


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
) -> RunResult:
    """Run `argv` in a new memory cgroup limited to `memory_bytes` (swap off) for at most `timeout` s.

    The child's own failures (OOM kill, crash, timeout) are reported in the RunResult; SandboxError is
    raised only when the cgroup or the jail itself cannot be set up. The cgroup is removed in every case.
    `pids_limit` caps its tasks; `jail` isolates it (then it runs in its own /tmp and `cwd` is refused).
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"run_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    if jail is not None and cwd is not None:
        raise ValueError("run_limited: a jailed child runs in its own /tmp; cwd cannot be set")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        cell_placement(root, memory_bytes, Path(scratch) / "report", pids_limit=pids_limit) as placement,
    ):
        chain = _chain(
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
        )
    failure = _setup_failure(result.exit_code, result.stderr)
    if failure is not None:
        raise SandboxError(f"{failure}; hint: run as root, or see which isolation this host lacks")
    return result


def _run_placed(
    placement: Placement,
    chain: _Chain,
    *,
    memory_bytes: int,
    timeout: float,
    env: Mapping[str, str] | None,
    cwd: Path | str | None,
    sample_interval: float,
    output_limit: int,
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
        sampler: _Sampler | None = None
        try:
            placement.attach(process.pid)
            sampler = _Sampler(placement, started, sample_interval)
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
            samples = sampler.stop() if sampler is not None else ()
        placement.kill_all()
        # Peak and OOM counter vanish with the cgroup: read them first.
        oom_kills = placement.oom_kills()
        peak = placement.peak()
        if peak is None and samples:
            peak = max(value for _, value in samples)
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
            samples=samples,
            isolation=chain.isolation,
        )


def substitute_model(argv: Sequence[str], model: Path | None) -> tuple[str, ...]:
    """argv with MODEL_PLACEHOLDER replaced by the model path (refused when the cell has no model)."""
    if model is None:
        if any(MODEL_PLACEHOLDER in arg for arg in argv):
            raise SandboxError(f"argv {list(argv)} uses {MODEL_PLACEHOLDER} but the cell has no model")
        return tuple(argv)
    path = str(model.resolve())
    return tuple(arg.replace(MODEL_PLACEHOLDER, path) for arg in argv)


# The parent's interpreter settings must not leak into a cell running another Python version.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION", "PYTHONSTARTUP")
# All a jailed cell gets from the runner's environment (no tokens, no DOCKER_HOST, no paths into /root).
_PASSED_ENV = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
# A jailed cell's home and temp are its private /tmp; its package sources are read-only.
_JAIL_ENV = {"HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


class CgroupSandbox:
    """Runs cells as local jailed processes in a memory cgroup, with a cached venv per Python version."""

    name = "cgroup"

    def __init__(self, root: Path = Path("/"), cache: Path | None = None) -> None:
        self._root = root
        self._cache = cache
        self._found: dict[str, Interpreter | None] = {}
        self._venvs: dict[tuple[str, tuple[str, ...]], Interpreter] = {}
        self._lock = threading.Lock()

    def _interpreter(self, python: str) -> Interpreter | None:
        with self._lock:
            if python not in self._found:
                self._found[python] = find_interpreter(python)
            return self._found[python]

    def unavailable_reason(self, python: str) -> str | None:
        reason = cgroups_writable(self._root)
        if reason is not None:
            return reason
        try:
            parse_version(python)
        except ValueError as error:
            return str(error)
        if self._interpreter(python) is None:
            return f"no Python {python} found on PATH, in pyenv ($PYENV_ROOT, ~/.pyenv) or uv"
        return None

    def interpreter(self, python: str, requirements: Sequence[str] = ()) -> Interpreter:
        """The venv interpreter cells of `python` run with (built on first use), plus `requirements`."""
        base = self._interpreter(python)
        if base is None:
            raise SandboxError(f"no Python {python} interpreter; hint: install it with pyenv or uv")
        key = (python, tuple(requirements))
        with self._lock:
            if key not in self._venvs:
                venv = ensure_venv(base, (*RUNTIME_REQUIREMENTS, *requirements), cache=self._cache)
                _compile_package(venv)
                self._venvs[key] = venv
            return self._venvs[key]

    def child_env(self, interpreter: Interpreter, extra: Mapping[str, str]) -> dict[str, str]:
        """The cell's environment: a short allow-list of the runner's, the interpreter's, the spec's."""
        env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
        env.update(interpreter.env)
        env["PYTHONPATH"] = str(package_root(self._cache))
        env.update(_JAIL_ENV)
        env.update(extra)
        return env

    def jail(self, interpreter: Interpreter, model: Path | None, extra: Sequence[Path] = ()) -> Jail:
        """What a cell of `interpreter` may see, read-only and at their host paths: the venv and its base
        Python, the package, the model, and `extra` (host files its argv names)."""
        return Jail(
            (
                *_interpreter_paths(interpreter),
                package_root(self._cache),
                Path(gguf_sandbox.__file__).resolve().parent,
                *([model.resolve()] if model is not None else []),
                *(path.resolve() for path in extra),
            )
        )

    def _cell(self, spec: CellSpec) -> tuple[tuple[str, ...], dict[str, str], Jail]:
        interpreter = self.interpreter(spec.python, spec.requirements)
        argv = (str(interpreter.path), *substitute_model(spec.argv, spec.model))
        mounted = tuple(mount.source for mount in spec.mounts)
        return argv, self.child_env(interpreter, spec.env), self.jail(interpreter, spec.model, mounted)

    def run(self, spec: CellSpec) -> RunResult:
        argv, env, jail = self._cell(spec)
        return run_limited(
            argv, spec.memory, spec.timeout, env=env, root=self._root, pids_limit=PIDS_LIMIT, jail=jail
        )

    @contextlib.contextmanager
    def attach(self, spec: CellSpec) -> Iterator[LimitedCell]:
        """The cell as a command for a host-side client (AttachableSandbox); see attach_limited."""
        argv, env, jail = self._cell(spec)
        with attach_limited(
            argv, spec.memory, spec.timeout, env=env, root=self._root, pids_limit=PIDS_LIMIT, jail=jail
        ) as cell:
            yield cell


def _interpreter_paths(interpreter: Interpreter) -> list[Path]:
    """The venv, the prefix of the Python it was made from, and the library dirs it is started with."""
    venv = interpreter.path.parent.parent
    base = Path(os.path.realpath(interpreter.path)).parent.parent
    libraries = interpreter.env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    return [venv, base, *(Path(entry) for entry in libraries if entry)]


def _compile_package(interpreter: Interpreter) -> None:
    """Byte-compile the package for `interpreter` once: jailed cells cannot write __pycache__ themselves.

    Best effort — without it a cell compiles the modules it imports in memory, as before.
    """
    package = Path(gguf_sandbox.__file__).resolve().parent
    env = {**os.environ, **interpreter.env}
    for name in _DROPPED_ENV:
        env.pop(name, None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [str(interpreter.path), "-m", "compileall", "-q", str(package)],
            capture_output=True,
            env=env,
            timeout=300,
            check=False,
        )


# -- attached cells: the caller starts the command (e.g. an MCP stdio client spawning its server) ------------
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
        chain: _Chain,
        *,
        scratch: Path,
        stderr: IO[str],
        memory_bytes: int,
        timeout: float,
        env: Mapping[str, str] | None,
        sample_interval: float,
        output_limit: int,
    ) -> None:
        self._placement = placement
        self._status = scratch / "status"
        self._pidfile = scratch / "pid"
        self._memory = memory_bytes
        self._output_limit = output_limit
        self._started = time.monotonic()
        self._chain = chain
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
        self._sampler = _Sampler(placement, self._started, sample_interval)
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
        samples = self._sampler.stop()
        oom_kills = self._placement.oom_kills()
        peak = self._placement.peak()
        if peak is None and samples:
            peak = max(value for _, value in samples)
        notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in (*self._placement.notes, *self._chain.notes))
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
            samples=samples,
            isolation=self._chain.isolation,
        )
        failure = _setup_failure(self._result.exit_code, stderr)
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
) -> Iterator[LimitedCell]:
    """A fresh memory cgroup (swap off) for `argv`, which the caller starts with the yielded cell's command.

    The caller owns the process (its stdin/stdout, e.g. an MCP client's stdio transport) and calls
    finish() once it has ended for the exit code, peak and OOM signals. On exit everything left in the
    cgroup is killed and the cgroup removed; exit codes are those of `argv` (the wrapper adds none).
    `pids_limit` and `jail` as for run_limited.
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"attach_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr,
        cell_placement(root, memory_bytes, Path(scratch) / "report", pids_limit=pids_limit) as placement,
    ):
        chain = _chain(
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
        )
        try:
            yield cell
        finally:
            cell.close()
