"""What serving MCP costs in imports, as anonymous memory of fresh interpreters: the server's own modules
against the SDK's server side (the reason `serve` speaks MCP itself; figures in the README)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gguf_sandbox

MiB = 1 << 20
SDK_MODULES = ("mcp", "pydantic", "httpx", "jsonschema", "starlette", "anyio")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc/self/status (Linux)"
)

# What `serve` holds anyway (numpy, the engine) is imported first; then the modules under test.
_MEASURE = """
import importlib, json, sys
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import numpy, gguf_sandbox.embed.engine
before = anon()
for name in sys.argv[2:]:
    importlib.import_module(name)
heavy = [name for name in sys.argv[1].split(",") if name in sys.modules]
print(json.dumps({"anon": anon() - before, "heavy": heavy}))
"""


def anon_cost(*modules: str) -> tuple[int, list[str]]:
    root = str(Path(gguf_sandbox.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, ",".join(SDK_MODULES), *modules],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        check=True,
    )
    measured = json.loads(done.stdout)
    return int(measured["anon"]), list(measured["heavy"])


def test_the_server_imports_no_sdk_and_almost_no_memory() -> None:
    cost, heavy = anon_cost("gguf_sandbox.mcp.serve", "gguf_sandbox.mcp.session", "gguf_sandbox.mcp.jsonrpc")
    print(f"serve's own modules: {cost / MiB:.1f} MiB anonymous")
    assert heavy == [], "serve must not import the SDK or its dependencies"
    assert cost < 4 * MiB, "an order of magnitude below the SDK"


@pytest.mark.skipif(importlib.util.find_spec("mcp") is None, reason="the MCP SDK is not installed")
def test_the_sdks_stdio_server_alone_would_take_a_third_of_a_64_mib_cell() -> None:
    cost, heavy = anon_cost("mcp.server.lowlevel", "mcp.server.stdio", "mcp.types")
    print(f"the SDK's stdio server side: {cost / MiB:.1f} MiB anonymous ({', '.join(heavy)})")
    assert cost > 20 * MiB
