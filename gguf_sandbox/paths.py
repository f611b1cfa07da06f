"""The cache directory rule: where prepared models, venvs, image inputs and locks live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CACHE_VARIABLE = "GGUF_SANDBOX_CACHE"
APP_NAME = "gguf-sandbox"


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """$GGUF_SANDBOX_CACHE, else $XDG_CACHE_HOME/gguf-sandbox, else ~/.cache/gguf-sandbox (not created)."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_VARIABLE):
        return Path(env[CACHE_VARIABLE])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / APP_NAME


# Each subdirectory of the cache below: under `root` when given (a caller's own cache), else cache_root().


def models_dir(root: Path | None = None) -> Path:
    """Converted and synthesized matrix models, named by recipe hash."""
    return (root or cache_root()) / "models"


def suite_models_dir(root: Path | None = None) -> Path:
    """Models the test suite builds once per machine."""
    return (root or cache_root()) / "test-models"


def venvs_dir(root: Path | None = None) -> Path:
    """One virtualenv per Python version and requirement set, for cgroup cells."""
    return (root or cache_root()) / "venvs"


def sources_dir(root: Path | None = None) -> Path:
    """Directories whose only entry links to the gguf_sandbox package (a cgroup cell's PYTHONPATH)."""
    return (root or cache_root()) / "src"


def wheels_dir(root: Path | None = None) -> Path:
    """The wheelhouse: wheels built here from source once (llama-cpp-python), for every venv and image."""
    return (root or cache_root()) / "wheels"


def images_dir(root: Path | None = None) -> Path:
    """Inputs of Docker image builds: offline rootfs tarballs, build contexts, base recipes."""
    return (root or cache_root()) / "images"


def locks_dir(root: Path | None = None) -> Path:
    """Lock files that serialize builds across processes."""
    return (root or cache_root()) / "locks"
