"""What runs inside a cell imports no matrix YAML, no Docker and none of the harness that runs cells."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import gguf_sandbox.workloads

WORKLOAD_MODULES = sorted(
    f"gguf_sandbox.workloads.{info.name}" for info in pkgutil.iter_modules(gguf_sandbox.workloads.__path__)
)
# Our YAML reader, not `yaml` itself: gguf-py's package imports yaml as soon as a GGUF is read.
FORBIDDEN = (
    "docker",
    "gguf_sandbox.bounded_yaml",
    "gguf_sandbox.matrix.",
    "gguf_sandbox.sandbox.docker",
    "gguf_sandbox.sandbox.cgroup",
)
# The mcp workload's client reads the server's JSON error with the verdicts' report parser.
ALLOWED = ("gguf_sandbox.matrix.verdicts",)

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", [*WORKLOAD_MODULES, "gguf_sandbox.controls"])
def test_a_workload_module_imports_no_harness(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module], capture_output=True, text=True, timeout=120, check=True
    )
    imported = json.loads(done.stdout)
    found = [
        name
        for name in imported
        if name not in ALLOWED and any(name == f or name.startswith(f) for f in FORBIDDEN)
    ]
    assert found == [], f"{module} imports {found}"
