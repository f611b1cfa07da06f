"""The docker backend: each cell in a hardened testcontainers container, its memory read from its cgroup."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import (
    MODEL_PLACEHOLDER,
    PIDS_LIMIT,
    CellCommand,
    CellSpec,
    Isolation,
    IsolationReport,
    RunResult,
)
from gguf_sandbox.sandbox.docker.context import find_project_dir
from gguf_sandbox.sandbox.docker.engine import engine_client
from gguf_sandbox.sandbox.docker.images import SANDBOX_UID, build_image
from gguf_sandbox.sandbox.docker.peer_images import build_peer_image
from gguf_sandbox.sandbox.docker.probe import (
    CELL_WRAPPER,
    SAMPLE_INTERVAL_S,
    MemoryReading,
    Probe,
    StatsProbe,
    find_host_cgroup,
    largest,
    parse_report,
)
from gguf_sandbox.sandbox.isolation import DEADLINE_GRACE_S
from gguf_sandbox.sandbox.reaper import DOCKER, GUARD, owner_gone, owner_token
from gguf_sandbox.sandbox.sampling import SampleWatcher, TimelineRecorder
from gguf_sandbox.signals import deferred_signals

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

MODELS_DIR = "/models"
CELL_LABEL = "org.gguf-sandbox.cell"
RUN_LABEL = "org.gguf-sandbox.run"
# The process that created the container (reaper.owner_token): the reaper and later runs remove the
# containers of an owner that is gone; containers of live owners, or of other hosts, are never touched.
OWNER_LABEL = "org.gguf-sandbox.owner"
KILL_GRACE_S = 15.0
LOG_MAX_SIZE = "16m"


def _engine_errors() -> tuple[type[Exception], ...]:
    """What the docker SDK raises when the engine fails: its own errors and the transport's (requests)."""
    import docker
    import requests

    return (docker.errors.DockerException, requests.exceptions.RequestException)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _engine_failure(spec: CellSpec, error: BaseException) -> SandboxError:
    """A docker SDK error during a cell as the cell's harness error (the runner records it, goes on)."""
    return SandboxError(
        f"cell {spec.cell_id}: the Docker engine failed: {_one_line(error)}; hint: check `docker info`"
    )


def remove_stale_containers(client: docker.DockerClient) -> list[str]:
    """Remove the cell containers whose owner process has ended (this host and boot only); their names."""
    removed: list[str] = []
    try:
        containers = client.containers.list(all=True, filters={"label": OWNER_LABEL}, ignore_removed=True)
    except _engine_errors():
        return removed
    for container in containers:
        if owner_gone(str((container.labels or {}).get(OWNER_LABEL, ""))) is not True:
            continue
        with contextlib.suppress(*_engine_errors()):
            container.remove(force=True, v=True)
            removed.append(str(container.name))
    return removed


def _disable_ryuk() -> None:
    """Ryuk, testcontainers' reaper, is an image to pull (impossible offline); we remove containers."""
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    from testcontainers.core.config import testcontainers_config

    testcontainers_config.ryuk_disabled = True


def container_argv(spec: CellSpec) -> list[str]:
    """`python <argv>` with the model placeholder replaced by the model's path inside the container."""
    uses_model = any(MODEL_PLACEHOLDER in arg for arg in spec.argv)
    if uses_model and spec.model is None:
        raise SandboxError(
            f"cell {spec.cell_id}: argv uses {MODEL_PLACEHOLDER} but the cell has no model; "
            "hint: set the cell's model"
        )
    inside = f"{MODELS_DIR}/{spec.model.name}" if spec.model is not None else ""
    return ["python", *(arg.replace(MODEL_PLACEHOLDER, inside) for arg in spec.argv)]


def _volumes(spec: CellSpec) -> dict[str, dict[str, str]]:
    """Read-only binds: the model at /models/NAME, each of spec.mounts at its target."""
    volumes = {str(mount.source.resolve()): {"bind": mount.target, "mode": "ro"} for mount in spec.mounts}
    if spec.model is not None:
        volumes[str(spec.model.resolve())] = {"bind": f"{MODELS_DIR}/{spec.model.name}", "mode": "ro"}
    return volumes


def _container_name(spec: CellSpec, run_id: str) -> str:
    readable = re.sub(r"[^a-zA-Z0-9_.-]+", "_", spec.cell_id)[:80].strip("_.-") or "cell"
    return f"gguf-sandbox-{readable}-{run_id}"


# Each hardening property as docker inspect shows it: (what, HostConfig key, predicate on its value).
_HARDENING: tuple[tuple[str, str, Any], ...] = (
    ("network none", "NetworkMode", lambda v, spec: v == "none"),
    ("read-only root", "ReadonlyRootfs", lambda v, spec: v is True),
    ("memory limit", "Memory", lambda v, spec: v == spec.memory),
    ("swap off", "MemorySwap", lambda v, spec: v == spec.memory),
    ("all capabilities dropped", "CapDrop", lambda v, spec: v is not None and "ALL" in v),
    ("no-new-privileges", "SecurityOpt", lambda v, spec: v is not None and "no-new-privileges" in v),
    ("pids limit", "PidsLimit", lambda v, spec: v == PIDS_LIMIT),
    ("tmpfs /tmp", "Tmpfs", lambda v, spec: v is not None and "/tmp" in v),
)


def hardening_violations(attrs: Mapping[str, Any], spec: CellSpec) -> list[str]:
    """The hardening properties an inspected container lacks (empty when all hold)."""
    host = attrs.get("HostConfig") or {}
    missing = [what for what, key, holds in _HARDENING if not holds(host.get(key), spec)]
    user = str((attrs.get("Config") or {}).get("User") or "")
    if user.split(":", maxsplit=1)[0] in ("", "0", "root"):
        missing.append("non-root user")
    return missing


def _tmpfs_options(spec: CellSpec) -> str:
    return f"rw,nosuid,nodev,noexec,size={spec.memory}"


def _hardened_kwargs(spec: CellSpec, run_id: str) -> dict[str, Any]:
    """docker-py create() arguments every cell gets: wrapper, user, limits, isolation, labels, logs."""
    from docker.types import LogConfig

    deadline = f"{spec.timeout + DEADLINE_GRACE_S:.3f}"
    return {
        "entrypoint": ["/bin/sh", "-c", CELL_WRAPPER, "gguf-sandbox-cell", deadline],
        "user": f"{SANDBOX_UID}:{SANDBOX_UID}",
        "working_dir": "/tmp",
        "mem_limit": spec.memory,
        "memswap_limit": spec.memory,
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": PIDS_LIMIT,
        "labels": {RUN_LABEL: run_id, CELL_LABEL: spec.cell_id[:200], OWNER_LABEL: owner_token()},
        "log_config": LogConfig(type="json-file", config={"max-size": LOG_MAX_SIZE}),
    }


# Every cell container here meets the whole hardening table (or is refused before it runs).
DOCKER_ISOLATION = IsolationReport(frozenset(Isolation))


class DockerSandbox:
    """Runs cells in per-Python images (gguf-sandbox:py3.X) under a hard memory limit with swap off."""

    name = "docker"

    def __init__(self, project_dir: Path | None = None) -> None:
        self._project_dir = project_dir
        self._images: dict[tuple[str, tuple[str, ...]], str] = {}
        self._client: docker.DockerClient | None = None
        self.swept: list[str] = []

    def _engine(self) -> docker.DockerClient:
        """The engine client; on first use, the containers of runs whose owner is gone are removed."""
        if self._client is None:
            self._client = engine_client()
            self.swept = remove_stale_containers(self._client)
        return self._client

    def image_for(self, python: str, requirements: Sequence[str] = ()) -> str:
        """The cell image for `python` (with `requirements`: the peers' image), built or refreshed once per
        sandbox object."""
        key = (python, tuple(requirements))
        if key not in self._images:
            project = find_project_dir(self._project_dir)
            if requirements:
                build = build_peer_image(python, project, requirements, client=self._engine())
            else:
                build = build_image(python, project, client=self._engine())
            self._images[key] = build.tag
        return self._images[key]

    def unavailable_reason(self, python: str) -> str | None:
        try:
            self._engine()
        except SandboxError as error:
            return str(error)
        try:
            self.image_for(python)
        except SandboxError as error:
            return f"no docker image for Python {python}: {error}"
        return None

    def _prepare(self, spec: CellSpec) -> tuple[str, list[str]]:
        """The image and argv of a cell, and the reaper told about this process's containers."""
        image = self.image_for(spec.python, spec.requirements)
        argv = container_argv(spec)
        if spec.model is not None and not spec.model.exists():
            raise SandboxError(f"cell {spec.cell_id}: model {spec.model} does not exist")
        GUARD.watch(DOCKER, f"{OWNER_LABEL}={owner_token()}")
        return image, argv

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        image, argv = self._prepare(spec)
        errors = _engine_errors()
        try:
            return self._run(spec, image, argv, watch)
        except errors as error:
            raise _engine_failure(spec, error) from error

    def _run(self, spec: CellSpec, image: str, argv: list[str], watch: SampleWatcher | None) -> RunResult:
        _disable_ryuk()
        from testcontainers.core.container import DockerContainer

        run_id = uuid.uuid4().hex[:12]
        container = DockerContainer(image, env=dict(spec.env), name=_container_name(spec, run_id))
        container.with_command(argv)
        # Docker's own tmpfs options: testcontainers passes this string through verbatim.
        container.with_tmpfs_mount("/tmp", _tmpfs_options(spec))
        for source, bind in _volumes(spec).items():
            container.with_volume_mapping(source, bind["bind"], bind["mode"])
        # One call: with_kwargs() replaces whatever an earlier call set.
        container.with_kwargs(**_hardened_kwargs(spec, run_id))
        try:
            return self._run_started(spec, container, image, watch)
        finally:
            with deferred_signals():
                self._remove(container, run_id)

    def _run_started(
        self, spec: CellSpec, container: Any, image: str, watch: SampleWatcher | None
    ) -> RunResult:
        started = time.monotonic()
        try:
            container.start()
        except _engine_errors() as error:
            raise SandboxError(
                f"cell {spec.cell_id}: could not start a container from {image}: {_one_line(error)}; "
                "hint: `gguf-sandbox images build` and check `docker info`"
            ) from error
        wrapped: Container = container.get_wrapped_container()
        wrapped.reload()
        probe: Probe = find_host_cgroup(int(wrapped.attrs["State"].get("Pid") or 0), str(wrapped.id)) or (
            StatsProbe(wrapped)
        )
        violations = hardening_violations(wrapped.attrs, spec)
        if violations:
            wrapped.kill()
            raise SandboxError(
                f"cell {spec.cell_id}: the container lacks {', '.join(violations)}; refusing to run it "
                "(did a testcontainers setting override ours?)"
            )
        exited = threading.Event()
        waiter = threading.Thread(target=self._wait_for_exit, args=(str(wrapped.id), exited), daemon=True)
        waiter.start()

        recorder = TimelineRecorder(started, watch)
        last = MemoryReading()
        timed_out = False
        deadline = started + spec.timeout
        while True:
            reading = probe.read()
            if reading is not None:
                last = MemoryReading(
                    reading.usage,
                    largest(last.peak, reading.peak),
                    largest(last.oom_kill, reading.oom_kill),
                )
                recorder.add(reading.usage, reading.working_set, reading.oom_kill)
            if exited.wait(probe.interval):
                break
            if time.monotonic() >= deadline:
                timed_out = True
                with contextlib.suppress(*_engine_errors()):
                    wrapped.kill()
                exited.wait(KILL_GRACE_S)
                break
        duration = time.monotonic() - started

        wrapped.reload()
        state = wrapped.attrs["State"]
        stdout_bytes, stderr_bytes = container.get_logs()
        stderr, report = parse_report(stderr_bytes.decode("utf-8", errors="replace"))
        timeline = recorder.timeline()
        oom_kills = largest(report.oom_kill, last.oom_kill) or 0
        if oom_kills or state.get("OOMKilled"):
            timeline = timeline.killed_by_then(duration)
        return RunResult(
            exit_code=None if state.get("Running") else int(state["ExitCode"]),
            timed_out=timed_out,
            oom_killed_flag=bool(state.get("OOMKilled")),
            oom_kill_count=oom_kills,
            peak_bytes=largest(report.peak, last.peak, timeline.peak_usage),
            limit_bytes=spec.memory,
            duration_s=duration,
            stdout=stdout_bytes.decode("utf-8", errors="replace"),
            stderr=stderr,
            timeline=timeline,
            isolation=DOCKER_ISOLATION,
        )

    @contextlib.contextmanager
    def attach(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> Iterator[AttachedContainer]:
        """The cell as a created, hardened container whose stdin/stdout `docker start -ai` attaches.

        Created (not started) with the same hardening as run() plus an open stdin that closes with the
        attached client; the yielded command starts it. The container is removed on exit.
        """
        cli = shutil.which("docker")
        if cli is None:
            raise SandboxError(
                f"cell {spec.cell_id}: attaching a client needs the docker CLI on PATH; "
                "hint: install docker.io"
            )
        image, argv = self._prepare(spec)
        client = self._engine()
        run_id = uuid.uuid4().hex[:12]
        volumes = _volumes(spec)
        errors = _engine_errors()
        try:
            with deferred_signals():
                created: Container = client.containers.create(
                    image,
                    command=argv,
                    name=_container_name(spec, run_id),
                    environment=dict(spec.env),
                    tmpfs={"/tmp": _tmpfs_options(spec)},
                    volumes=volumes,
                    # Not detached + stdin open = AttachStdin and StdinOnce: the container's stdin closes
                    # when the attached client closes its end, so the server in it sees EOF.
                    stdin_open=True,
                    detach=False,
                    **_hardened_kwargs(spec, run_id),
                )
        except errors as error:
            with deferred_signals():
                self._remove_run(run_id)
            raise SandboxError(
                f"cell {spec.cell_id}: could not create a container from {image}: {_one_line(error)}; "
                "hint: `gguf-sandbox images build` and check `docker info`"
            ) from error
        try:
            try:
                created.reload()
            except errors as error:
                raise _engine_failure(spec, error) from error
            violations = hardening_violations(created.attrs, spec)
            if violations:
                raise SandboxError(
                    f"cell {spec.cell_id}: the container lacks {', '.join(violations)}; refusing to run it"
                )
            with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
                cell = AttachedContainer(created, spec, cli, stderr, watch)
                try:
                    yield cell
                finally:
                    cell.close()
        finally:
            with deferred_signals():
                with contextlib.suppress(*errors):
                    created.remove(force=True, v=True)
                self._remove_run(run_id)

    def _remove_run(self, run_id: str) -> None:
        """Remove every container of this run (one an interrupted create may have left behind)."""
        with contextlib.suppress(*_engine_errors(), SandboxError):
            for leftover in self._engine().containers.list(
                all=True, filters={"label": f"{RUN_LABEL}={run_id}"}, ignore_removed=True
            ):
                with contextlib.suppress(*_engine_errors()):
                    leftover.remove(force=True, v=True)

    @staticmethod
    def _wait_for_exit(container_id: str, exited: threading.Event) -> None:
        """Block on the engine's wait endpoint on a private connection (no request timeout)."""
        try:
            client = engine_client()
            try:
                client.api.wait(container_id, timeout=None)
            finally:
                client.close()
        except Exception:  # removed or engine gone: the main loop reads the state and decides
            pass
        finally:
            exited.set()

    def _remove(self, container: Any, run_id: str) -> None:
        """Remove the cell's container, and any container of this run an interrupted create left behind."""
        with contextlib.suppress(*_engine_errors()):
            container.stop(force=True, delete_volume=True)
        self._remove_run(run_id)


class AttachedContainer:
    """A created cell container a host-side client starts with `docker start -ai` (an AttachedCell)."""

    def __init__(
        self,
        container: Container,
        spec: CellSpec,
        cli: str,
        stderr: IO[str],
        watch: SampleWatcher | None = None,
    ) -> None:
        self._container = container
        self._spec = spec
        self.stderr = stderr
        self.command = CellCommand((cli, "start", "--attach", "--interactive", str(container.id)))
        self._started = time.monotonic()
        self._done = threading.Event()
        self._timed_out = threading.Event()
        self._recorder = TimelineRecorder(self._started, watch)
        self._last = MemoryReading()
        self._result: RunResult | None = None
        self._watcher = threading.Thread(target=self._watch, name="gguf-sandbox attach watcher", daemon=True)
        self._watcher.start()

    def _state(self) -> dict[str, Any]:
        self._container.reload()
        state: dict[str, Any] = self._container.attrs.get("State") or {}
        return state

    def _watch(self) -> None:
        """Sample the container's cgroup while it runs; kill it at the wall-clock timeout."""
        deadline = self._started + self._spec.timeout
        probe: Probe | None = None
        while not self._done.is_set():
            if time.monotonic() >= deadline:
                self._timed_out.set()
                with contextlib.suppress(*_engine_errors()):
                    self._container.kill()
                return
            if probe is None:
                with contextlib.suppress(*_engine_errors()):
                    pid = int(self._state().get("Pid") or 0)
                    if pid > 0:
                        probe = find_host_cgroup(pid, str(self._container.id)) or StatsProbe(self._container)
            if probe is not None:
                self._sample(probe)
            self._done.wait(probe.interval if probe is not None else SAMPLE_INTERVAL_S)

    def _sample(self, probe: Probe) -> None:
        reading = probe.read()
        if reading is None:
            return
        self._last = MemoryReading(
            reading.usage,
            largest(self._last.peak, reading.peak),
            largest(self._last.oom_kill, reading.oom_kill),
        )
        self._recorder.add(reading.usage, reading.working_set, reading.oom_kill)

    def finish(self, grace: float = 5.0) -> RunResult:
        if self._result is not None:
            return self._result
        with contextlib.suppress(*_engine_errors(), OSError):
            # Returns at once for a container that never started; raises on timeout (requests).
            self._container.wait(timeout=max(grace, 0.1))
        self._done.set()
        self._watcher.join()
        with contextlib.suppress(*_engine_errors()):
            self._container.kill()
        state: dict[str, Any] = {}
        logs = b""
        with contextlib.suppress(*_engine_errors()):
            state = self._state()
            logs = self._container.logs(stdout=False, stderr=True)
        _, report = parse_report(logs.decode("utf-8", errors="replace"))
        self.stderr.flush()
        self.stderr.seek(0)
        stderr, local_report = parse_report(self.stderr.read())
        timeline = self._recorder.timeline()
        duration = time.monotonic() - self._started
        oom_kills = largest(report.oom_kill, local_report.oom_kill, self._last.oom_kill) or 0
        if oom_kills or state.get("OOMKilled"):
            timeline = timeline.killed_by_then(duration)
        never_started = state.get("Status") == "created" or not state
        self._result = RunResult(
            exit_code=None if never_started or state.get("Running") else int(state.get("ExitCode", -1)),
            timed_out=self._timed_out.is_set(),
            oom_killed_flag=bool(state.get("OOMKilled")),
            oom_kill_count=oom_kills,
            peak_bytes=largest(report.peak, local_report.peak, self._last.peak, timeline.peak_usage),
            limit_bytes=self._spec.memory,
            duration_s=duration,
            stdout="",
            stderr=stderr,
            timeline=timeline,
            isolation=DOCKER_ISOLATION,
        )
        return self._result

    def close(self) -> None:
        """Stop the watcher (finish() if nobody did)."""
        self.finish(grace=0.0)
