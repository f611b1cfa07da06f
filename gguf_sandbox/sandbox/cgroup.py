"""Local cgroup backend: run a child in a fresh memory cgroup with swap off, sample it, always clean up."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from gguf_sandbox.budget import MemoryCgroup, own_memory_cgroup
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellCommand, CellSpec, RunResult
from gguf_sandbox.sandbox.interpreters import Interpreter, find_interpreter, parse_version
from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS, cache_dir, ensure_venv, package_root

SAMPLE_INTERVAL = 0.05
OUTPUT_LIMIT = 1 << 20
CHILD_PREFIX = "gguf-sandbox-"
NOTE_PREFIX = "[gguf-sandbox] "

# The child joins the cgroup itself, then execs: it is inside before it allocates anything, and no Python
# code runs between fork and exec (preexec_fn is unsafe once the parent has threads).
_JOIN_AND_EXEC = 'echo $$ > "$1" || exit 125; shift; exec "$@"'
_SHELL = "/bin/sh"

_STALE_NAME = re.compile(rf"^{re.escape(CHILD_PREFIX)}(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class _Files:
    """The control files of one cgroup version, and the swap-off settings to write after the limit."""

    limit: str
    swap_limit: str
    swap_limit_value: str
    usage: str
    peak: str
    events: str
    kill: str | None


_FILES = {
    "cgroup1": _Files(
        limit="memory.limit_in_bytes",
        swap_limit="memory.memsw.limit_in_bytes",
        swap_limit_value="{limit}",
        usage="memory.usage_in_bytes",
        peak="memory.max_usage_in_bytes",
        events="memory.oom_control",
        kill=None,
    ),
    "cgroup2": _Files(
        limit="memory.max",
        swap_limit="memory.swap.max",
        swap_limit_value="0",
        usage="memory.current",
        peak="memory.peak",
        events="memory.events",
        kill="cgroup.kill",
    ),
}


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_counter(path: Path, key: str) -> int:
    """`key N` from a flat keyed file (memory.oom_control, memory.events); 0 when absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _unique_name() -> str:
    return f"{CHILD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pids(procs_file: Path) -> list[int]:
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_until_empty(procs_file: Path, deadline: float) -> None:
    """SIGKILL every process listed in `procs_file` until it is empty (new forks included)."""
    stop = time.monotonic() + deadline
    while (pids := _pids(procs_file)) and time.monotonic() < stop:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


class _Placement(Protocol):
    """Where a cell runs: a cgroup we create ourselves, or a transient systemd scope."""

    notes: list[str]

    def command(self, argv: Sequence[str]) -> list[str]:
        """The command to start so that `argv` runs inside the limited cgroup."""
        ...

    def attach(self, pid: int) -> None:
        """Called right after the start with the started pid."""
        ...

    def usage(self) -> int | None: ...

    def peak(self) -> int | None: ...

    def oom_kills(self) -> int: ...

    def kill_all(self, deadline: float = 5.0) -> None: ...

    def remove(self, deadline: float = 5.0) -> None: ...


class _ChildCgroup:
    """A fresh memory cgroup under ours: created with the limit set, killed empty and removed at the end."""

    def __init__(self, parent: MemoryCgroup, limit: int) -> None:
        self.files = _FILES[parent.source]
        self.parent = parent
        self.path = parent.directory / _unique_name()
        self.notes: list[str] = []
        try:
            self.path.mkdir()
        except OSError as error:
            raise SandboxError(
                f"cannot create cgroup {self.path}: {error}; hint: run as root or in a delegated cgroup"
            ) from error
        try:
            self._configure(limit)
        except OSError as error:
            self.remove()
            raise SandboxError(f"cannot set the memory limit of cgroup {self.path}: {error}") from error
        except BaseException:
            self.remove()
            raise

    def _configure(self, limit: int) -> None:
        limit_file = self.path / self.files.limit
        if not limit_file.exists() and self.parent.source == "cgroup2":
            # Fails (EBUSY) when our cgroup holds processes and is not the root: then systemd-run is needed.
            with contextlib.suppress(OSError):
                (self.parent.directory / "cgroup.subtree_control").write_text("+memory")
        if not limit_file.exists():
            raise SandboxError(
                f"cgroup {self.path} has no {self.files.limit}: the memory controller is not enabled for "
                "children of our cgroup; hint: enable it in cgroup.subtree_control or use systemd-run"
            )
        limit_file.write_text(str(limit))
        swap_file = self.path / self.files.swap_limit
        if swap_file.exists():
            swap_file.write_text(self.files.swap_limit_value.format(limit=limit))
        else:
            swappiness = self.path / "memory.swappiness"
            with contextlib.suppress(OSError):
                swappiness.write_text("0")
            self.notes.append(
                f"{self.files.swap_limit} absent (swap accounting off): set memory.swappiness=0 instead, "
                "swap may still hide an OOM"
            )
        # v2: on OOM kill the whole cell at once rather than one process of it.
        with contextlib.suppress(OSError):
            (self.path / "memory.oom.group").write_text("1")

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def command(self, argv: Sequence[str]) -> list[str]:
        return [_SHELL, "-c", _JOIN_AND_EXEC, "sh", str(self.procs_file), *argv]

    def attach(self, pid: int) -> None:
        """Nothing to do: the child joins the cgroup itself before exec."""

    def usage(self) -> int | None:
        return _read_int(self.path / self.files.usage)

    def peak(self) -> int | None:
        return _read_int(self.path / self.files.peak)

    def oom_kills(self) -> int:
        return _read_counter(self.path / self.files.events, "oom_kill")

    def pids(self) -> list[int]:
        return _pids(self.procs_file)

    def kill_all(self, deadline: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until it is empty (new forks included)."""
        if self.files.kill is not None and (self.path / self.files.kill).exists():
            with contextlib.suppress(OSError):
                (self.path / self.files.kill).write_text("1")
        _kill_until_empty(self.procs_file, deadline)

    def remove(self, deadline: float = 5.0) -> None:
        """rmdir, retrying while the kernel finishes tearing down killed tasks."""
        stop = time.monotonic() + deadline
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if error.errno != errno.EBUSY or time.monotonic() >= stop:
                    raise SandboxError(
                        f"cannot remove cgroup {self.path}: {error} (procs: {self.pids()}); "
                        "hint: kill the listed processes and rmdir it"
                    ) from error
            self.kill_all(deadline=0.1)
            time.sleep(0.02)


def remove_stale_cgroups(parent: MemoryCgroup) -> list[Path]:
    """Remove empty child cgroups left by gguf-sandbox processes that died (e.g. SIGKILLed pytest)."""
    removed: list[Path] = []
    try:
        entries = list(parent.directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE_NAME.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            entry.rmdir()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Inside a systemd scope the cell's cgroup disappears with its last process, so a small shell stays as
# the cell's parent and saves memory.peak and memory.events to the report file before exiting.
_RUN_AND_REPORT = (
    'report=$1; shift; "$@"; rc=$?; cg=; '
    "while IFS= read -r line; do case $line in 0::*) cg=${line#0::};; esac; done < /proc/self/cgroup; "
    '{ printf "peak "; cat "/sys/fs/cgroup$cg/memory.peak"; cat "/sys/fs/cgroup$cg/memory.events"; } '
    '> "$report" 2>/dev/null; exit $rc'
)
SCOPE_ATTACH_TIMEOUT = 10.0


def systemd_scope_command(
    unit: str, limit: int, report: Path, argv: Sequence[str], *, user: bool
) -> list[str]:
    """systemd-run argv placing `argv` in a transient scope with MemoryMax=`limit` and swap off."""
    return [
        "systemd-run",
        *(["--user"] if user else []),
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={unit}",
        "-p",
        f"MemoryMax={limit}",
        "-p",
        "MemorySwapMax=0",
        # Keep the reporting shell alive after an OOM kill instead of stopping the whole scope.
        "-p",
        "OOMPolicy=continue",
        "--",
        _SHELL,
        "-c",
        _RUN_AND_REPORT,
        "sh",
        str(report),
        *argv,
    ]


def parse_scope_report(text: str) -> tuple[int | None, int]:
    """(peak, oom_kill count) from the report the scope's shell wrote."""
    peak: int | None = None
    oom_kills = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "peak":
                peak = int(parts[1])
            elif parts[0] == "oom_kill":
                oom_kills = int(parts[1])
    return peak, oom_kills


class _SystemdScope:
    """cgroup v2 without delegation: `systemd-run --scope` creates and removes the limited cgroup."""

    def __init__(self, root: Path, limit: int, report: Path) -> None:
        self.root = root
        self.limit = limit
        self.report = report
        self.unit = _unique_name()
        self.user = os.geteuid() != 0
        self.path: Path | None = None
        self.notes: list[str] = []

    def command(self, argv: Sequence[str]) -> list[str]:
        return systemd_scope_command(self.unit, self.limit, self.report, argv, user=self.user)

    def attach(self, pid: int) -> None:
        """Find the scope's cgroup once systemd-run has moved itself there (it then execs the cell)."""
        stop = time.monotonic() + SCOPE_ATTACH_TIMEOUT
        while time.monotonic() < stop:
            try:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                break
            for line in lines:
                if line.startswith("0::") and line.endswith(f"/{self.unit}.scope"):
                    self.path = self.root / "sys/fs/cgroup" / line[3:].lstrip("/")
                    return
            time.sleep(0.005)
        self.notes.append(f"scope {self.unit}.scope not seen in /proc/{pid}/cgroup: no samples")

    def _file(self, name: str) -> Path | None:
        return None if self.path is None else self.path / name

    def usage(self) -> int | None:
        path = self._file("memory.current")
        return None if path is None else _read_int(path)

    def _report(self) -> tuple[int | None, int] | None:
        try:
            return parse_scope_report(self.report.read_text())
        except OSError:
            return None

    def peak(self) -> int | None:
        report = self._report()
        if report is not None and report[0] is not None:
            return report[0]
        path = self._file("memory.peak")
        return None if path is None else _read_int(path)

    def oom_kills(self) -> int:
        report = self._report()
        if report is not None:
            return report[1]
        path = self._file("memory.events")
        return 0 if path is None else _read_counter(path, "oom_kill")

    def kill_all(self, deadline: float = 5.0) -> None:
        procs = self._file("cgroup.procs")
        if procs is not None:
            _kill_until_empty(procs, deadline)

    def remove(self, deadline: float = 5.0) -> None:
        """systemd removes the scope once its last process is gone (--collect also when it failed)."""


def _direct_or_scope(root: Path, limit: int, report: Path) -> _Placement:
    """A child cgroup of ours when we may create one, else (cgroup v2) a systemd scope."""
    parent = own_memory_cgroup(root)
    if parent is None:
        raise SandboxError("no memory cgroup controller under /sys/fs/cgroup; hint: use the docker backend")
    try:
        remove_stale_cgroups(parent)
        return _ChildCgroup(parent, limit)
    except SandboxError as error:
        if parent.source != "cgroup2" or shutil.which("systemd-run") is None:
            raise
        direct_error = error
    placement = _SystemdScope(root, limit, report)
    placement.notes.append(f"running in a systemd scope: {direct_error}")
    return placement


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM until the block ends, so that a cgroup is never made without an owner.

    Only the main thread receives them as exceptions (and only it may set handlers); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda got, _: received.append(got)) for signum in _DEFERRED_SIGNALS
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


@contextlib.contextmanager
def _cell_placement(root: Path, limit: int, report: Path) -> Iterator[_Placement]:
    """A fresh placement for one cell: everything in it killed and it removed on exit, whatever happens.

    Creation runs with signals deferred and the name is bound before any can fire, so an interrupt at
    any moment leaves either no cgroup or one this block removes.
    """
    placement: _Placement | None = None
    try:
        with _signals_deferred():
            placement = _direct_or_scope(root, limit, report)
        yield placement
    finally:
        if placement is not None:
            placement.kill_all()
            placement.remove()


def cgroups_writable(root: Path = Path("/")) -> str | None:
    """None when run_limited can run a child under a memory limit here, else why not (a skip reason)."""
    parent = own_memory_cgroup(root)
    if parent is None:
        return "no memory cgroup controller mounted under /sys/fs/cgroup"
    try:
        probe = _ChildCgroup(parent, 64 << 20)
    except (SandboxError, OSError) as error:
        direct = f"{parent.source} memory cgroup {parent.directory} is not writable: {error}"
        if parent.source != "cgroup2" or shutil.which("systemd-run") is None:
            return direct
        return _scope_reason(direct)
    try:
        probe.remove()
    except SandboxError as error:
        return str(error)
    return None


def _scope_reason(direct: str) -> str | None:
    """None when `systemd-run --scope` with MemoryMax works (the v2 fallback), else both reasons."""
    command = systemd_scope_command(
        _unique_name(), 64 << 20, Path(os.devnull), ["true"], user=os.geteuid() != 0
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{direct}; systemd-run: {error}"
    if done.returncode != 0:
        return f"{direct}; systemd-run --scope failed: {done.stderr.strip()[-300:]}"
    return None


class _Sampler(threading.Thread):
    """Reads the cell's memory usage every `interval` seconds into (seconds since start, bytes)."""

    def __init__(self, placement: _Placement, started: float, interval: float) -> None:
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
) -> RunResult:
    """Run `argv` in a new memory cgroup limited to `memory_bytes` (swap off) for at most `timeout` s.

    The child's own failures (OOM kill, crash, timeout) are reported in the RunResult; SandboxError is
    raised only when the cgroup itself cannot be set up. The cgroup is removed in every case.
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"run_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        _cell_placement(root, memory_bytes, Path(scratch) / "report") as placement,
    ):
        return _run_placed(
            placement,
            argv,
            memory_bytes=memory_bytes,
            timeout=timeout,
            env=env,
            cwd=cwd,
            sample_interval=sample_interval,
            output_limit=output_limit,
        )


def _run_placed(
    placement: _Placement,
    argv: Sequence[str],
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
            placement.command(argv),
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
        notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in placement.notes)
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


class CgroupSandbox:
    """Runs cells as local processes in a memory cgroup, with a cached venv per Python version."""

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
                self._venvs[key] = ensure_venv(
                    base, (*RUNTIME_REQUIREMENTS, *requirements), cache=self._cache
                )
            return self._venvs[key]

    def child_env(self, interpreter: Interpreter, extra: Mapping[str, str]) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
        env.update(interpreter.env)
        env["PYTHONPATH"] = str(package_root(self._cache or cache_dir()))
        env.update(extra)
        return env

    def run(self, spec: CellSpec) -> RunResult:
        interpreter = self.interpreter(spec.python, spec.requirements)
        argv = (str(interpreter.path), *substitute_model(spec.argv, spec.model))
        return run_limited(
            argv, spec.memory, spec.timeout, env=self.child_env(interpreter, spec.env), root=self._root
        )

    @contextlib.contextmanager
    def attach(self, spec: CellSpec) -> Iterator[LimitedCell]:
        """The cell as a command for a host-side client (AttachableSandbox); see attach_limited."""
        interpreter = self.interpreter(spec.python, spec.requirements)
        argv = (str(interpreter.path), *substitute_model(spec.argv, spec.model))
        with attach_limited(
            argv, spec.memory, spec.timeout, env=self.child_env(interpreter, spec.env), root=self._root
        ) as cell:
            yield cell


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
        placement: _Placement,
        argv: Sequence[str],
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
        self.stderr = stderr
        self.command = CellCommand(
            (
                _SHELL,
                "-c",
                _STATUS_AND_PID,
                "sh",
                str(self._status),
                str(self._pidfile),
                *placement.command(argv),
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
            if not attached and (pid := _read_int(self._pidfile)) is not None:
                self._placement.attach(pid)
                attached = True
            if time.monotonic() >= deadline:
                self._timed_out.set()
                self._placement.kill_all()
                return
            self._done.wait(ATTACH_POLL)

    def _exit_status(self) -> int | None:
        return _read_int(self._status)

    def finish(self, grace: float = 5.0) -> RunResult:
        if self._result is not None:
            return self._result
        stop = time.monotonic() + grace
        pid = _read_int(self._pidfile)
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
        notes = "".join(f"{NOTE_PREFIX}{note}\n" for note in self._placement.notes)
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
        )
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
) -> Iterator[LimitedCell]:
    """A fresh memory cgroup (swap off) for `argv`, which the caller starts with the yielded cell's command.

    The caller owns the process (its stdin/stdout, e.g. an MCP client's stdio transport) and calls
    finish() once it has ended for the exit code, peak and OOM signals. On exit everything left in the
    cgroup is killed and the cgroup removed; exit codes are those of `argv` (the wrapper adds none).
    """
    if memory_bytes <= 0 or timeout <= 0 or not argv:
        raise ValueError(f"attach_limited: memory_bytes={memory_bytes}, timeout={timeout}, argv={argv!r}")
    with (
        tempfile.TemporaryDirectory(prefix=CHILD_PREFIX) as scratch,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr,
        _cell_placement(root, memory_bytes, Path(scratch) / "report") as placement,
    ):
        cell = LimitedCell(
            placement,
            argv,
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
