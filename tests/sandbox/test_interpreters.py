"""Tests for interpreter discovery: this machine's 3.10–3.13, and fake pyenv/uv trees built in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_sandbox.sandbox.interpreters import find_interpreter, parse_version, verify

CURRENT = f"{sys.version_info[0]}.{sys.version_info[1]}"
REAL = Path(sys.executable).resolve()


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_finds_each_supported_version_on_this_machine(version: str) -> None:
    found = find_interpreter(version)
    if found is None:
        pytest.skip(f"no Python {version} on PATH, in pyenv or uv here")
    assert found.version == version
    done = subprocess.run(
        [str(found.path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        env={**os.environ, **found.env},
        check=True,
    )
    assert done.stdout.strip() == version


def test_current_interpreter_is_found() -> None:
    found = find_interpreter(CURRENT)
    assert found is not None and found.version == CURRENT


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.10", (3, 10)), ("3.13", (3, 13)), (" 3.9 ", (3, 9))],
    ids=["3.10", "3.13", "padded"],
)
def test_parse_version(text: str, expected: tuple[int, int]) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["3", "3.12.1", "python3.12", "2.7", ""], ids=repr)
def test_parse_version_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected '3\.X'"):
        find_interpreter(text)


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _isolated(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment where only the fake trees exist: empty PATH, HOME in tmp_path."""
    return {"PATH": str(tmp_path / "empty-bin"), "HOME": str(tmp_path / "home"), **extra}


def test_pyenv_prefers_the_newest_working_patch(tmp_path: Path) -> None:
    versions = tmp_path / "pyenv" / "versions"
    _script(versions / f"{CURRENT}.99" / "bin" / f"python{CURRENT}", "exit 1")
    good = _link(REAL, versions / f"{CURRENT}.10" / "bin" / f"python{CURRENT}")
    _link(REAL, versions / f"{CURRENT}.9" / "bin" / f"python{CURRENT}")
    found = find_interpreter(CURRENT, _isolated(tmp_path, PYENV_ROOT=str(tmp_path / "pyenv")))
    assert found is not None
    assert (found.origin, found.path) == ("pyenv", good)


def test_pyenv_default_root_is_under_home(tmp_path: Path) -> None:
    env = _isolated(tmp_path)
    linked = _link(REAL, Path(env["HOME"]) / ".pyenv/versions" / f"{CURRENT}.1" / "bin" / f"python{CURRENT}")
    found = find_interpreter(CURRENT, env)
    assert found is not None and (found.origin, found.path) == ("pyenv", linked)


def test_uv_managed_python_is_found(tmp_path: Path) -> None:
    base = tmp_path / "uv"
    linked = _link(REAL, base / f"cpython-{CURRENT}.4-linux-x86_64-gnu" / "bin" / f"python{CURRENT}")
    _link(REAL, base / f"cpython-{CURRENT}.5+freethreaded-linux-x86_64-gnu" / "bin" / f"python{CURRENT}t")
    found = find_interpreter(CURRENT, _isolated(tmp_path, UV_PYTHON_INSTALL_DIR=str(base)))
    assert found is not None and (found.origin, found.path) == ("uv", linked)


def test_path_comes_first_and_wrong_versions_are_rejected(tmp_path: Path) -> None:
    env = _isolated(tmp_path)
    bin_dir = Path(env["PATH"])
    # A shim that answers with the wrong version (a pyenv shim for an inactive version fails similarly).
    _link(REAL, bin_dir / "python3.99")
    assert find_interpreter("3.99", env) is None
    on_path = _link(REAL, bin_dir / f"python{CURRENT}")
    _link(REAL, Path(env["HOME"]) / ".pyenv/versions" / f"{CURRENT}.1" / "bin" / f"python{CURRENT}")
    found = find_interpreter(CURRENT, env)
    assert found is not None and (found.origin, found.path) == ("PATH", on_path)


def test_falls_back_to_the_running_interpreter(tmp_path: Path) -> None:
    found = find_interpreter(CURRENT, _isolated(tmp_path))
    assert found is not None and found.origin == "current"
    assert found.path.resolve() == REAL


def test_missing_shared_library_is_retried_with_ld_library_path(tmp_path: Path) -> None:
    prefix = tmp_path / "pyenv" / "versions" / f"{CURRENT}.2"
    lib = prefix / "lib"
    lib.mkdir(parents=True)
    # Starts only when its lib/ is on LD_LIBRARY_PATH, like a libpython3.X.so build without an rpath.
    python = _script(
        prefix / "bin" / f"python{CURRENT}",
        f'case ":$LD_LIBRARY_PATH:" in *":{lib}:"*) exec {REAL} "$@";; esac\n'
        "echo 'error while loading shared libraries: libpython' >&2; exit 127",
    )
    assert verify(python, CURRENT, {"PATH": os.defpath, "LD_LIBRARY_PATH": "/opt/other"}) is not None
    found = find_interpreter(CURRENT, _isolated(tmp_path, PYENV_ROOT=str(tmp_path / "pyenv")))
    assert found is not None and found.origin == "pyenv"
    assert found.env == {"LD_LIBRARY_PATH": str(lib)}
