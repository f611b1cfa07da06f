"""The qemu command line, the guest's markers, and the bounded boot (with a fake qemu)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.platform.qemu import Machine, boot, parse_markers, qemu_command


def _machine(tmp_path: Path, accel: str = "tcg") -> Machine:
    return Machine(
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        disks=((tmp_path / "root.img", True), (tmp_path / "run.img", False)),
        console_log=tmp_path / "console.log",
        output_log=tmp_path / "guest.log",
        memory_mib=2048,
        cpus=2,
        accel=accel,
    )


def test_command_has_no_network_disks_in_order_and_two_serial_ports(tmp_path: Path) -> None:
    argv = qemu_command(_machine(tmp_path))
    assert argv[:2] == ["qemu-system-x86_64", "-accel"]
    assert argv[argv.index("-nic") + 1] == "none"
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert drives == [
        f"file={tmp_path / 'root.img'},format=raw,if=virtio,snapshot=on",
        f"file={tmp_path / 'run.img'},format=raw,if=virtio",
    ]
    serials = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-serial"]
    assert serials == [f"file:{tmp_path / 'console.log'}", f"file:{tmp_path / 'guest.log'}"]
    assert argv[argv.index("-m") + 1] == "2048"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "-no-reboot" in argv
    assert "systemd.unified_cgroup_hierarchy=1" in argv[argv.index("-append") + 1]


def test_accelerators(tmp_path: Path) -> None:
    tcg = qemu_command(_machine(tmp_path, "tcg"))
    assert "tcg,thread=multi" in tcg
    assert tcg[tcg.index("-cpu") + 1] == "max"
    assert qemu_command(_machine(tmp_path, "kvm"))[1:3] == ["-accel", "kvm"]
    assert "-cpu" not in qemu_command(_machine(tmp_path, "kvm"))
    with pytest.raises(ValueError, match="accel"):
        qemu_command(_machine(tmp_path, "hvf"))


def test_markers_are_parsed_and_noise_ignored() -> None:
    text = "\n".join(
        [
            "[  1.0] kernel noise @@gguf-v2 step fake rc=9",
            "@@gguf-v2 fact controllers cpuset cpu io memory pids",
            "@@gguf-v2 begin pytest-root",
            "@@gguf-v2 step pytest-root rc=0 seconds=12",
            "@@gguf-v2 step matrix rc=1 seconds=40",
            "@@gguf-v2 step broken rc=x",
            "@@gguf-v2 exit 0",
            "@@gguf-v2 done",
        ]
    )
    report = parse_markers(text)
    assert report.facts == {"controllers": "cpuset cpu io memory pids"}
    assert report.steps == {"pytest-root": 0, "matrix": 1}
    assert report.seconds == {"pytest-root": 12, "matrix": 40}
    assert report.failed_steps == ["matrix"]
    assert report.exit == 0
    assert report.done


def test_markers_of_a_guest_that_never_finished() -> None:
    report = parse_markers("@@gguf-v2 begin pytest-root\n")
    assert not report.done
    assert report.exit is None
    assert report.steps == {}


def _fake_qemu(tmp_path: Path, body: str) -> str:
    """A script standing in for qemu: writes `body`'s output to the second -serial file, then sleeps."""
    script = tmp_path / "fake-qemu"
    script.write_text(
        "#!/bin/sh\n"
        'out=""; for arg; do case $arg in file:*guest.log) out=${arg#file:};; esac; done\n'
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _gone(pid_file: Path) -> bool:
    """The process is dead: absent, or a zombie nobody reaped yet (killed all the same)."""
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_boot_returns_qemus_status_and_the_report(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, 'printf "@@gguf-v2 step a rc=0\\n@@gguf-v2 done\\n" > "$out"; exit 0')
    outcome = boot(_machine(tmp_path), timeout=30, qemu=qemu, nice=0, out=open(os.devnull, "w"))  # noqa: SIM115
    assert outcome.returncode == 0
    assert outcome.killed is None
    assert outcome.report.done
    assert outcome.report.steps == {"a": 0}


def test_boot_kills_the_whole_group_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    qemu = _fake_qemu(tmp_path, f"sleep 300 & echo $! > {pid_file}; wait")
    began = time.monotonic()
    outcome = boot(_machine(tmp_path), timeout=1.5, qemu=qemu, nice=0, out=open(os.devnull, "w"))  # noqa: SIM115
    assert time.monotonic() - began < 20
    assert outcome.returncode is None
    assert outcome.killed is not None and "timeout" in outcome.killed
    assert _gone(pid_file)


def test_boot_kills_a_guest_that_does_not_power_off_after_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.platform.qemu.POWEROFF_GRACE_S", 1.0)
    qemu = _fake_qemu(tmp_path, 'echo "@@gguf-v2 done" > "$out"; exec sleep 300')
    outcome = boot(_machine(tmp_path), timeout=60, qemu=qemu, nice=0, out=open(os.devnull, "w"))  # noqa: SIM115
    assert outcome.killed is not None and "poweroff" in outcome.killed
    assert outcome.report.done


def test_boot_stops_the_vm_on_ctrl_c(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    qemu = _fake_qemu(tmp_path, f"sleep 300 & echo $! > {pid_file}; wait")
    interrupt = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            boot(_machine(tmp_path), timeout=60, qemu=qemu, nice=0, out=open(os.devnull, "w"))  # noqa: SIM115
    finally:
        interrupt.cancel()
    assert _gone(pid_file)
