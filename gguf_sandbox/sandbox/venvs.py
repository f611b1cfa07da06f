"""Cached per-version virtualenvs holding gguf-sandbox's runtime dependencies for cells run locally."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf_sandbox
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.paths import sources_dir, venvs_dir
from gguf_sandbox.sandbox.interpreters import Interpreter, verify

# Kept equal to [project].dependencies in pyproject.toml (a test checks it).
RUNTIME_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.26",
    "gguf>=0.10",
    "psutil>=5.9",
    "pyyaml>=6",
    "safetensors>=0.4",
)

INSTALL_TIMEOUT = 1800.0
_COMPLETE = ".complete"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def package_root(cache: Path | None = None) -> Path:
    """A directory whose only entry links to this gguf_sandbox package: put it on the child's PYTHONPATH.

    Linking (not installing) keeps venvs valid across source edits and keeps sibling directories of the
    package (tests/, bench/, another site-packages) out of the child's import path.
    """
    package = Path(gguf_sandbox.__file__).resolve().parent
    directory = sources_dir(cache) / _digest(str(package))
    link = directory / "gguf_sandbox"
    if link.is_symlink() and link.resolve() == package:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".gguf_sandbox.{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(package, target_is_directory=True)
    staging.replace(link)
    return directory


def _run(argv: Sequence[str], env: Mapping[str, str], what: str) -> None:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=dict(env), timeout=INSTALL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise SandboxError(
            f"{what}: {error}; hint: check the interpreter and network access to PyPI"
        ) from error
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SandboxError(
            f"{what}: exit {done.returncode}\n{tail}\nhint: check network access to PyPI and that the "
            "interpreter has the venv module (Debian: python3.X-venv)"
        )


def ensure_venv(
    base: Interpreter,
    requirements: Sequence[str] = RUNTIME_REQUIREMENTS,
    cache: Path | None = None,
    find_links: Sequence[Path] = (),
) -> Interpreter:
    """The venv interpreter for `base` with `requirements` installed; built once, shared across processes.
    `find_links`: directories of wheels pip takes first (the wheelhouse of wheels compiled here)."""
    root = venvs_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    key = _digest(base.version, str(base.path), *sorted(requirements))
    directory = root / f"py{base.version}-{key}"
    python = directory / "bin" / "python"
    env = {**os.environ, **base.env}
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(name, None)
    with open(root / f".{directory.name}.lock", "w") as lock:
        # Only one process builds a given venv; the others wait here and then find it complete.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / _COMPLETE).is_file():
            shutil.rmtree(directory, ignore_errors=True)
            pip = () if requirements else ("--without-pip",)
            _run([str(base.path), "-m", "venv", *pip, str(directory)], env, f"creating venv {directory}")
            if requirements:
                _run(
                    [
                        str(python),
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        *(word for link in find_links for word in ("--find-links", str(link))),
                        *requirements,
                    ],
                    env,
                    f"installing {', '.join(requirements)} into {directory}",
                )
            (directory / _COMPLETE).write_text("\n".join(requirements) + "\n")
    found = verify(python, base.version, env)
    if found is None:
        raise SandboxError(
            f"venv {directory} does not run as Python {base.version}; hint: delete it to have it rebuilt"
        )
    return Interpreter(base.version, python, {**base.env, **found.env}, f"venv of {base.origin}")
