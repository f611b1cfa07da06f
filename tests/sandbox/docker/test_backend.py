"""The docker backend: OOM, peak, timeout, hardening as docker inspect shows it, and no container left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, PIDS_LIMIT, CellSpec, Sandbox
from gguf_sandbox.sandbox.docker import backend as docker_backend
from gguf_sandbox.sandbox.docker.backend import (
    CELL_LABEL,
    DockerSandbox,
    container_argv,
    hardening_violations,
)
from gguf_sandbox.sandbox.docker.probe import REPORT_MARKER, MemoryReading, parse_report

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
MIB = 1 << 20


def make_spec(argv: tuple[str, ...], **overrides: Any) -> CellSpec:
    fields: dict[str, Any] = {
        "cell_id": f"test-{uuid.uuid4().hex[:10]}",
        "backend": "docker",
        "python": PYTHON,
        "memory": 64 * MIB,
        "argv": argv,
        "timeout": 60.0,
    }
    fields.update(overrides)
    return CellSpec(**fields)


# ---------------------------------------------------------------------------------------------------------
# Pure parts (no engine)


def test_sandbox_meets_the_protocol() -> None:
    assert isinstance(DockerSandbox(), Sandbox)
    assert DockerSandbox.name == "docker"


def test_model_placeholder_is_replaced_by_the_mount_path(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    spec = make_spec(
        ("-m", "gguf_sandbox", "workload", "parse", MODEL_PLACEHOLDER, f"--x={MODEL_PLACEHOLDER}")
    )
    spec = CellSpec(**{**spec.__dict__, "model": model})
    assert container_argv(spec) == [
        "python",
        "-m",
        "gguf_sandbox",
        "workload",
        "parse",
        "/models/tiny.gguf",
        "--x=/models/tiny.gguf",
    ]


def test_model_placeholder_without_a_model_is_refused() -> None:
    with pytest.raises(SandboxError, match="has no model"):
        container_argv(make_spec(("x.py", MODEL_PLACEHOLDER)))


@pytest.mark.parametrize(
    ("report_lines", "expected"),
    [
        pytest.param(
            [
                "memory.max_usage_in_bytes 67108864",
                "memory.oom_control oom_kill_disable 0",
                "memory.oom_control under_oom 0",
                "memory.oom_control oom_kill 2",
            ],
            MemoryReading(None, 67108864, 2),
            id="cgroup-v1",
        ),
        pytest.param(
            ["memory.peak 1048576", "memory.events low 0", "memory.events oom 1", "memory.events oom_kill 1"],
            MemoryReading(None, 1048576, 1),
            id="cgroup-v2",
        ),
        pytest.param([], MemoryReading(None, None, None), id="no-report"),
    ],
)
def test_wrapper_report_is_parsed_and_stripped(report_lines: list[str], expected: MemoryReading) -> None:
    own = "Traceback (most recent call last):\nMemoryError\n"
    stderr = own + "".join(f"{REPORT_MARKER} {line}\n" for line in report_lines)
    kept, reading = parse_report(stderr)
    assert kept == own
    assert reading == expected


def test_hardening_violations_name_what_is_missing() -> None:
    spec = make_spec(("-c", "pass"))
    attrs = {
        "Config": {"User": "0"},
        "HostConfig": {
            "NetworkMode": "bridge",
            "ReadonlyRootfs": False,
            "Memory": spec.memory,
            "MemorySwap": -1,
            "CapDrop": None,
            "SecurityOpt": None,
            "PidsLimit": None,
            "Tmpfs": {},
        },
    }
    assert set(hardening_violations(attrs, spec)) == {
        "network none",
        "read-only root",
        "swap off",
        "all capabilities dropped",
        "no-new-privileges",
        "pids limit",
        "tmpfs /tmp",
        "non-root user",
    }


# ---------------------------------------------------------------------------------------------------------
# Against a real engine


@pytest.fixture(scope="module")
def sandbox() -> DockerSandbox:
    backend = DockerSandbox()
    reason = backend.unavailable_reason(PYTHON)
    if reason is not None:
        pytest.skip(reason)
    return backend


def cell_containers(cell_id: str) -> list[Any]:
    from gguf_sandbox.sandbox.docker.engine import engine_client

    client = engine_client()
    try:
        return list(client.containers.list(all=True, filters={"label": f"{CELL_LABEL}={cell_id}"}))
    finally:
        client.close()


@pytest.fixture
def no_leftovers() -> Iterator[list[str]]:
    """Cell ids a test runs; afterwards none of them may still have a container."""
    cell_ids: list[str] = []
    yield cell_ids
    for cell_id in cell_ids:
        assert cell_containers(cell_id) == [], f"container of {cell_id} left behind"


@pytest.mark.docker
def test_allocation_beyond_the_limit_is_oom_killed(sandbox: DockerSandbox, no_leftovers: list[str]) -> None:
    spec = make_spec(("-c", "b = bytearray(200 << 20); print('survived')"))
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.exit_code == 137, result.stderr
    assert result.killed_by_sigkill
    assert result.oom_kill_count >= 1
    assert result.oom_killed_flag
    assert not result.timed_out
    assert "survived" not in result.stdout
    assert result.peak_bytes is not None and result.peak_bytes >= 0.9 * spec.memory
    assert result.limit_bytes == spec.memory
    # The container's cgroup goes with it: the kill is on the timeline, at the latest when it ended.
    kill = result.timeline.oom_kill_s
    assert kill is not None and 0 < kill <= result.duration_s + 0.01


@pytest.mark.docker
def test_small_command_passes_with_a_peak(sandbox: DockerSandbox, no_leftovers: list[str]) -> None:
    spec = make_spec(("-c", "import sys; print('ok'); print('note', file=sys.stderr)"))
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == "note\n"
    assert not result.timed_out and not result.oom_killed_flag and result.oom_kill_count == 0
    assert result.peak_bytes is not None and 0 < result.peak_bytes < spec.memory
    assert result.duration_s < 30


@pytest.mark.docker
def test_failing_command_keeps_its_exit_code_and_stderr(
    sandbox: DockerSandbox, no_leftovers: list[str]
) -> None:
    spec = make_spec(("-c", "import sys; sys.exit('bad input')"))
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.exit_code == 1
    assert "bad input" in result.stderr
    assert result.oom_kill_count == 0 and not result.oom_killed_flag


@pytest.mark.docker
def test_memory_is_sampled_while_the_cell_runs(sandbox: DockerSandbox, no_leftovers: list[str]) -> None:
    script = "import time; b = bytearray(24 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    spec = make_spec(("-c", script))
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.exit_code == 0, result.stderr
    samples = result.timeline.samples
    assert len(samples) >= 3
    assert max(s.usage for s in samples) >= 20 * MIB
    assert max(s.working_set for s in samples) >= 20 * MIB
    assert all(s.working_set <= s.usage for s in samples)
    assert result.peak_bytes is not None and result.peak_bytes >= 24 * MIB


@pytest.mark.docker
def test_timeout_is_reported_and_the_cell_killed(sandbox: DockerSandbox, no_leftovers: list[str]) -> None:
    spec = make_spec(("-c", "import time; time.sleep(120)"), timeout=2.0)
    no_leftovers.append(spec.cell_id)
    started = time.monotonic()
    result = sandbox.run(spec)
    assert result.timed_out
    assert result.exit_code == 137
    assert result.oom_kill_count == 0
    assert 2.0 <= result.duration_s < 20
    assert time.monotonic() - started < 30


@pytest.mark.docker
def test_cell_sees_the_hardening_from_inside(
    sandbox: DockerSandbox, no_leftovers: list[str], tmp_path: Path
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    probe = textwrap.dedent(
        """
        import json, os, socket, sys
        def can_write(path):
            try:
                with open(path, "wb") as f:
                    f.write(b"x")
                return True
            except OSError:
                return False
        print(json.dumps({
            "uid": os.getuid(),
            "root_writable": can_write("/usr/evil"),
            "tmp_writable": can_write("/tmp/ok"),
            "model_head": open(sys.argv[1], "rb").read(4).decode(),
            "model_writable": can_write(sys.argv[1]),
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "python": "%d.%d" % sys.version_info[:2],
        }))
        """
    )
    spec = make_spec(("-c", probe, MODEL_PLACEHOLDER), model=model)
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "uid": seen["uid"],
        "root_writable": False,
        "tmp_writable": True,
        "model_head": "GGUF",
        "model_writable": False,
        "interfaces": ["lo"],
        "python": PYTHON,
    }
    assert seen["uid"] != 0


@pytest.mark.docker
def test_running_container_is_hardened_in_docker_inspect(
    sandbox: DockerSandbox, no_leftovers: list[str], tmp_path: Path
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    spec = make_spec(("-c", "import time; time.sleep(60)", MODEL_PLACEHOLDER), model=model, memory=96 * MIB)
    no_leftovers.append(spec.cell_id)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=sandbox.run(spec)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        containers: list[Any] = []
        while not containers and time.monotonic() < deadline:
            containers = [c for c in cell_containers(spec.cell_id) if c.status == "running"]
            time.sleep(0.2)
        assert containers, "the cell's container never showed up as running"
        (container,) = containers
        attrs = container.attrs
        host = attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert "/tmp" in host["Tmpfs"]
        assert attrs["Config"]["User"].split(":")[0] not in ("", "0", "root")
        assert host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["PidsLimit"] == PIDS_LIMIT
        assert host["Memory"] == host["MemorySwap"] == 96 * MIB
        assert host["NetworkMode"] == "none"
        assert host["AutoRemove"] is False
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert mounts["/models/model.gguf"]["RW"] is False
        assert mounts["/models/model.gguf"]["Source"] == str(model.resolve())
        assert hardening_violations(attrs, spec) == []
        container.kill()
    finally:
        runner.join(timeout=90)
    assert outcome["result"].exit_code == 137
    assert not outcome["result"].timed_out


@pytest.mark.docker
def test_exception_mid_cell_removes_the_container(
    sandbox: DockerSandbox, no_leftovers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class ExplodingProbe:
        interval = 0.1

        def __init__(self) -> None:
            self.reads = 0

        def read(self) -> MemoryReading | None:
            self.reads += 1
            if self.reads == 3:
                raise RuntimeError("probe exploded")
            return None

    monkeypatch.setattr(docker_backend, "find_host_cgroup", lambda pid, cid: ExplodingProbe())
    spec = make_spec(("-c", "import time; time.sleep(60)"))
    no_leftovers.append(spec.cell_id)
    with pytest.raises(RuntimeError, match="probe exploded"):
        sandbox.run(spec)


@pytest.mark.docker
def test_keyboard_interrupt_mid_cell_removes_the_container(
    sandbox: DockerSandbox, no_leftovers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class InterruptingProbe:
        interval = 0.1

        def read(self) -> MemoryReading | None:
            raise KeyboardInterrupt

    monkeypatch.setattr(docker_backend, "find_host_cgroup", lambda pid, cid: InterruptingProbe())
    spec = make_spec(("-c", "import time; time.sleep(60)"))
    no_leftovers.append(spec.cell_id)
    with pytest.raises(KeyboardInterrupt):
        sandbox.run(spec)


@pytest.mark.docker
def test_sigint_to_a_process_running_a_cell_leaves_no_container(
    sandbox: DockerSandbox, no_leftovers: list[str]
) -> None:
    cell_id = f"test-sigint-{uuid.uuid4().hex[:10]}"
    no_leftovers.append(cell_id)
    driver = textwrap.dedent(
        f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from gguf_sandbox.sandbox.base import CellSpec
        from gguf_sandbox.sandbox.docker.backend import DockerSandbox
        DockerSandbox().run(CellSpec(cell_id={cell_id!r}, backend="docker", python={PYTHON!r},
                                     memory=64 << 20, argv=("-c", "import time; time.sleep(120)")))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=Path(__file__).resolve().parents[3], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not any(c.status == "running" for c in cell_containers(cell_id)):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the cell never started"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert b"KeyboardInterrupt" in stderr
    assert cell_containers(cell_id) == []


@pytest.mark.docker
def test_engine_refusing_the_cell_raises_and_leaves_nothing(
    sandbox: DockerSandbox, no_leftovers: list[str]
) -> None:
    spec = make_spec(("-c", "pass"), memory=1 * MIB)  # the engine's minimum is 6 MB
    no_leftovers.append(spec.cell_id)
    with pytest.raises(SandboxError, match=spec.cell_id):
        sandbox.run(spec)


def test_unreachable_engine_gives_a_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    reason = DockerSandbox().unavailable_reason(PYTHON)
    assert reason is not None
    assert f"no Docker engine reachable at unix://{tmp_path}/no-such.sock" in reason
    assert "--backend cgroup" in reason


def _engine_failure(kind: str) -> Exception:
    import docker
    import requests

    if kind == "api":
        failure: Exception = docker.errors.APIError("500 Server Error: engine hiccup")
        return failure
    return requests.exceptions.ConnectionError("Connection aborted: engine went away")


@pytest.mark.docker
@pytest.mark.parametrize("kind", ["api", "transport"])
@pytest.mark.parametrize(
    "target",
    [
        "docker.models.containers.Container.reload",
        "testcontainers.core.container.DockerContainer.get_logs",
        "testcontainers.core.container.DockerContainer.start",
    ],
    ids=["reload", "get_logs", "start"],
)
def test_engine_errors_mid_cell_become_sandbox_errors(
    sandbox: DockerSandbox, no_leftovers: list[str], monkeypatch: pytest.MonkeyPatch, target: str, kind: str
) -> None:
    """A failing engine call is the cell's harness error (the runner records it and goes on), never a raw
    docker or requests exception that would abort the whole matrix; the container is still removed."""
    import importlib

    module_name, class_name, method = target.rsplit(".", 2)
    owner = getattr(importlib.import_module(module_name), class_name)
    real = getattr(owner, method)
    calls: list[int] = []

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if method == "start":
            real(self, *args, **kwargs)  # the container exists: removal must still find it
        raise _engine_failure(kind)

    monkeypatch.setattr(owner, method, failing)
    spec = make_spec(("-c", "print('ok')"))
    no_leftovers.append(spec.cell_id)
    with pytest.raises(SandboxError, match=spec.cell_id) as raised:
        sandbox.run(spec)
    assert calls
    assert ("engine hiccup" if kind == "api" else "engine went away") in str(raised.value)


@pytest.mark.docker
def test_engine_error_while_timing_a_cell_out_is_not_raised(
    sandbox: DockerSandbox, no_leftovers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import docker

    real_kill = docker.models.containers.Container.kill
    kills: list[int] = []

    def failing_kill(self: Any, *args: Any, **kwargs: Any) -> Any:
        kills.append(1)
        if len(kills) == 1:
            raise _engine_failure("transport")
        return real_kill(self, *args, **kwargs)

    monkeypatch.setattr(docker_backend, "KILL_GRACE_S", 1.0)
    monkeypatch.setattr(docker.models.containers.Container, "kill", failing_kill)
    spec = make_spec(("-c", "import time; time.sleep(120)"), timeout=2.0)
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.timed_out and kills


@pytest.mark.docker
def test_sigterm_during_container_removal_is_held_until_it_is_gone(
    sandbox: DockerSandbox, no_leftovers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (a supervisor stopping the run) arriving while the container is removed: removal first."""
    real_remove = DockerSandbox._remove

    def terminated_remove(self: DockerSandbox, container: Any, run_id: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # a delivered SIGTERM would raise here, before the container is removed
        real_remove(self, container, run_id)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # what the runner's SIGTERM handler does

    monkeypatch.setattr(DockerSandbox, "_remove", terminated_remove)
    spec = make_spec(("-c", "pass"))
    no_leftovers.append(spec.cell_id)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(KeyboardInterrupt):
            sandbox.run(spec)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.docker
def test_cells_report_the_isolation_they_had(sandbox: DockerSandbox, no_leftovers: list[str]) -> None:
    from gguf_sandbox.sandbox.base import Isolation

    spec = make_spec(("-c", "pass"))
    no_leftovers.append(spec.cell_id)
    result = sandbox.run(spec)
    assert result.isolation.held == frozenset(Isolation) and not result.isolation.missing
