"""The cgroup filesystem: each version's memory files, reading them, our own cgroup, the working set, the
CPU quota."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

LimitSource = Literal["cgroup2", "cgroup1", "physical"]
CgroupSource = Literal["cgroup2", "cgroup1"]

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); anything this
# large cannot be a real limit on any machine.
V1_UNLIMITED = 1 << 62

CGROUP_MOUNT = Path("sys/fs/cgroup")
V1_MEMORY_MOUNT = "memory"  # the v1 memory controller's directory under CGROUP_MOUNT
STAT_FILE = "memory.stat"
PROCS_FILE = "cgroup.procs"
CONTROLLERS_FILE = "cgroup.controllers"
SUBTREE_FILE = "cgroup.subtree_control"
PIDS_MAX = "pids.max"
KILL_FILE = "cgroup.kill"  # v2 only: writing 1 kills everything in the cgroup
SWAPPINESS = "memory.swappiness"
OOM_GROUP = "memory.oom.group"
OOM_KILL_KEY = "oom_kill"  # the counter of OOM kills in the events file of either version
# The CPU bandwidth limit: v2's "QUOTA PERIOD" (QUOTA "max" when unlimited), v1's two files (quota -1).
V2_CPU_MAX = "cpu.max"
V1_CPU_MOUNT = "cpu"  # the v1 cpu controller's directory under CGROUP_MOUNT (often a link to cpu,cpuacct)
V1_CPU_QUOTA = "cpu.cfs_quota_us"
V1_CPU_PERIOD = "cpu.cfs_period_us"


@dataclass(frozen=True)
class CgroupFiles:
    """The memory control files of one cgroup version, and the swap-off setting written after the limit."""

    source: CgroupSource
    limit: str
    swap_limit: str
    swap_limit_value: str
    usage: str
    peak: str
    events: str  # the flat keyed file holding `oom_kill N`
    kill: str | None
    inactive_file_key: str  # in memory.stat, counting the whole subtree

    @property
    def limit_files(self) -> tuple[str, ...]:
        """The files whose smallest value is this cgroup's limit (v1 also limits memory+swap)."""
        return (self.limit, self.swap_limit) if self.source == "cgroup1" else (self.limit,)


V1 = CgroupFiles(
    source="cgroup1",
    limit="memory.limit_in_bytes",
    swap_limit="memory.memsw.limit_in_bytes",
    swap_limit_value="{limit}",
    usage="memory.usage_in_bytes",
    peak="memory.max_usage_in_bytes",
    events="memory.oom_control",
    kill=None,
    inactive_file_key="total_inactive_file",
)
V2 = CgroupFiles(
    source="cgroup2",
    limit="memory.max",
    swap_limit="memory.swap.max",
    swap_limit_value="0",
    usage="memory.current",
    peak="memory.peak",
    events="memory.events",
    kill=KILL_FILE,
    inactive_file_key="inactive_file",
)
FILES: Mapping[CgroupSource, CgroupFiles] = MappingProxyType({"cgroup1": V1, "cgroup2": V2})


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup this process lives in: its version, its directory and the mount it hangs under."""

    source: CgroupSource
    directory: Path
    mount: Path

    @property
    def files(self) -> CgroupFiles:
        return FILES[self.source]


def read_int(path: Path) -> int | None:
    """The integer a cgroup (or pid) file starts with; None when absent, unreadable, "max" or v1's
    "unlimited" sentinel."""
    try:
        words = path.read_text().split()
    except OSError:
        return None
    if not words or words[0] == "max":
        return None
    try:
        value = int(words[0])
    except ValueError:
        return None
    return None if value >= V1_UNLIMITED else value


def parse_key(text: str, key: str) -> int | None:
    """`key N` from the text of a flat keyed file (memory.stat, memory.events, memory.oom_control)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def read_key(path: Path, key: str) -> int | None:
    """`key N` from a flat keyed file; None when the file or the key is missing or unreadable."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, ValueError):
        return None
    return parse_key(text, key)


def read_pids(procs_file: Path) -> list[int]:
    """The pids in a cgroup.procs file; [] when it is gone."""
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except (OSError, ValueError):
        return []


def working_set_of(directory: Path, files: CgroupFiles) -> int | None:
    """Usage of one cgroup minus its inactive file pages (never below 0); None without a usage figure."""
    usage = read_int(directory / files.usage)
    if usage is None:
        return None
    inactive = read_key(directory / STAT_FILE, files.inactive_file_key) or 0
    return max(usage - inactive, 0)


def ancestors(directory: Path, mount: Path) -> list[Path]:
    """`directory` and each parent up to and including the mount root."""
    chain = [directory]
    while chain[-1] != mount and chain[-1].parent != chain[-1] and mount in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _read_proc_cgroup(root: Path) -> dict[str, str]:
    """Map controller name ("" for the v2 unified line) to the cgroup path in /proc/self/cgroup."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _resolve(mount: Path, cgroup: str) -> Path | None:
    """The directory of `cgroup` under `mount`; inside a container the mount *is* our cgroup, so fall back."""
    candidate = mount / cgroup.strip("/")
    if candidate.is_dir():
        return candidate
    return mount if mount.is_dir() else None


def own_memory_cgroup(root: Path = Path("/")) -> MemoryCgroup | None:
    """Our memory cgroup; a v1 memory controller wins (hybrid hosts also show a bare "0::" line)."""
    paths = _read_proc_cgroup(root)
    mount_base = root / CGROUP_MOUNT
    if "memory" in paths:
        mount = mount_base / V1_MEMORY_MOUNT
        directory = _resolve(mount, paths["memory"])
        if directory is not None:
            return MemoryCgroup("cgroup1", directory, mount)
    if "" in paths and (mount_base / CONTROLLERS_FILE).is_file():
        directory = _resolve(mount_base, paths[""])
        if directory is not None:
            return MemoryCgroup("cgroup2", directory, mount_base)
    return None


def _v2_quota(directory: Path) -> float | None:
    """CPUs one v2 cgroup's cpu.max allows (quota / period); None when unlimited, absent or unreadable."""
    try:
        words = (directory / V2_CPU_MAX).read_text().split()
    except OSError:
        return None
    if len(words) != 2 or words[0] == "max":
        return None
    try:
        quota, period = int(words[0]), int(words[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    """CPUs one v1 cgroup's cfs quota allows (quota / period); None when unlimited (-1) or absent."""
    try:
        quota = int((directory / V1_CPU_QUOTA).read_text().split()[0])
        period = int((directory / V1_CPU_PERIOD).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_quota(root: Path = Path("/")) -> float | None:
    """How many CPUs our cgroup's CPU bandwidth limit allows (e.g. 1.5), the smallest along its ancestors;
    None when no quota applies (or no cgroup is found). A v1 cpu controller wins, as for memory."""
    paths = _read_proc_cgroup(root)
    mount_base = root / CGROUP_MOUNT
    if "cpu" in paths:
        mount = mount_base / V1_CPU_MOUNT
        directory = _resolve(mount, paths["cpu"])
        read = _v1_quota
    elif "" in paths and (mount_base / CONTROLLERS_FILE).is_file():
        mount = mount_base
        directory = _resolve(mount_base, paths[""])
        read = _v2_quota
    else:
        return None
    if directory is None:
        return None
    quotas = [q for q in map(read, ancestors(directory, mount)) if q is not None]
    return min(quotas, default=None)
