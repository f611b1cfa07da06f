"""Booting the guest: the qemu command line, a run bounded by a deadline, and the guest's serial markers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

MARKER = "@@gguf-v2"
# After the guest says it is done it powers itself off; past this grace period the VM is killed.
POWEROFF_GRACE_S = 60.0
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Machine:
    """What to boot and with how much: disks in order (vda, vdb, …); `snapshot` disks are never written."""

    kernel: Path
    initrd: Path
    disks: tuple[tuple[Path, bool], ...]  # (image, snapshot)
    console_log: Path
    output_log: Path
    memory_mib: int = 3072
    cpus: int = 2
    accel: str = "tcg"
    cpu: str = "max"  # the CPU model TCG emulates (with KVM: the host's)
    append: str = "root=/dev/vda rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1"


def qemu_command(machine: Machine, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The qemu argv: no network, no display, no reboot; ttyS0 → console log, ttyS1 → guest output log."""
    if machine.accel not in ("tcg", "kvm"):
        raise ValueError(f"accel {machine.accel!r}: expected tcg or kvm")
    accel = (
        ["-accel", "tcg,thread=multi", "-cpu", machine.cpu] if machine.accel == "tcg" else ["-accel", "kvm"]
    )
    drives: list[str] = []
    for image, snapshot in machine.disks:
        options = f"file={image},format=raw,if=virtio" + (",snapshot=on" if snapshot else "")
        drives += ["-drive", options]
    return [
        qemu,
        *accel,
        "-smp",
        str(machine.cpus),
        "-m",
        str(machine.memory_mib),
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-kernel",
        str(machine.kernel),
        "-initrd",
        str(machine.initrd),
        "-append",
        machine.append,
        *drives,
        "-serial",
        f"file:{machine.console_log}",
        "-serial",
        f"file:{machine.output_log}",
        "-nic",
        "none",
    ]


@dataclass
class GuestReport:
    """What the guest said through its markers: each step's exit status, its own exit, whether it finished."""

    steps: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, int] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    exit: int | None = None
    done: bool = False

    @property
    def failed_steps(self) -> list[str]:
        return [name for name, status in self.steps.items() if status != 0]


def parse_markers(text: str) -> GuestReport:
    """Read `@@gguf-v2 …` lines: `step NAME rc=N seconds=S`, `fact NAME VALUE…`, `exit N`, `done`."""
    report = GuestReport()
    for line in text.splitlines():
        if not line.startswith(MARKER + " "):
            continue
        words = line[len(MARKER) + 1 :].split()
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if kind == "step" and rest:
            values = dict(word.split("=", 1) for word in rest[1:] if "=" in word)
            with contextlib.suppress(KeyError, ValueError):
                report.steps[rest[0]] = int(values["rc"])
            with contextlib.suppress(KeyError, ValueError):
                report.seconds[rest[0]] = int(values["seconds"])
        elif kind == "fact" and rest:
            report.facts[rest[0]] = " ".join(rest[1:])
        elif kind == "exit" and len(rest) == 1 and rest[0].lstrip("-").isdigit():
            report.exit = int(rest[0])
        elif kind == "done":
            report.done = True
    return report


@dataclass(frozen=True)
class RunOutcome:
    """How the VM ended: qemu's exit status (None when killed), whether we killed it and why."""

    returncode: int | None
    killed: str | None
    seconds: float
    report: GuestReport


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM qemu's process group, SIGKILL it if it lingers (it runs in its own session)."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class _Tail(threading.Thread):
    """Copies new lines of the guest output log to `out` while the VM runs."""

    def __init__(self, path: Path, out: TextIO, prefix: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.out = out
        self.prefix = prefix
        self.stop = threading.Event()

    def run(self) -> None:
        position = 0
        pending = b""
        while True:
            stopping = self.stop.is_set()
            with contextlib.suppress(OSError), self.path.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position += len(chunk)
                pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.out.write(self.prefix + line.decode(errors="replace").rstrip("\r") + "\n")
            self.out.flush()
            if stopping:
                return
            self.stop.wait(0.5)


def boot(
    machine: Machine,
    timeout: float,
    *,
    qemu: str = "qemu-system-x86_64",
    out: TextIO = sys.stdout,
    nice: int = 10,
) -> RunOutcome:
    """Boot `machine`, stream its output, and return once it powered off — or kill it at `timeout`, on
    Ctrl-C (then re-raised) or POWEROFF_GRACE_S after its done marker. qemu never outlives this call."""
    machine.output_log.write_bytes(b"")
    machine.console_log.write_bytes(b"")
    argv = ["nice", "-n", str(nice), *qemu_command(machine, qemu)] if nice else qemu_command(machine, qemu)
    started = time.monotonic()
    tail = _Tail(machine.output_log, out, "[guest] ")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    tail.start()
    killed: str | None = None
    done_at: float | None = None
    try:
        while process.poll() is None:
            now = time.monotonic()
            if now - started > timeout:
                killed = f"timeout after {timeout:.0f} s"
                break
            if done_at is None and parse_markers(_read(machine.output_log)).done:
                done_at = now
            if done_at is not None and now - done_at > POWEROFF_GRACE_S:
                killed = f"no poweroff {POWEROFF_GRACE_S:.0f} s after the done marker"
                break
            time.sleep(0.5)
    except BaseException:
        _kill_group(process)
        raise
    finally:
        if process.poll() is None:
            _kill_group(process)
        tail.stop.set()
        tail.join(timeout=5)
    return RunOutcome(
        returncode=None if killed else process.returncode,
        killed=killed,
        seconds=time.monotonic() - started,
        report=parse_markers(_read(machine.output_log)),
    )


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log (for one-line errors with context)."""
    return _read(path).splitlines()[-count:]


def describe(argv: Sequence[str]) -> str:
    return " ".join(argv)
