"""Tests for run_limited and CgroupSandbox: real children under real memory cgroups, cleaned up every time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.budget import DEFAULT_HEADROOM
from gguf_sandbox.cgroupfs import own_memory_cgroup
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellSpec, Sandbox
from gguf_sandbox.sandbox.cgroup import child, placement
from gguf_sandbox.sandbox.cgroup.backend import CgroupSandbox
from gguf_sandbox.sandbox.cgroup.child import remove_stale_cgroups
from gguf_sandbox.sandbox.cgroup.control import CHILD_PREFIX
from gguf_sandbox.sandbox.cgroup.process import run_limited

pytestmark = [pytest.mark.cgroup, pytest.mark.usefixtures("writable_cgroups")]

MiB = 1 << 20
PYTHON = sys.executable

# Reports, from inside the child, which cgroup it is in and the swap setting it sees there.
INSIDE = """
import json, pathlib
lines = dict(l.split(":", 2)[1:] for l in open("/proc/self/cgroup").read().splitlines())
if "memory" in lines:
    d = pathlib.Path("/sys/fs/cgroup/memory") / lines["memory"].lstrip("/")
    swap = d / "memory.memsw.limit_in_bytes"
else:
    d = pathlib.Path("/sys/fs/cgroup") / lines[""].lstrip("/")
    swap = d / "memory.swap.max"
print(json.dumps({"cgroup": d.name, "swap": swap.read_text().strip() if swap.exists() else None}))
"""


def _children() -> set[str]:
    """This test process's child cgroups (other suites may run cells under the same parent meanwhile)."""
    parent = own_memory_cgroup()
    assert parent is not None
    mine = f"{CHILD_PREFIX}{os.getpid()}-"
    return {entry.name for entry in parent.directory.iterdir() if entry.name.startswith(mine)}


@pytest.fixture(autouse=True)
def no_cgroup_left_behind() -> Iterator[None]:
    before = _children()
    yield
    assert _children() == before, "a child cgroup outlived its run"


@pytest.fixture
def direct_cgroups(tmp_path: Path) -> None:
    """Skip unless cells here get a child cgroup of ours, the path these tests take apart; without
    delegation on cgroup v2 (an unprivileged user, a systemd service) cells run in a systemd scope."""
    made = placement.direct_or_scope(Path("/"), 64 * MiB, tmp_path / "probe-report")
    try:
        if not isinstance(made, child.ChildCgroup):
            pytest.skip(f"cells run in a systemd scope here, not a child cgroup of ours: {made.notes}")
    finally:
        made.kill_all()
        made.remove()


def _gone(pid: int) -> bool:
    """Dead, or a zombie waiting for whichever init adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _py(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def test_child_over_the_limit_is_reported_oom_killed() -> None:
    limit = 64 * MiB
    result = run_limited(_py("data = b'x' * (200 << 20); print('survived')"), limit, timeout=30)
    assert result.exit_code in (137, -signal.SIGKILL) and result.killed_by_sigkill
    assert result.oom_kill_count >= 1 and result.oom_killed_flag
    assert not result.timed_out
    assert "survived" not in result.stdout
    assert result.peak_bytes is not None and 0.9 * limit <= result.peak_bytes <= limit
    assert result.limit_bytes == limit
    assert result.duration_s < 10


def test_child_under_the_limit_exits_zero_with_peak_and_samples() -> None:
    code = "import time; data = b'x' * (20 << 20); time.sleep(0.3); print(len(data))"
    result = run_limited(_py(code), 64 * MiB, timeout=30)
    assert (result.exit_code, result.stdout.strip()) == (0, str(20 * MiB))
    assert (result.oom_kill_count, result.oom_killed_flag, result.timed_out) == (0, False, False)
    assert result.peak_bytes is not None and 20 * MiB < result.peak_bytes < 64 * MiB
    samples = result.timeline.samples
    assert len(samples) >= 4
    times = [s.t_s for s in samples]
    assert times == sorted(times) and times[-1] <= result.duration_s + 0.1
    assert max(s.usage for s in samples) >= 20 * MiB
    assert all(s.usage <= result.peak_bytes for s in samples)
    # The 20 MiB are anonymous memory: working set, not reclaimable cache.
    assert max(s.working_set for s in samples) >= 20 * MiB
    assert all(s.working_set <= s.usage for s in samples)
    assert result.timeline.oom_kill_s is None


def test_an_oom_kill_is_on_the_timeline_at_its_moment() -> None:
    # A ramp of 1 MiB every 10 ms, so the samples (every 50 ms) see it climb to the limit.
    code = (
        "import time\nchunks = []\ntime.sleep(0.5)\nfor _ in range(200):\n"
        "    chunks.append(bytearray(1 << 20)); chunks[-1][::4096] = b'x' * 256; time.sleep(0.01)"
    )
    result = run_limited(_py(code), 48 * MiB, timeout=30)
    assert result.oom_kill_count >= 1
    kill = result.timeline.oom_kill_s
    assert kill is not None and 0.4 <= kill <= result.duration_s + 0.1
    assert max(s.usage for s in result.timeline.samples) >= 40 * MiB


def test_child_is_inside_its_cgroup_with_swap_off() -> None:
    limit = 48 * MiB
    result = run_limited(_py(INSIDE), limit, timeout=30)
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["cgroup"].startswith(f"{CHILD_PREFIX}{os.getpid()}-")
    parent = own_memory_cgroup()
    assert parent is not None
    if seen["swap"] is None:
        assert "swappiness=0" in result.stderr
    else:
        assert seen["swap"] == (str(limit) if parent.source == "cgroup1" else "0")


def test_timeout_kills_the_whole_cell() -> None:
    # A background child and one that left the process group (setsid) must die with the cell.
    code = (
        "import subprocess, sys, time\n"
        "a = subprocess.Popen(['sleep', '60'])\n"
        "b = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    result = run_limited(_py(code), 64 * MiB, timeout=1.0)
    assert time.monotonic() - started < 5
    assert result.timed_out and result.exit_code == -signal.SIGKILL
    assert result.oom_kill_count == 0
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


def test_failing_child_reports_exit_and_stderr() -> None:
    result = run_limited(_py("import sys; print('partial'); sys.exit('bad input: 3')"), 64 * MiB, timeout=30)
    assert result.exit_code == 1 and not result.timed_out and result.oom_kill_count == 0
    assert result.stdout.strip() == "partial"
    assert "bad input: 3" in result.stderr


def test_missing_program_is_a_result_not_an_exception() -> None:
    result = run_limited(["/nonexistent/program"], 64 * MiB, timeout=30)
    assert result.exit_code == 127


def test_output_is_capped_keeping_the_tail() -> None:
    code = "import sys\nfor i in range(40000): print('line', i, 'x' * 60)\nprint('LAST')"
    result = run_limited(_py(code), 64 * MiB, timeout=30, output_limit=64 * 1024)
    assert result.exit_code == 0
    assert result.stdout.startswith("[") and "bytes cut]" in result.stdout.splitlines()[0]
    assert result.stdout.rstrip().endswith("LAST")
    assert len(result.stdout) < 64 * 1024 + 100


def test_setup_exception_still_removes_the_cgroup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_limited(_py("pass"), 64 * MiB, timeout=30, cwd=tmp_path / "missing")


def test_keyboard_interrupt_kills_child_and_removes_cgroup(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    interrupt = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_limited(_py(code), 64 * MiB, timeout=30)
    interrupt.join()
    assert time.monotonic() - started < 5
    assert _gone(int(marker.read_text()))


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        run_limited([], 64 * MiB, timeout=1)
    with pytest.raises(ValueError):
        run_limited(["true"], 0, timeout=1)


@pytest.mark.usefixtures("direct_cgroups")
def test_stale_cgroups_of_dead_owners_are_removed() -> None:
    parent = own_memory_cgroup()
    assert parent is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = parent.directory / f"{CHILD_PREFIX}{dead.pid}-deadbeef"
    live = parent.directory / f"{CHILD_PREFIX}{os.getpid()}-cafe"
    stale.mkdir()
    live.mkdir()
    try:
        assert remove_stale_cgroups(parent) == [stale]
        assert not stale.exists() and live.exists()
    finally:
        live.rmdir()
        if stale.exists():
            stale.rmdir()


@pytest.mark.usefixtures("direct_cgroups")
def test_stale_cgroup_still_holding_processes_is_killed_and_removed() -> None:
    """A runner SIGKILLed mid-cell left its cell running in its cgroup: the sweep kills it, then rmdirs."""
    parent = own_memory_cgroup()
    assert parent is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = parent.directory / f"{CHILD_PREFIX}{dead.pid}-0ddba11"
    stale.mkdir()
    orphan = subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > "{stale}/cgroup.procs" && exec sleep 300'], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not (stale / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert remove_stale_cgroups(parent) == [stale]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert not stale.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        if stale.exists():
            stale.rmdir()


@pytest.mark.usefixtures("direct_cgroups")
def test_sigterm_during_cleanup_is_held_until_the_cgroup_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (a supervisor stopping the run) while the cell is torn down: the cgroup goes first."""
    made: list[Path] = []
    create = placement.direct_or_scope

    def recording_create(root: Path, limit: int, report: Path, **options: Any) -> Any:
        made_placement = create(root, limit, report, **options)
        assert isinstance(made_placement, child.ChildCgroup)
        made.append(made_placement.path)
        real_kill_all = made_placement.kill_all

        def kill_all_then_terminated(deadline: float = 5.0) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # a delivered SIGTERM would raise here, before the cgroup is removed
            real_kill_all(deadline)

        monkeypatch.setattr(made_placement, "kill_all", kill_all_then_terminated)
        return made_placement

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # what the runner's SIGTERM handler does

    monkeypatch.setattr(placement, "direct_or_scope", recording_create)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_limited(_py("pass"), 64 * MiB, timeout=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert made and not made[0].exists()


def test_pids_limit_caps_the_tasks_of_a_child() -> None:
    code = (
        "import threading\n"
        "stop = threading.Event(); started = 0\n"
        "try:\n"
        "    for _ in range(400):\n"
        "        threading.Thread(target=stop.wait, daemon=True).start(); started += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print(started)\n"
    )
    result = run_limited(_py(code), 128 * MiB, timeout=60, pids_limit=32)
    assert result.exit_code == 0, result.stderr
    assert int(result.stdout) < 32
    assert "no pids limit" not in result.stderr


# ---- CgroupSandbox ---------------------------------------------------------------------------------


def test_cgroup_sandbox_meets_the_protocol() -> None:
    sandbox = CgroupSandbox()
    assert isinstance(sandbox, Sandbox) and sandbox.name == "cgroup"
    assert "3.99" in (sandbox.unavailable_reason("3.99") or "")
    assert "expected '3.X'" in (sandbox.unavailable_reason("python3") or "")


CELL_PROBE = (
    "import sys, json, gguf_sandbox, numpy, gguf, psutil, yaml; "
    "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'argv': sys.argv[1:], "
    "'package': gguf_sandbox.__file__, 'prefix': sys.prefix}))"
)


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_cell_runs_in_each_python_version(python: str, tmp_path: Path) -> None:
    sandbox = CgroupSandbox()
    reason = sandbox.unavailable_reason(python)
    if reason is not None:
        pytest.skip(reason)
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    spec = CellSpec(
        cell_id=f"probe-{python}",
        backend="cgroup",
        python=python,
        memory=128 * MiB,
        argv=("-c", CELL_PROBE, MODEL_PLACEHOLDER),
        timeout=60,
        model=model,
        env={"GGUF_SANDBOX_CELL": "1"},
    )
    result = sandbox.run(spec)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == python
    assert report["argv"] == [str(model)]
    import gguf_sandbox

    assert Path(report["package"]).resolve() == Path(gguf_sandbox.__file__).resolve()
    assert Path(report["prefix"]) != Path(sys.prefix)
    assert result.peak_bytes is not None and 0 < result.peak_bytes < 128 * MiB


def test_budget_inside_a_cell_sees_the_cell_limit() -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    code = (
        "import json; from gguf_sandbox import budget; limit = budget.detect_limit(); "
        "memory = budget.MemoryBudget.detect(); "
        "print(json.dumps([limit.limit_bytes, limit.source, memory.baseline, memory.available]))"
    )
    spec = CellSpec("budget-probe", "cgroup", python, 96 * MiB, ("-c", code), timeout=60)
    result = CgroupSandbox().run(spec)
    assert result.exit_code == 0, result.stderr
    limit, source, baseline, available = json.loads(result.stdout)
    parent = own_memory_cgroup()
    assert parent is not None
    assert (limit, source) == (96 * MiB, parent.source)
    assert 0 < baseline < 48 * MiB
    assert available == 96 * MiB - DEFAULT_HEADROOM - baseline


@pytest.mark.usefixtures("direct_cgroups")
def test_interrupt_just_after_the_cgroup_is_made_leaves_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once the cgroup exists but before anyone owns it: held until an owner will remove it."""
    create = placement.direct_or_scope
    made: list[Path] = []

    def interrupted_create(root: Path, limit: int, report: Path, **options: Any) -> Any:
        made_placement = create(root, limit, report, **options)
        assert isinstance(made_placement, child.ChildCgroup)
        made.append(made_placement.path)
        os.kill(os.getpid(), signal.SIGINT)
        return made_placement

    monkeypatch.setattr(placement, "direct_or_scope", interrupted_create)
    with pytest.raises(KeyboardInterrupt):
        run_limited(_py("import time; time.sleep(60)"), 64 * MiB, timeout=30)
    assert made and not made[0].exists()


def test_peer_requirements_get_a_venv_of_their_own_installed_from_the_wheelhouse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gguf_sandbox.sandbox.cgroup import backend
    from gguf_sandbox.sandbox.interpreters import Interpreter
    from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS
    from gguf_sandbox.sandbox.wheelhouse import PEER_REQUIREMENTS

    base = Interpreter("3.12", Path("/opt/py/bin/python3.12"))
    built: list[tuple[Any, ...]] = []
    wheels = tmp_path / "wheels"
    wheels.mkdir()

    def ensure_wheels(python: Path, version: str, requirements: Any, cache: Any) -> Path:
        built.append(("wheels", python, version, tuple(requirements)))
        return wheels

    def ensure_venv(interpreter: Interpreter, requirements: Any, cache: Any, find_links: Any) -> Interpreter:
        built.append(("venv", tuple(requirements), tuple(find_links)))
        return Interpreter("3.12", tmp_path / f"venv{len(built)}" / "bin" / "python")

    monkeypatch.setattr(backend, "ensure_wheels", ensure_wheels)
    monkeypatch.setattr(backend, "ensure_venv", ensure_venv)
    monkeypatch.setattr(backend, "_compile_package", lambda interpreter: None)
    sandbox = CgroupSandbox(cache=tmp_path)
    monkeypatch.setattr(sandbox, "_interpreter", lambda python: base)
    plain = sandbox.interpreter("3.12")
    peers = sandbox.interpreter("3.12", PEER_REQUIREMENTS)
    assert plain != peers and sandbox.interpreter("3.12", PEER_REQUIREMENTS) == peers
    assert built[0] == ("venv", RUNTIME_REQUIREMENTS, ())
    assert built[1] == ("wheels", base.path, "3.12", PEER_REQUIREMENTS)
    assert built[2] == ("venv", (*RUNTIME_REQUIREMENTS, *PEER_REQUIREMENTS), (wheels,))
    assert len(built) == 3
