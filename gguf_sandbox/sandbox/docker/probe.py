"""Memory readings of a docker cell: its cgroup seen from the host, the stats endpoint, its own report."""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gguf_sandbox.cgroupfs import (
    CGROUP_MOUNT,
    OOM_KILL_KEY,
    V1,
    V1_MEMORY_MOUNT,
    V2,
    CgroupFiles,
    read_int,
    read_key,
    working_set_of,
)

if TYPE_CHECKING:
    from docker.models.containers import Container


SAMPLE_INTERVAL_S = 0.1
STATS_INTERVAL_S = 0.5
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
    working_set: int | None = None


class Probe(Protocol):
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
        working_set = working_set_of(self.path, files)
        return MemoryReading(usage, read_int(self.path / files.peak), oom_kill, working_set)


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
class StatsProbe:
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
        usage = int(memory["usage"])
        # As `docker stats` computes its figure: usage minus inactive file pages (v2 key, then v1's).
        detail = memory.get("stats") or {}
        inactive = detail.get("inactive_file", detail.get("total_inactive_file", 0))
        return MemoryReading(usage, memory.get("max_usage"), None, max(usage - int(inactive), 0))


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


def largest(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
