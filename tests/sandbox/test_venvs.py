"""Tests for the cached per-version venvs and the package link cells import gguf_sandbox through."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

import gguf_sandbox
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox import venvs
from gguf_sandbox.sandbox.interpreters import Interpreter
from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS, ensure_venv, package_root

CURRENT = Interpreter(f"{sys.version_info[0]}.{sys.version_info[1]}", Path(sys.executable), {}, "current")
PYPROJECT = Path(gguf_sandbox.__file__).resolve().parent.parent / "pyproject.toml"


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="not running from the source tree")
def test_runtime_requirements_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is 3.11+")
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert sorted(RUNTIME_REQUIREMENTS) == sorted(declared)


def test_package_root_holds_only_this_package(tmp_path: Path) -> None:
    root = package_root(tmp_path)
    assert [entry.name for entry in root.iterdir()] == ["gguf_sandbox"]
    assert (root / "gguf_sandbox").resolve() == Path(gguf_sandbox.__file__).resolve().parent
    assert package_root(tmp_path) == root
    done = subprocess.run(
        [sys.executable, "-c", "import gguf_sandbox; print(gguf_sandbox.__file__)"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root)},
        cwd=tmp_path,
        check=True,
    )
    assert done.stdout.strip() == str(root / "gguf_sandbox" / "__init__.py")


def test_venv_is_built_once_under_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_run = venvs._run

    def counting_run(argv: Sequence[str], env: Mapping[str, str], what: str) -> None:
        calls.append(what)
        real_run(argv, env, what)

    monkeypatch.setattr(venvs, "_run", counting_run)
    results: list[Interpreter] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_venv(CURRENT, requirements=(), cache=tmp_path))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 1 and calls[0].startswith("creating venv")
    assert len({result.path for result in results}) == 1
    venv_python = results[0].path
    assert venv_python.parent.parent.parent == tmp_path / "venvs"
    assert results[0].version == CURRENT.version
    prefix = subprocess.run(
        [str(venv_python), "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert prefix.stdout.strip() == "True"


def test_half_built_venv_is_rebuilt(tmp_path: Path) -> None:
    first = ensure_venv(CURRENT, requirements=(), cache=tmp_path)
    (first.path.parent.parent / ".complete").unlink()
    (first.path.parent.parent / "leftover").write_text("from a crashed build")
    again = ensure_venv(CURRENT, requirements=(), cache=tmp_path)
    assert again.path == first.path
    assert not (again.path.parent.parent / "leftover").exists()


def test_failed_step_raises_with_its_output() -> None:
    failing = [sys.executable, "-c", "import sys; print('No matching distribution for numpy'); sys.exit(3)"]
    with pytest.raises(SandboxError, match=r"installing numpy: exit 3\nNo matching distribution") as error:
        venvs._run(failing, {}, "installing numpy")
    assert "hint:" in str(error.value)
    with pytest.raises(SandboxError, match="creating venv"):
        venvs._run(["/nonexistent/python3.99"], {}, "creating venv")


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="not running from the source tree")
def test_cell_image_preinstalls_the_runtime_requirements_and_the_mcp_sdk() -> None:
    """Docker cells get what cgroup venvs get, plus the MCP SDK."""
    from gguf_sandbox.mcp.client import SDK_REQUIREMENT

    dockerfile = (PYPROJECT.parent / "images" / "Dockerfile").read_text()
    line = next(line for line in dockerfile.splitlines() if line.startswith("ARG RUNTIME_DEPS="))
    preinstalled = set(line.partition("=")[2].strip('"').split())
    assert {*RUNTIME_REQUIREMENTS, SDK_REQUIREMENT} <= preinstalled
    assert '"/src[mcp]"' in dockerfile
