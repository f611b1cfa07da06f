"""The docker backend: each cell in a hardened testcontainers container, its memory read from its cgroup."""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from gguf_sandbox.cgroupfs import (
    CGROUP_MOUNT,
    OOM_KILL_KEY,
    V1,
    V1_MEMORY_MOUNT,
    V2,
    CgroupFiles,
    read_int,
    read_key,
)
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
from gguf_sandbox.sandbox.images import SANDBOX_UID, build_image, engine_client, find_project_dir
from gguf_sandbox.sandbox.isolation import DEADLINE_GRACE_S
from gguf_sandbox.sandbox.reaper import DOCKER, GUARD, owner_gone, owner_token
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
SAMPLE_INTERVAL_S = 0.1
STATS_INTERVAL_S = 0.5
KILL_GRACE_S = 15.0
LOG_MAX_SIZE = "16m"
REPORT_MARKER = "@@gguf-sandbox-cgroup@@"

# PID 1 of every cell. It runs the cell in a subshell that makes itself the OOM killer's first choice and
# holds the cell to its own deadline (the runner may be gone), then prints its own cgroup's peak and
# oom_kill counter to stderr: on exit the engine deletes the container's cgroup at once, so a reading from
# outside after exit finds nothing.
CELL_WRAPPER = rf"""
deadline=$1; shift
( {{ echo 1000 >/proc/self/oom_score_adj; }} 2>/dev/null
  if command -v timeout >/dev/null 2>&1; then exec timeout -s KILL "$deadline" "$@"; fi
  exec "$@" )
status=$?
for f in /{CGROUP_MOUNT}/{V1_MEMORY_MOUNT}/{V1.peak} /{CGROUP_MOUNT}/{V1_MEMORY_MOUNT}/{V1.events} \
         /{CGROUP_MOUNT}/{V2.peak} /{CGROUP_MOUNT}/{V2.events}; do
  if [ -r "$f" ]; then
    while IFS= read -r line; do printf '%s %s %s\n' "{REPORT_MARKER}" "${{f##*/}}" "$line"; done <"$f"
  fi
done >&2
exit "$status"
"""


class CgroupVersion(enum.IntEnum):
    V1 = 1
    V2 = 2


CGROUP_FILES: Mapping[CgroupVersion, CgroupFiles] = {CgroupVersion.V1: V1, CgroupVersion.V2: V2}

# What the wrapper's report lines carry, by file name: peak bytes or the oom_kill counter.
_REPORT_FIELDS: Mapping[str, str] = {files.peak: "peak" for files in CGROUP_FILES.values()} | {
    files.events: "oom_kill" for files in CGROUP_FILES.values()
}


@dataclass(frozen=True)
class MemoryReading:
    """One look at a cgroup; None where the source could not tell."""

    usage: int | None = None
    peak: int | None = None
    oom_kill: int | None = None


class _Probe(Protocol):
    interval: float

    def read(self) -> MemoryReading | None: ...


@dataclass(frozen=True)
class HostCgroup:
    """A container's memory cgroup as seen from the host."""

    path: Path
    version: CgroupVersion

    interval = SAMPLE_INTERVAL_S

    def read(self) -> MemoryReading | None:
        files = CGROUP_FILES[self.version]
        usage = read_int(self.path / files.usage)
        if usage is None:
            return None
        oom_kill = read_key(self.path / files.events, OOM_KILL_KEY)
        return MemoryReading(usage, read_int(self.path / files.peak), oom_kill)


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path


def _cgroup_mounts() -> dict[CgroupVersion, _Mount]:
    """The v1 memory controller's mount and the v2 unified mount, from /proc/self/mountinfo."""
    mounts: dict[CgroupVersion, _Mount] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        mount = _Mount(fields[3], Path(fields[4]))
        if extra[0] == "cgroup" and "memory" in extra[2].split(","):
            mounts.setdefault(CgroupVersion.V1, mount)
        elif extra[0] == "cgroup2":
            mounts.setdefault(CgroupVersion.V2, mount)
    return mounts


def find_host_cgroup(pid: int, container_id: str) -> HostCgroup | None:
    """The memory cgroup directory of a container: from its init's /proc/PID/cgroup, else the usual places.

    Covers cgroup v1 and v2 with the cgroupfs (docker/<id>) and systemd (system.slice/docker-<id>.scope)
    drivers; None when the engine's cgroups are not visible here (remote engine, Docker Desktop).
    """
    mounts = _cgroup_mounts()
    own: dict[CgroupVersion, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if pid > 0 else ():
            _, controllers, cgroup_path = line.split(":", 2)
            if controllers == "":
                own[CgroupVersion.V2] = cgroup_path
            elif "memory" in controllers.split(","):
                own[CgroupVersion.V1] = cgroup_path
    usual = (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope")
    for version in (CgroupVersion.V1, CgroupVersion.V2):
        mount = mounts.get(version)
        if mount is None:
            continue
        candidates = []
        if version in own:
            relative = os.path.relpath(own[version], mount.root) if mount.root != "/" else own[version]
            candidates.append(relative.lstrip("/"))
        candidates += usual
        for relative in candidates:
            path = mount.point / relative
            if (path / CGROUP_FILES[version].usage).exists():
                return HostCgroup(path, version)
    return None


@dataclass
class _StatsProbe:
    """Fallback when the cgroup is not visible from here: the engine's stats endpoint (slower)."""

    container: Container
    interval: float = STATS_INTERVAL_S

    def read(self) -> MemoryReading | None:
        try:
            stats: dict[str, Any] = self.container.stats(stream=False, one_shot=True)
        except Exception:  # the container may be gone between two samples: no reading, not an error
            return None
        memory = stats.get("memory_stats") or {}
        if "usage" not in memory:
            return None
        return MemoryReading(int(memory["usage"]), memory.get("max_usage"), None)


def parse_report(stderr: str) -> tuple[str, MemoryReading]:
    """Split the wrapper's cgroup report off stderr: (the cell's own stderr, what the report said)."""
    kept: list[str] = []
    values: dict[str, int] = {}
    for line in stderr.splitlines(keepends=True):
        if not line.startswith(REPORT_MARKER + " "):
            kept.append(line)
            continue
        parts = line.split(None, 2)
        field = _REPORT_FIELDS.get(parts[1]) if len(parts) == 3 else None
        if field == "peak" and parts[2].strip().isdigit():
            values["peak"] = int(parts[2])
        elif field == "oom_kill" and parts[2].startswith(OOM_KILL_KEY + " "):
            values[OOM_KILL_KEY] = int(parts[2].split()[1])
    return "".join(kept), MemoryReading(None, values.get("peak"), values.get(OOM_KILL_KEY))


def _largest(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


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
        self._images: dict[str, str] = {}
        self._client: docker.DockerClient | None = None
        self.swept: list[str] = []

    def _engine(self) -> docker.DockerClient:
        """The engine client; on first use, the containers of runs whose owner is gone are removed."""
        if self._client is None:
            self._client = engine_client()
            self.swept = remove_stale_containers(self._client)
        return self._client

    def image_for(self, python: str) -> str:
        """The cell image for `python`, built or refreshed once per sandbox object."""
        if python not in self._images:
            project = find_project_dir(self._project_dir)
            self._images[python] = build_image(python, project, client=self._engine()).tag
        return self._images[python]

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
        image = self.image_for(spec.python)
        argv = container_argv(spec)
        if spec.model is not None and not spec.model.exists():
            raise SandboxError(f"cell {spec.cell_id}: model {spec.model} does not exist")
        GUARD.watch(DOCKER, f"{OWNER_LABEL}={owner_token()}")
        return image, argv

    def run(self, spec: CellSpec) -> RunResult:
        image, argv = self._prepare(spec)
        errors = _engine_errors()
        try:
            return self._run(spec, image, argv)
        except errors as error:
            raise _engine_failure(spec, error) from error

    def _run(self, spec: CellSpec, image: str, argv: list[str]) -> RunResult:
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
            return self._run_started(spec, container, image)
        finally:
            with deferred_signals():
                self._remove(container, run_id)

    def _run_started(self, spec: CellSpec, container: Any, image: str) -> RunResult:
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
        probe: _Probe = find_host_cgroup(int(wrapped.attrs["State"].get("Pid") or 0), str(wrapped.id)) or (
            _StatsProbe(wrapped)
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

        samples: list[tuple[float, int]] = []
        last = MemoryReading()
        timed_out = False
        deadline = started + spec.timeout
        while True:
            reading = probe.read()
            if reading is not None:
                last = MemoryReading(
                    reading.usage,
                    _largest(last.peak, reading.peak),
                    _largest(last.oom_kill, reading.oom_kill),
                )
                if reading.usage is not None:
                    samples.append((round(time.monotonic() - started, 3), reading.usage))
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
        sampled_peak = max((usage for _, usage in samples), default=None)
        return RunResult(
            exit_code=None if state.get("Running") else int(state["ExitCode"]),
            timed_out=timed_out,
            oom_killed_flag=bool(state.get("OOMKilled")),
            oom_kill_count=_largest(report.oom_kill, last.oom_kill) or 0,
            peak_bytes=_largest(report.peak, last.peak, sampled_peak),
            limit_bytes=spec.memory,
            duration_s=duration,
            stdout=stdout_bytes.decode("utf-8", errors="replace"),
            stderr=stderr,
            samples=tuple(samples),
            isolation=DOCKER_ISOLATION,
        )

    @contextlib.contextmanager
    def attach(self, spec: CellSpec) -> Iterator[AttachedContainer]:
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
                cell = AttachedContainer(created, spec, cli, stderr)
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

    def __init__(self, container: Container, spec: CellSpec, cli: str, stderr: IO[str]) -> None:
        self._container = container
        self._spec = spec
        self.stderr = stderr
        self.command = CellCommand((cli, "start", "--attach", "--interactive", str(container.id)))
        self._started = time.monotonic()
        self._done = threading.Event()
        self._timed_out = threading.Event()
        self._samples: list[tuple[float, int]] = []
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
        probe: _Probe | None = None
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
                        probe = find_host_cgroup(pid, str(self._container.id)) or _StatsProbe(self._container)
            if probe is not None:
                self._sample(probe)
            self._done.wait(probe.interval if probe is not None else SAMPLE_INTERVAL_S)

    def _sample(self, probe: _Probe) -> None:
        reading = probe.read()
        if reading is None:
            return
        self._last = MemoryReading(
            reading.usage,
            _largest(self._last.peak, reading.peak),
            _largest(self._last.oom_kill, reading.oom_kill),
        )
        if reading.usage is not None:
            self._samples.append((round(time.monotonic() - self._started, 3), reading.usage))

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
        sampled_peak = max((usage for _, usage in self._samples), default=None)
        never_started = state.get("Status") == "created" or not state
        self._result = RunResult(
            exit_code=None if never_started or state.get("Running") else int(state.get("ExitCode", -1)),
            timed_out=self._timed_out.is_set(),
            oom_killed_flag=bool(state.get("OOMKilled")),
            oom_kill_count=_largest(report.oom_kill, local_report.oom_kill, self._last.oom_kill) or 0,
            peak_bytes=_largest(report.peak, local_report.peak, self._last.peak, sampled_peak),
            limit_bytes=self._spec.memory,
            duration_s=time.monotonic() - self._started,
            stdout="",
            stderr=stderr,
            samples=tuple(self._samples),
            isolation=DOCKER_ISOLATION,
        )
        return self._result

    def close(self) -> None:
        """Stop the watcher (finish() if nobody did)."""
        self.finish(grace=0.0)
