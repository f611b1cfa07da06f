"""The cgroup backend: cells as jailed local processes in a memory cgroup, a venv per Python version."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import gguf_sandbox
from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, PIDS_LIMIT, CellSpec, RunResult
from gguf_sandbox.sandbox.cgroup.attach import LimitedCell, attach_limited
from gguf_sandbox.sandbox.cgroup.placement import (
    cgroups_writable,
)
from gguf_sandbox.sandbox.cgroup.process import run_limited
from gguf_sandbox.sandbox.interpreters import Interpreter, find_interpreter, parse_version
from gguf_sandbox.sandbox.isolation import (
    Jail,
)
from gguf_sandbox.sandbox.sampling import SampleWatcher
from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS, ensure_venv, package_root
from gguf_sandbox.sandbox.wheelhouse import ensure_wheels


def substitute_model(argv: Sequence[str], model: Path | None) -> tuple[str, ...]:
    """argv with MODEL_PLACEHOLDER replaced by the model path (refused when the cell has no model)."""
    if model is None:
        if any(MODEL_PLACEHOLDER in arg for arg in argv):
            raise SandboxError(f"argv {list(argv)} uses {MODEL_PLACEHOLDER} but the cell has no model")
        return tuple(argv)
    path = str(model.resolve())
    return tuple(arg.replace(MODEL_PLACEHOLDER, path) for arg in argv)


# The parent's interpreter settings must not leak into a cell running another Python version.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION", "PYTHONSTARTUP")
# All a jailed cell gets from the runner's environment (no tokens, no DOCKER_HOST, no paths into /root).
_PASSED_ENV = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)

# A jailed cell's home and temp are its private /tmp; its package sources are read-only.
_JAIL_ENV = {"HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


class CgroupSandbox:
    """Runs cells as local jailed processes in a memory cgroup, with a cached venv per Python version."""

    name = "cgroup"

    def __init__(self, root: Path = Path("/"), cache: Path | None = None) -> None:
        self._root = root
        self._cache = cache
        self._found: dict[str, Interpreter | None] = {}
        self._venvs: dict[tuple[str, tuple[str, ...]], Interpreter] = {}
        self._lock = threading.Lock()

    def _interpreter(self, python: str) -> Interpreter | None:
        with self._lock:
            if python not in self._found:
                self._found[python] = find_interpreter(python)
            return self._found[python]

    def unavailable_reason(self, python: str) -> str | None:
        reason = cgroups_writable(self._root)
        if reason is not None:
            return reason
        try:
            parse_version(python)
        except ValueError as error:
            return str(error)
        if self._interpreter(python) is None:
            return f"no Python {python} found on PATH, in pyenv ($PYENV_ROOT, ~/.pyenv) or uv"
        return None

    def interpreter(self, python: str, requirements: Sequence[str] = ()) -> Interpreter:
        """The venv interpreter cells of `python` run with (built on first use), plus `requirements`."""
        base = self._interpreter(python)
        if base is None:
            raise SandboxError(f"no Python {python} interpreter; hint: install it with pyenv or uv")
        key = (python, tuple(requirements))
        with self._lock:
            if key not in self._venvs:
                # Peer cells: wheels PyPI has only as source come from the wheelhouse (compiled once).
                links = ensure_wheels(base.path, python, requirements, self._cache) if requirements else None
                venv = ensure_venv(
                    base,
                    (*RUNTIME_REQUIREMENTS, *requirements),
                    cache=self._cache,
                    find_links=(links,) if links is not None and links.is_dir() else (),
                )
                _compile_package(venv)
                self._venvs[key] = venv
            return self._venvs[key]

    def child_env(self, interpreter: Interpreter, extra: Mapping[str, str]) -> dict[str, str]:
        """The cell's environment: a short allow-list of the runner's, the interpreter's, the spec's."""
        env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
        env.update(interpreter.env)
        env["PYTHONPATH"] = str(package_root(self._cache))
        env.update(_JAIL_ENV)
        env.update(extra)
        return env

    def jail(self, interpreter: Interpreter, model: Path | None, extra: Sequence[Path] = ()) -> Jail:
        """What a cell of `interpreter` may see, read-only and at their host paths: the venv and its base
        Python, the package, the model, and `extra` (host files its argv names)."""
        return Jail(
            (
                *_interpreter_paths(interpreter),
                package_root(self._cache),
                Path(gguf_sandbox.__file__).resolve().parent,
                *([model.resolve()] if model is not None else []),
                *(path.resolve() for path in extra),
            )
        )

    def _cell(self, spec: CellSpec) -> tuple[tuple[str, ...], dict[str, str], Jail]:
        interpreter = self.interpreter(spec.python, spec.requirements)
        argv = (str(interpreter.path), *substitute_model(spec.argv, spec.model))
        mounted = tuple(mount.source for mount in spec.mounts)
        return argv, self.child_env(interpreter, spec.env), self.jail(interpreter, spec.model, mounted)

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        argv, env, jail = self._cell(spec)
        return run_limited(
            argv,
            spec.memory,
            spec.timeout,
            env=env,
            root=self._root,
            pids_limit=PIDS_LIMIT,
            jail=jail,
            watch=watch,
        )

    @contextlib.contextmanager
    def attach(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> Iterator[LimitedCell]:
        """The cell as a command for a host-side client (AttachableSandbox); see attach_limited."""
        argv, env, jail = self._cell(spec)
        with attach_limited(
            argv,
            spec.memory,
            spec.timeout,
            env=env,
            root=self._root,
            pids_limit=PIDS_LIMIT,
            jail=jail,
            watch=watch,
        ) as cell:
            yield cell


def _interpreter_paths(interpreter: Interpreter) -> list[Path]:
    """The venv, the prefix of the Python it was made from, and the library dirs it is started with."""
    venv = interpreter.path.parent.parent
    base = Path(os.path.realpath(interpreter.path)).parent.parent
    libraries = interpreter.env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    return [venv, base, *(Path(entry) for entry in libraries if entry)]


def _compile_package(interpreter: Interpreter) -> None:
    """Byte-compile the package for `interpreter` once: jailed cells cannot write __pycache__ themselves.

    Best effort — without it a cell compiles the modules it imports in memory, as before.
    """
    package = Path(gguf_sandbox.__file__).resolve().parent
    env = {**os.environ, **interpreter.env}
    for name in _DROPPED_ENV:
        env.pop(name, None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [str(interpreter.path), "-m", "compileall", "-q", str(package)],
            capture_output=True,
            env=env,
            timeout=300,
            check=False,
        )
