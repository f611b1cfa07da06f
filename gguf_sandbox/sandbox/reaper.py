"""The reaper: a process that outlives a killed runner and removes the cells it left behind.

A runner that is SIGKILLed (or crashes hard) runs no `finally`: its cell's processes, cgroups and containers
would stay. So each runner process starts one reaper lazily (`python -m gguf_sandbox.sandbox.reaper`) in
a session of its own, tells it over a pipe what it creates (`+cgroup PATH`, `+docker LABEL=VALUE`) and
what it removed itself (`-cgroup PATH`), and holds the pipe's only write end. The pipe reaches EOF when
the runner exits for any reason, SIGKILL included; the reaper then kills and removes everything still
registered and exits. A runner that ended cleanly has nothing registered left, so that costs nothing.

Owner tokens (`owner_token`, `owner_gone`) let a later run recognise cells whose runner is gone even when
the reaper could not act (it was killed too, the machine lost power): that is the sweep at start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import gguf_sandbox
from gguf_sandbox import log
from gguf_sandbox.sandbox.cgroup.control import remove_cgroup

LOG = log.get(__name__)

CGROUP = "cgroup"
DOCKER = "docker"
_KINDS = (CGROUP, DOCKER)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is the state (field 3): a zombie has finished, whoever reaps it.
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def owner_token(pid: int | None = None) -> str:
    """Who owns a cell: host, boot, pid and the pid's start time (so a reused pid is not mistaken)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{process_start_time(pid) or 0}"


def owner_gone(token: str) -> bool | None:
    """True when the token's process has ended, False while it runs, None when it is not ours to judge.

    Only tokens of this host and this boot are judged: another machine sharing a Docker engine, or a
    malformed label, is never taken for a dead owner.
    """
    parts = token.split("/")
    if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    host, boot, pid, started = parts
    if host != socket.gethostname() or boot != _boot_id():
        return None
    return process_start_time(int(pid)) != int(started)


class Guard:
    """The runner's side: starts the reaper on first use and keeps it told (thread-safe, fork-aware)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._watched: dict[str, None] = {}
        self.failure: str | None = None

    def watch(self, kind: str, value: str) -> None:
        """Have the reaper remove `value` (a cgroup path, a docker LABEL=VALUE) if this process dies."""
        self._update(f"+{kind} {value}", add=True)

    def forget(self, kind: str, value: str) -> None:
        """`value` was removed by its owner: the reaper need not look at it."""
        self._update(f"-{kind} {value}", add=False)

    def _update(self, line: str, *, add: bool) -> None:
        if "\n" in line:
            raise ValueError(f"reaper: a registration is one line: {line!r}")
        with self._lock:
            if add and line in self._watched and self._alive():
                return
            if add:
                self._watched[line] = None
            else:
                self._watched.pop("+" + line[1:], None)
            for _ in range(2):
                stream = self._stream()
                if stream is None:
                    return
                try:
                    stream.write(line.encode() + b"\n")
                    stream.flush()
                    return
                except OSError:
                    self._process = None  # the reaper died: start another, told everything again

    def _alive(self) -> bool:
        return self._process is not None and self._pid == os.getpid() and self._process.poll() is None

    def _stream(self) -> IO[bytes] | None:
        if self._process is not None and self._alive():
            return self._process.stdin
        self._pid = os.getpid()
        package_parent = str(Path(gguf_sandbox.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        try:
            # A session of its own: Ctrl-C at the terminal or a kill of the runner's group spares it.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gguf_sandbox.sandbox.reaper", "--owner", str(self._pid)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as error:
            self.failure = f"cannot start the reaper ({error}): cells of a killed run stay until the next run"
            self._process = None
            return None
        stream = self._process.stdin
        if stream is None:
            return None
        with contextlib.suppress(OSError):
            for watched in self._watched:
                stream.write(watched.encode() + b"\n")
            stream.flush()
        return stream

    @property
    def pid(self) -> int | None:
        """The running reaper's pid (tests kill it to play a lost reaper)."""
        with self._lock:
            return None if self._process is None else self._process.pid


GUARD = Guard()


# -- the reaper process ---------------------------------------------------------------------------------


def _reap_cgroup(path: Path) -> str | None:
    if not path.exists():
        return None
    remove_cgroup(path)
    return f"cgroup {path}"


def _reap_docker(label: str) -> list[str]:
    try:
        import docker

        client = docker.from_env()
    except Exception:  # no SDK or no engine: nothing we could remove
        return []
    removed = []
    try:
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
                removed.append(f"container {container.name}")
    except Exception:  # the engine went away meanwhile
        pass
    finally:
        client.close()
    return removed


def reap(registrations: Sequence[str]) -> list[str]:
    """Remove every still-registered cell; what was removed, for the one-line note."""
    removed: list[str] = []
    for line in registrations:
        kind, _, value = line[1:].partition(" ")
        try:
            if kind == CGROUP:
                what = _reap_cgroup(Path(value))
                removed += [what] if what else []
            elif kind == DOCKER:
                removed += _reap_docker(value)
        except Exception as error:  # one failure must not keep the others alive
            LOG.warning("[gguf-sandbox] reaper: %s %s: %s", kind, value, error)
    return removed


def read_registrations(stream: IO[bytes]) -> list[str]:
    """Read `+kind value` / `-kind value` lines until EOF; the ones added and not removed, in order."""
    live: dict[str, None] = {}
    for raw in stream:
        if not raw.endswith(b"\n"):
            break  # a line cut by the runner's death is not a registration
        line = raw.decode(errors="replace").rstrip("\n")
        if len(line) < 2 or line[0] not in "+-" or line[1:].partition(" ")[0] not in _KINDS:
            continue
        if line[0] == "+":
            live["+" + line[1:]] = None
        else:
            live.pop("+" + line[1:], None)
    return list(live)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gguf_sandbox.sandbox.reaper")
    parser.add_argument("--owner", type=int, required=True, help="pid of the runner (for the note)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    removed = reap(read_registrations(sys.stdin.buffer))
    if removed:
        print(
            f"[gguf-sandbox] runner {args.owner} ended without cleaning up; removed " + ", ".join(removed),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
