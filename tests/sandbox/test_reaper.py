"""No orphan cells: a runner killed with SIGKILL mid-cell leaves no process, cgroup or container behind."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gguf_sandbox.cgroupfs import own_memory_cgroup
from gguf_sandbox.sandbox import reaper
from gguf_sandbox.sandbox.cgroup.control import CHILD_PREFIX, own_v1_cgroup
from gguf_sandbox.sandbox.cgroup.placement import cell_placement
from gguf_sandbox.sandbox.cgroup.scope import SystemdScope
from gguf_sandbox.sandbox.isolation import DEADLINE_GRACE_S
from gguf_sandbox.sandbox.reaper import owner_gone, owner_token, read_registrations
from tests.sandbox.waiting import wait_for

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
PROJECT = Path(__file__).resolve().parents[2]
# Well inside every cell's timeout below: what the runner leaves must be gone by then.
GONE_WITHIN_S = 30.0
CELL_TIMEOUT_S = 120.0
# A hung runner's cell: time to start (a jail, a Python; seconds under QEMU's TCG), then its deadline.
HUNG_CELL_TIMEOUT_S = 8.0

# A runner in a child process: one cell on the given backend, a long sleep with a marked grandchild
# that leaves the cell's process group (the hardest to catch).
DRIVER = """
import sys
from gguf_sandbox.sandbox.base import CellSpec
from gguf_sandbox.sandbox.{module} import {cls}
if {unjailed!r}:  # the route of a host without namespaces or chroot, on any host
    from gguf_sandbox.sandbox import isolation
    from gguf_sandbox.sandbox.cgroup import process
    process.jail_support = lambda: isolation.JailSupport(isolation.Tools.find(), "none", "forced by the test")
code = (
    "import subprocess, time; "
    "subprocess.Popen(['sleep', sys.argv[1]], start_new_session=True); "
    "time.sleep(3600)"
)
spec = CellSpec(cell_id={cell_id!r}, backend={backend!r}, python={python!r}, memory=64 << 20,
                argv=("-c", "import sys; " + code, {marker!r}), timeout={timeout!r})
{cls}().run(spec)
"""


# ---------------------------------------------------------------------------------------------------------
# Pure parts


def test_registrations_are_what_was_added_and_not_removed() -> None:
    stream = io.BytesIO(
        b"+cgroup /a\n+docker org.x=1\n+cgroup /b\n-cgroup /a\n+unknown z\nnonsense\n+cgroup /cut-off"
    )
    assert read_registrations(stream) == ["+docker org.x=1", "+cgroup /b"]


def test_owner_tokens_tell_live_dead_and_foreign_owners() -> None:
    assert owner_gone(owner_token()) is False
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_gone(owner_token(dead.pid)) is True
    host, boot, pid, started = owner_token().split("/")
    assert owner_gone(f"{host}/{boot}/{pid}/{int(started) + 1}") is True  # the pid was reused
    assert owner_gone(f"another-host/{boot}/{pid}/{started}") is None
    assert owner_gone(f"{host}/another-boot/{pid}/{started}") is None
    assert owner_gone("garbage") is None


# ---------------------------------------------------------------------------------------------------------
# A killed runner, for real


def _processes_with(marker: str, *, besides: int = 0) -> list[int]:
    """Host pids but ours and `besides` whose command line carries `marker` (cells in pid namespaces too)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with_marker = any(marker in part for part in process.info["cmdline"] or ())
        with contextlib.suppress(psutil.Error):
            if (
                with_marker
                and process.pid not in (os.getpid(), besides)
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process.pid)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _reaper_of(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children()
    return next(c for c in children if "gguf_sandbox.sandbox.reaper" in " ".join(c.cmdline()))


class Runner:
    """A driver process running one marked cell; the test kills it (and maybe its reaper) mid-cell."""

    def __init__(
        self, backend: str, module: str, cls: str, timeout: float = CELL_TIMEOUT_S, *, unjailed: bool = False
    ) -> None:
        self.cell_id = f"test-orphan-{uuid.uuid4().hex[:10]}"
        # A sleep length no other process has: how the cell's processes are found from the host.
        self.marker = f"{3000 + int(uuid.uuid4().int % 500)}.{uuid.uuid4().int % 10**6:06d}"
        code = DRIVER.format(
            module=module,
            cls=cls,
            cell_id=self.cell_id,
            backend=backend,
            python=PYTHON,
            marker=self.marker,
            timeout=timeout,
            unjailed=unjailed,
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=PROJECT, stderr=subprocess.PIPE, start_new_session=True
        )

    def cell_processes(self) -> list[int]:
        """The cell's processes: those carrying the marker, but the driver (its code names it too)."""
        return _processes_with(self.marker, besides=self.process.pid)

    def escaped(self) -> list[int]:
        """The cell's grandchild that left its process group: it exists once the cell has fully started."""
        return [pid for pid in self.cell_processes() if _cmdline(pid) == ["sleep", self.marker]]

    def wait_until_running(self, started: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 180
        while not (started() and self.escaped()):
            if self.process.poll() is not None:
                raise AssertionError(self.process.stderr.read() if self.process.stderr else "driver died")
            assert time.monotonic() < deadline, "the cell never started"
            time.sleep(0.2)

    def kill(self, *, with_reaper: bool = False) -> None:
        if with_reaper:
            _reaper_of(self.process.pid).kill()
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """After a failed test: nothing of this runner may disturb the next one."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in _processes_with(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@functools.cache
def _in_scopes() -> bool:
    """Whether cells here go to systemd scopes (cgroup v2 without delegation: systemd names and removes
    their cgroups) rather than to child cgroups of ours."""
    with (
        tempfile.TemporaryDirectory() as scratch,
        cell_placement(Path("/"), 64 << 20, Path(scratch) / "report") as placed,
    ):
        return isinstance(placed, SystemdScope)


def _cell_cgroups_of(pid: int) -> bool:
    """Whether the runner `pid` made its cell's cgroups (in a scope: systemd did, nothing to see)."""
    return _in_scopes() or bool(_cgroups_of(pid))


def _cgroups_of(pid: int) -> list[Path]:
    parent = own_memory_cgroup()
    assert parent is not None
    places = [parent.directory, *([p] if (p := own_v1_cgroup("pids")) is not None else [])]
    prefix = f"{CHILD_PREFIX}{pid}-"
    return [entry for place in places for entry in place.iterdir() if entry.name.startswith(prefix)]


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for runner in made:
        runner.close()


# The host's own route (jailed where it can be), and the unjailed one a host without namespaces takes.
ROUTES = pytest.mark.parametrize("unjailed", [False, True], ids=["host-route", "unjailed"])


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@ROUTES
@pytest.mark.parametrize("with_reaper", [False, True], ids=["runner-killed", "runner-and-reaper-killed"])
def test_cgroup_cell_of_a_killed_runner_leaves_nothing(
    runners: list[Runner], with_reaper: bool, unjailed: bool
) -> None:
    if with_reaper and _in_scopes():
        pytest.skip("a cell in a systemd scope has no reaper: this is the runner-killed case")
    runner = Runner("cgroup", "cgroup.backend", "CgroupSandbox", unjailed=unjailed)
    runners.append(runner)
    runner.wait_until_running(lambda: _cell_cgroups_of(runner.process.pid))
    runner.kill(with_reaper=with_reaper)
    wait_for(lambda: not runner.cell_processes(), GONE_WITHIN_S, "the cell outlived its runner")
    if _in_scopes():
        return  # systemd removes an emptied scope
    if not with_reaper:
        wait_for(lambda: not _cgroups_of(runner.process.pid), GONE_WITHIN_S, "the reaper left a cgroup")
        return
    # Nobody was left to remove the (now empty) cgroups: the next run sweeps them before its first cell.
    from gguf_sandbox.sandbox.cgroup.process import run_limited

    assert _cgroups_of(runner.process.pid)
    assert run_limited(["true"], 64 << 20, timeout=30).exit_code == 0
    assert not _cgroups_of(runner.process.pid)


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@ROUTES
def test_cgroup_cell_of_a_hung_runner_dies_at_its_own_deadline(runners: list[Runner], unjailed: bool) -> None:
    """A stopped runner can neither time the cell out nor die: the cell's own deadline ends it."""
    runner = Runner(
        "cgroup", "cgroup.backend", "CgroupSandbox", timeout=HUNG_CELL_TIMEOUT_S, unjailed=unjailed
    )
    runners.append(runner)
    runner.wait_until_running(lambda: _cell_cgroups_of(runner.process.pid))
    runner.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: not runner.cell_processes(),
            HUNG_CELL_TIMEOUT_S + DEADLINE_GRACE_S + GONE_WITHIN_S,
            "the cell outlived its own deadline",
        )
    finally:
        runner.kill()


def _containers(label: str) -> list[Any]:
    from gguf_sandbox.sandbox.docker.engine import engine_client

    client = engine_client()
    try:
        return list(client.containers.list(all=True, filters={"label": label}, ignore_removed=True))
    finally:
        client.close()


@pytest.fixture(scope="module")
def docker_ready() -> None:
    """The cell image exists before a driver needs it (a build would outlast the test's patience)."""
    from gguf_sandbox.sandbox.docker.backend import DockerSandbox

    reason = DockerSandbox().unavailable_reason(PYTHON)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
@pytest.mark.parametrize("with_reaper", [False, True], ids=["runner-killed", "runner-and-reaper-killed"])
def test_docker_cell_of_a_killed_runner_leaves_nothing(runners: list[Runner], with_reaper: bool) -> None:
    from gguf_sandbox.sandbox.docker.backend import CELL_LABEL, DockerSandbox

    runner = Runner("docker", "docker.backend", "DockerSandbox")
    runners.append(runner)
    label = f"{CELL_LABEL}={runner.cell_id}"
    runner.wait_until_running(lambda: any(c.status == "running" for c in _containers(label)))
    runner.kill(with_reaper=with_reaper)
    if not with_reaper:
        wait_for(lambda: not _containers(label), GONE_WITHIN_S, "the container outlived its runner")
        assert not runner.cell_processes()
        return
    # Nobody was left to remove the container: the next run sweeps it when it first reaches the engine.
    assert _containers(label)
    sandbox = DockerSandbox()
    assert sandbox.unavailable_reason(PYTHON) is None
    assert not _containers(label)
    assert any(runner.cell_id in name for name in sandbox.swept)
    wait_for(lambda: not runner.cell_processes(), GONE_WITHIN_S, "the cell outlived its container")


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
def test_docker_cell_of_a_hung_runner_stops_at_its_own_deadline(runners: list[Runner]) -> None:
    from gguf_sandbox.sandbox.docker.backend import CELL_LABEL

    runner = Runner("docker", "docker.backend", "DockerSandbox", timeout=HUNG_CELL_TIMEOUT_S)
    runners.append(runner)
    label = f"{CELL_LABEL}={runner.cell_id}"
    runner.wait_until_running(lambda: any(c.status == "running" for c in _containers(label)))
    runner.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: all(c.status != "running" for c in _containers(label)),
            HUNG_CELL_TIMEOUT_S + DEADLINE_GRACE_S + GONE_WITHIN_S,
            "the container outlived its own deadline",
        )
        assert not runner.cell_processes()
    finally:
        runner.kill()
    wait_for(lambda: not _containers(label), GONE_WITHIN_S, "the reaper left the stopped container")


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
def test_sweep_spares_containers_of_live_owners_and_other_hosts() -> None:
    import docker

    from gguf_sandbox.sandbox.docker.backend import OWNER_LABEL, remove_stale_containers
    from gguf_sandbox.sandbox.docker.engine import engine_client
    from gguf_sandbox.sandbox.docker.names import image_tag

    client = engine_client()
    dead = subprocess.Popen(["true"])
    dead.wait()
    _, boot, _, _ = owner_token().split("/")
    owners = {
        "live": owner_token(),
        "dead": owner_token(dead.pid),
        "foreign": f"not-{socket.gethostname()}/{boot}/{dead.pid}/1",
    }
    made = {}
    try:
        for what, token in owners.items():
            made[what] = client.containers.create(
                image_tag(PYTHON),
                command=["python", "-c", "pass"],
                name=f"gguf-sandbox-test-sweep-{what}-{uuid.uuid4().hex[:8]}",
                labels={OWNER_LABEL: token},
                network_mode="none",
            )
        swept = remove_stale_containers(client)
        left = {c.id for c in client.containers.list(all=True, filters={"label": OWNER_LABEL})}
        assert made["dead"].name in swept and made["dead"].id not in left
        assert made["live"].id in left and made["foreign"].id in left
    finally:
        for container in made.values():
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        client.close()


def test_reaper_removes_what_a_dead_runner_registered(tmp_path: Path) -> None:
    """The reaper on its own: a registered cgroup holding a process is killed and removed at EOF."""
    parent = own_memory_cgroup()
    if parent is None or os.geteuid() != 0:
        pytest.skip("needs a writable memory cgroup")
    cgroup = parent.directory / f"{CHILD_PREFIX}{os.getpid()}-5eed{uuid.uuid4().hex[:6]}"
    try:
        cgroup.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a cgroup here: {error}")
    orphan = subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec sleep 300'], start_new_session=True
    )
    try:
        wait_for(lambda: bool((cgroup / "cgroup.procs").read_text().split()), 10, "never joined")
        done = subprocess.run(
            [sys.executable, "-m", "gguf_sandbox.sandbox.reaper", "--owner", "1"],
            input=textwrap.dedent(
                f"""\
                +cgroup {cgroup}
                +cgroup {tmp_path / "gone"}
                -cgroup {tmp_path / "gone"}
                """
            ).encode(),
            capture_output=True,
            cwd=PROJECT,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert not cgroup.exists()
        assert f"removed cgroup {cgroup}" in done.stderr.decode()
    finally:
        if orphan.poll() is None:
            orphan.kill()
        if cgroup.exists():
            cgroup.rmdir()


def test_guard_starts_one_reaper_per_process_and_restarts_a_dead_one() -> None:
    guard = reaper.Guard()
    guard.watch(reaper.CGROUP, "/nonexistent/gguf-sandbox-test")
    first = guard.pid
    assert first is not None
    guard.watch(reaper.CGROUP, "/nonexistent/gguf-sandbox-test-2")
    assert guard.pid == first
    os.kill(first, signal.SIGKILL)
    psutil.Process(first).wait(10)
    guard.forget(reaper.CGROUP, "/nonexistent/gguf-sandbox-test")
    second = guard.pid
    assert second is not None and second != first
