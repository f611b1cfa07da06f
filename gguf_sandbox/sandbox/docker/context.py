"""The build context of a cell image: its files, their content hash, the tar, the build lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.paths import images_dir, locks_dir

if TYPE_CHECKING:
    pass


# Part of every content hash: bump it when the recipe changes in a way the hashed files do not show.
RECIPE_VERSION = "1"


def images_workdir() -> Path:
    """Where rootfs tarballs, build contexts and base recipes live (paths.images_dir, created)."""
    path = images_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_project_dir(start: Path | None = None) -> Path:
    """The source checkout to install into images: `start`, else the one this package was imported from."""
    package_root = Path(__file__).resolve().parents[3]
    candidates = [start] if start is not None else [package_root, Path.cwd()]
    for candidate in candidates:
        if (candidate / "pyproject.toml").is_file() and (candidate / "images" / "Dockerfile").is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise SandboxError(
        f"no gguf-sandbox source checkout (pyproject.toml + images/Dockerfile) at {looked}; "
        "hint: run from the project directory or pass --project"
    )


def project_files(project_dir: Path) -> list[tuple[str, Path]]:
    """(name in the build context, file) for everything the image is built from, sorted by name."""
    project_dir = Path(project_dir)
    dockerfile = project_dir / "images" / "Dockerfile"
    pyproject = project_dir / "pyproject.toml"
    package = project_dir / "gguf_sandbox"
    for required in (dockerfile, pyproject, package):
        if not required.exists():
            raise SandboxError(f"cannot build an image: {required} is missing; hint: pass the project root")
    files = [("Dockerfile", dockerfile), ("pyproject.toml", pyproject)]
    files += [(p.name, p) for p in sorted(project_dir.glob("README*")) + sorted(project_dir.glob("LICENSE*"))]
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files.append((path.relative_to(project_dir).as_posix(), path))
    return sorted(files)


def build_ca_bundle() -> list[tuple[str, Path]]:
    """The host's CA bundle as build-ca.pem, so pip inside the build trusts what the host trusts.

    Not part of the content hash: it changes how sources are fetched, not what the image contains.
    """
    import ssl

    names = [os.environ.get(var) for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    names.append(ssl.get_default_verify_paths().cafile)
    bundle = next((Path(name) for name in names if name and Path(name).is_file()), None)
    return [] if bundle is None else [("build-ca.pem", bundle)]


def content_hash(python: str, files: Sequence[tuple[str, Path]]) -> str:
    """sha256 over the recipe version, the Python version and every context file's name and bytes."""
    digest = hashlib.sha256(f"gguf-sandbox-image:{RECIPE_VERSION}:{python}\0".encode())
    for name, path in files:
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owner root, fixed mtime: the same sources give the same context bytes."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    if not info.issym():
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


@contextlib.contextmanager
def context_tar(files: Sequence[tuple[str, Path]], *, normalize: bool = True) -> Iterator[Path]:
    """A temporary tar build context holding `files`, removed on exit."""
    handle, name = tempfile.mkstemp(prefix="gguf-sandbox-context-", suffix=".tar", dir=images_workdir())
    os.close(handle)
    path = Path(name)
    try:
        with tarfile.open(path, "w") as archive:
            for arcname, source in files:
                archive.add(
                    source, arcname=arcname, recursive=False, filter=_normalized if normalize else None
                )
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    """Serialize builds of one image across processes (pytest-xdist workers, parallel CLIs)."""
    locks = locks_dir()
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
