"""The machine a run or a floor was measured on, as the short facts a report prints."""

from __future__ import annotations

import os
import platform
import sys

import psutil

from gguf_sandbox.cgroupfs import own_memory_cgroup
from gguf_sandbox.units import GIB


def host_facts() -> dict[str, str]:
    """Name, OS, kernel, CPUs this process may use (of all), memory, cgroup version, runner's Python."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    cgroup = own_memory_cgroup()
    return {
        "name": platform.node(),
        "os": _os_name(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": f"{usable} of {os.cpu_count() or 0}",
        "memory": f"{psutil.virtual_memory().total / GIB:.1f} GiB",
        "cgroup": {"cgroup1": "v1", "cgroup2": "v2"}[cgroup.source] if cgroup is not None else "none",
        "python": platform.python_version() + (" (free-threaded)" if _free_threaded() else ""),
    }


def _free_threaded() -> bool:
    return not getattr(sys, "_is_gil_enabled", lambda: True)()


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME") or platform.system()
    except OSError:
        return platform.system()
