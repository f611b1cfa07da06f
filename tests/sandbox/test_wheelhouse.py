"""The wheelhouse: peer wheels PyPI has only as source are compiled once, then found and reused."""

from __future__ import annotations

import fcntl
import io
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import gguf_sandbox
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.wheelhouse import (
    PEER_REQUIREMENTS,
    SOURCE_BUILT,
    build_env,
    ensure_wheels,
    find_wheel,
    pinned,
    wheel_command,
)

PYPROJECT = Path(gguf_sandbox.__file__).resolve().parent.parent / "pyproject.toml"
LLAMA = "llama-cpp-python==0.3.36"
PYTHON = Path("/opt/python3.12/bin/python3.12")


def zip_bytes() -> bytes:
    """An archive as small as a wheel can be (what find_wheel checks a wheel is)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("llama_cpp/__init__.py", "")
    return buffer.getvalue()


WHEEL = zip_bytes()


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="not running from the source tree")
def test_peer_requirements_are_the_peers_extra() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is 3.11+")
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["peers"]
    assert sorted(PEER_REQUIREMENTS) == sorted(declared)
    assert set(SOURCE_BUILT) <= set(PEER_REQUIREMENTS)


def test_the_build_command_compiles_one_wheel_without_dependencies(tmp_path: Path) -> None:
    assert wheel_command(PYTHON, LLAMA, tmp_path) == [
        str(PYTHON),
        *("-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python"),
        *("--disable-pip-version-check", "--wheel-dir", str(tmp_path), LLAMA),
    ]
    env = build_env({"PATH": "/usr/bin", "PYTHONPATH": "/src", "VIRTUAL_ENV": "/v"}, cpus=2)
    assert env == {"PATH": "/usr/bin", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    assert build_env({"CMAKE_BUILD_PARALLEL_LEVEL": "1"}, cpus=8)["CMAKE_BUILD_PARALLEL_LEVEL"] == "1"


@pytest.mark.parametrize(
    ("name", "python", "found"),
    [
        ("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl", "3.12", True),
        ("llama_cpp_python-0.3.36-cp312-cp312-linux_x86_64.whl", "3.12", True),
        ("llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl", "3.12", False),
        ("llama_cpp_python-0.3.35-py3-none-linux_x86_64.whl", "3.12", False),
        ("llama_cpp-0.3.36-py3-none-any.whl", "3.12", False),
        ("llama_cpp_python-0.3.36.tar.gz", "3.12", False),
    ],
    ids=["py3-none", "same-cpython", "other-cpython", "other-version", "other-name", "sdist"],
)
def test_a_wheel_is_reused_only_for_the_pythons_it_installs_on(
    tmp_path: Path, name: str, python: str, found: bool
) -> None:
    (tmp_path / name).write_bytes(WHEEL)
    assert (find_wheel(tmp_path, LLAMA, python) is not None) is found


def test_requirements_must_be_pinned() -> None:
    assert pinned("Llama.CPP-python==0.3.36") == ("llama_cpp_python", "0.3.36")
    with pytest.raises(SandboxError, match=r"'llama-cpp-python>=0.3' is not pinned as name==version"):
        pinned("llama-cpp-python>=0.3")


class FakePip:
    """Stands in for `pip wheel`: writes the wheel into --wheel-dir (or fails), counting its calls."""

    def __init__(self, returncode: int = 0, wheel: str = "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"):
        self.calls: list[list[str]] = []
        self.returncode = returncode
        self.wheel = wheel

    def __call__(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(command)
        assert kwargs["env"]["CMAKE_BUILD_PARALLEL_LEVEL"]
        if self.returncode == 0:
            directory = Path(command[command.index("--wheel-dir") + 1])
            (directory / self.wheel).write_bytes(WHEEL)
        return subprocess.CompletedProcess(command, self.returncode, "", "CMake Error: no compiler\n")


def test_a_missing_wheel_is_built_once_then_reused(tmp_path: Path) -> None:
    pip, lines = FakePip(), list[str]()
    first = ensure_wheels(PYTHON, "3.12", PEER_REQUIREMENTS, tmp_path, log=lines.append, runner=pip)
    assert [c[-1] for c in pip.calls] == [LLAMA] and pip.calls[0][0] == str(PYTHON)
    assert sorted(p.name for p in first.iterdir()) == ["llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"]
    assert "compiling llama-cpp-python==0.3.36" in lines[0] and "built llama_cpp_python" in lines[1]
    again = ensure_wheels(PYTHON, "3.13", PEER_REQUIREMENTS, tmp_path, log=lines.append, runner=pip)
    assert again == first and len(pip.calls) == 1 and "reused" in lines[-1]


def test_requirements_with_wheels_on_pypi_build_nothing(tmp_path: Path) -> None:
    pip = FakePip()
    ensure_wheels(PYTHON, "3.12", ("torch==2.13.0",), tmp_path, runner=pip)
    assert pip.calls == [] and not (tmp_path / "wheels").exists()


def test_a_failed_build_names_the_requirement_and_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=r"building llama-cpp-python==0.3.36 failed \(exit 1\)") as error:
        ensure_wheels(PYTHON, "3.12", (LLAMA,), tmp_path, log=lambda line: None, runner=FakePip(1))
    assert "CMake Error: no compiler" in str(error.value) and "build-essential cmake" in str(error.value)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_a_build_that_leaves_a_wheel_for_another_python_fails(tmp_path: Path) -> None:
    pip = FakePip(wheel="llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl")
    with pytest.raises(SandboxError, match=r"left no wheel for Python 3.12"):
        ensure_wheels(PYTHON, "3.12", (LLAMA,), tmp_path, log=lambda line: None, runner=pip)


def test_the_real_command_runs_pip(tmp_path: Path) -> None:
    """The command is one pip understands (--help: nothing is downloaded or compiled)."""
    command = wheel_command(Path(sys.executable), LLAMA, tmp_path)
    done = subprocess.run([*command[:4], "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "--no-binary" in done.stdout and "--wheel-dir" in done.stdout


@pytest.mark.parametrize(
    "junk",
    ["empty", "truncated", "directory"],
)
def test_junk_under_a_wheels_name_is_one_error_never_reused(tmp_path: Path, junk: str) -> None:
    """Junk named as the wheel was 'reused' as it was: pip failed on it in every venv and image build later,
    and a directory made the peer image's hash fail with IsADirectoryError."""
    wheel = tmp_path / "wheels" / "llama_cpp_python-0.3.36-cp312-cp312-linux_x86_64.whl"
    wheel.parent.mkdir()
    if junk == "directory":
        wheel.mkdir()
    else:
        wheel.write_bytes(WHEEL[: len(WHEEL) // 2] if junk == "truncated" else b"")
    pip = FakePip()
    with pytest.raises(
        SandboxError, match=r"is no wheel \(not a zip archive.*remove it and it is built again"
    ):
        ensure_wheels(PYTHON, "3.12", (LLAMA,), tmp_path, log=lambda line: None, runner=pip)
    assert pip.calls == [] and wheel.exists()
    # Another Python's wheels are no concern of this one.
    assert find_wheel(wheel.parent, LLAMA, "3.11") is None


def test_a_second_build_waits_for_the_first_says_so_and_reuses_its_wheel(tmp_path: Path) -> None:
    """Two runners at once: the second waited on the lock for the first's ~10 min build without a word."""
    (tmp_path / "locks").mkdir()
    lines: list[str] = []
    pip = FakePip()
    with open(tmp_path / "locks" / "wheelhouse.lock", "w") as first:
        fcntl.flock(first, fcntl.LOCK_EX)  # the first runner, compiling
        second = threading.Thread(
            target=ensure_wheels,
            args=(PYTHON, "3.12", (LLAMA,), tmp_path),
            kwargs={"log": lines.append, "runner": pip},
        )
        second.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines and "another process is compiling into" in lines[0] and "waiting" in lines[0]
        (tmp_path / "wheels" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(WHEEL)
    second.join(30)
    assert not second.is_alive() and pip.calls == [] and "reused" in lines[-1]


@pytest.mark.parametrize("junk", ["wheels", "locks"])
def test_a_file_where_the_wheelhouse_goes_is_one_error(tmp_path: Path, junk: str) -> None:
    """A file where the wheels (or locks) directory goes escaped as a FileExistsError, not the SandboxError
    a runner records for the cell."""
    (tmp_path / junk).write_text("not a directory\n")
    with pytest.raises(
        SandboxError, match=r"^wheelhouse .*wheels: \[Errno \d+\] .*must be a writable directory"
    ):
        ensure_wheels(PYTHON, "3.12", (LLAMA,), tmp_path, log=lambda line: None, runner=FakePip())
    assert (tmp_path / junk).read_text() == "not a directory\n"
