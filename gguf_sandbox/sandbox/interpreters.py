"""Python interpreter discovery: find a working python3.X on PATH, in pyenv, in uv, or ourselves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_VERSION = re.compile(r"^3\.(\d+)$")
_PROBE = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)"
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Interpreter:
    """A verified interpreter: `path` runs and reports `version`; `env` is what the child needs to start."""

    version: str
    path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    origin: str = ""


def parse_version(version: str) -> tuple[int, int]:
    """ "3.12" -> (3, 12); anything else is refused."""
    match = _VERSION.match(version.strip())
    if match is None:
        raise ValueError(f"Python version {version!r}: expected '3.X', e.g. '3.12'")
    return 3, int(match.group(1))


def _patch_key(path: Path) -> tuple[int, ...]:
    """Sort key for pyenv/uv directory names: 3.12.10 after 3.12.9; pre-releases sort by digits found."""
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ["HOME"]) if environ.get("HOME") else Path.home()


def _on_path(minor: str, environ: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    found = shutil.which(f"python{minor}", path=environ.get("PATH", os.defpath))
    if found:
        yield Path(found), "PATH"


def _pyenv(minor: str, environ: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    root = Path(environ["PYENV_ROOT"]) if environ.get("PYENV_ROOT") else _home(environ) / ".pyenv"
    versions = root / "versions"
    if not versions.is_dir():
        return
    pattern = re.compile(rf"^{re.escape(minor)}\.\d+$")
    candidates = [p for p in versions.iterdir() if pattern.match(p.name)]
    for prefix in sorted(candidates, key=_patch_key, reverse=True):
        yield prefix / "bin" / f"python{minor}", "pyenv"


def _uv(minor: str, environ: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    if environ.get("UV_PYTHON_INSTALL_DIR"):
        base = Path(environ["UV_PYTHON_INSTALL_DIR"])
    else:
        data = (
            Path(environ["XDG_DATA_HOME"])
            if environ.get("XDG_DATA_HOME")
            else _home(environ) / ".local/share"
        )
        base = data / "uv" / "python"
    if not base.is_dir():
        return
    # Names look like cpython-3.12.7-linux-x86_64-gnu; free-threaded ones ("3.13.0+freethreaded") are skipped.
    pattern = re.compile(rf"^cpython-{re.escape(minor)}\.\d+-")
    candidates = [p for p in base.iterdir() if pattern.match(p.name)]
    for prefix in sorted(candidates, key=_patch_key, reverse=True):
        yield prefix / "bin" / f"python{minor}", "uv"


def _current(minor: str, environ: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == minor and sys.executable:
        yield Path(sys.executable), "current"


# Searched in this order; the first candidate that runs and reports the right version wins.
SOURCES: tuple[Callable[[str, Mapping[str, str]], Iterator[tuple[Path, str]]], ...] = (
    _on_path,
    _pyenv,
    _uv,
    _current,
)


def _probe(path: Path, env: Mapping[str, str]) -> tuple[str, Path] | None:
    """Run the candidate; return (version, real executable) or None when it does not start."""
    try:
        done = subprocess.run(
            [str(path), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            env=dict(env),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in done.stdout.splitlines()]
    if done.returncode != 0 or len(lines) < 2 or not lines[1]:
        return None
    return lines[0], Path(lines[1])


def verify(path: Path, version: str, environ: Mapping[str, str] | None = None) -> Interpreter | None:
    """An Interpreter if `path` runs as Python `version`, retrying with its lib/ on LD_LIBRARY_PATH."""
    base = dict(os.environ if environ is None else environ)
    attempts: list[dict[str, str]] = [{}]
    lib = path.resolve().parent.parent / "lib"
    if lib.is_dir():
        previous = base.get("LD_LIBRARY_PATH", "")
        attempts.append({"LD_LIBRARY_PATH": f"{lib}{os.pathsep}{previous}" if previous else str(lib)})
    for extra in attempts:
        result = _probe(path, {**base, **extra})
        if result is not None and result[0] == version:
            return Interpreter(version, result[1], extra)
    return None


def find_interpreter(version: str, environ: Mapping[str, str] | None = None) -> Interpreter | None:
    """The first working interpreter for "3.X" from PATH, pyenv, uv, then the running interpreter."""
    parse_version(version)
    env = os.environ if environ is None else environ
    seen: set[Path] = set()
    for source in SOURCES:
        for candidate, origin in source(version, env):
            if candidate in seen or not candidate.exists():
                continue
            seen.add(candidate)
            found = verify(candidate, version, env)
            if found is not None:
                return Interpreter(found.version, found.path, found.env, origin)
    return None
