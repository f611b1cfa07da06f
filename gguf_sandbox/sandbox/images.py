"""Per-Python Docker images for the matrix: a registry base when one can be pulled, else an offline base."""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.paths import cache_root, images_dir, locks_dir
from gguf_sandbox.sandbox.interpreters import Interpreter, find_interpreter

if TYPE_CHECKING:
    import docker

IMAGE_REPOSITORY = "gguf-sandbox"
BASE_REPOSITORY = "gguf-sandbox-base"
ROOTFS_REPOSITORY = "gguf-sandbox-rootfs"
HASH_LABEL = "org.gguf-sandbox.content-hash"
BASE_LABEL = "org.gguf-sandbox.base-image"
SANDBOX_UID = 10001
DEFAULT_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# Part of every content hash: bump it when the recipe changes in a way the hashed files do not show.
RECIPE_VERSION = "1"
# Network of build containers: the daemon may run with --bridge=none, and pip must reach PyPI.
BUILD_NETWORK = "host"

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """The default progress sink: say nothing."""


@dataclass(frozen=True)
class RootfsRecipe:
    """How the offline Debian root filesystem is made (debootstrap) and what it must contain."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    # The shared libraries a CPython build links against (ssl, ctypes, zlib, sqlite3, bz2, lzma, expat,
    # readline, uuid) plus CA certificates for pip.
    packages: tuple[str, ...] = (
        "ca-certificates",
        "libbz2-1.0",
        "libexpat1",
        "libffi8",
        "liblzma5",
        "libncursesw6",
        "libreadline8",
        "libsqlite3-0",
        "libssl3",
        "libuuid1",
        "zlib1g",
    )
    # Kept out of the tarball: package caches and documentation (about 130 MB).
    excludes: tuple[str, ...] = (
        "./var/cache/apt/archives/*.deb",
        "./var/lib/apt/lists/*",
        "./usr/share/doc/*",
        "./usr/share/man/*",
        "./usr/share/info/*",
        "./usr/share/locale/*",
    )

    @property
    def digest(self) -> str:
        text = json.dumps([self.suite, self.variant, self.mirror, sorted(self.packages), self.excludes])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def image_ref(self) -> str:
        return f"{ROOTFS_REPOSITORY}:{self.suite}-{self.digest[:12]}"


DEFAULT_ROOTFS = RootfsRecipe()


@dataclass(frozen=True)
class ImageBuild:
    """The outcome of ensure/build: which tag, whether the cache answered, what it was built on."""

    tag: str
    image_id: str
    content_hash: str
    cached: bool
    base_image: str
    seconds: float


@dataclass(frozen=True)
class InterpreterLayout:
    """Where a local CPython keeps what a relocated copy under /usr/local needs."""

    version: str
    full_version: str
    executable: Path
    base_prefix: Path
    stdlib: Path
    include: Path | None
    shared_libraries: tuple[Path, ...]

    @property
    def identity(self) -> str:
        """Changes when the interpreter is reinstalled or upgraded in place."""
        parts = [self.full_version, str(self.executable)]
        for path in (self.executable, *self.shared_libraries):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)


def image_tag(python: str) -> str:
    """The tag of the cell image for a Python version, e.g. gguf-sandbox:py3.12."""
    return f"{IMAGE_REPOSITORY}:py{_checked_version(python)}"


def base_tag(python: str) -> str:
    """The tag of the offline base image for a Python version, e.g. gguf-sandbox-base:py3.12."""
    return f"{BASE_REPOSITORY}:py{_checked_version(python)}"


def _checked_version(python: str) -> str:
    if re.fullmatch(r"3\.\d{1,2}", python) is None:
        raise SandboxError(f"Python version {python!r} is not of the form 3.X; hint: use e.g. 3.12")
    return python


def _images_dir() -> Path:
    """Where rootfs tarballs, build contexts and base recipes live (paths.images_dir, created)."""
    path = images_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_project_dir(start: Path | None = None) -> Path:
    """The source checkout to install into images: `start`, else the one this package was imported from."""
    package_root = Path(__file__).resolve().parents[2]
    candidates = [start] if start is not None else [package_root, Path.cwd()]
    for candidate in candidates:
        if (candidate / "pyproject.toml").is_file() and (candidate / "images" / "Dockerfile").is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise SandboxError(
        f"no gguf-sandbox source checkout (pyproject.toml + images/Dockerfile) at {looked}; "
        "hint: run from the project directory or pass --project"
    )


# ---------------------------------------------------------------------------------------------------------
# Build context and content hash


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


def _build_ca_bundle() -> list[tuple[str, Path]]:
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
def _context_tar(files: Sequence[tuple[str, Path]], *, normalize: bool = True) -> Iterator[Path]:
    """A temporary tar build context holding `files`, removed on exit."""
    handle, name = tempfile.mkstemp(prefix="gguf-sandbox-context-", suffix=".tar", dir=_images_dir())
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
def _build_lock(name: str) -> Iterator[None]:
    """Serialize builds of one image across processes (pytest-xdist workers, parallel CLIs)."""
    locks = locks_dir()
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------
# Engine access


def engine_address() -> str:
    """The engine the docker SDK talks to (DOCKER_HOST, else the default socket)."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def engine_client() -> docker.DockerClient:
    """A docker SDK client whose engine answered a ping, else SandboxError saying how to get one."""
    try:
        import docker
    except ImportError as error:
        raise SandboxError(
            f"the docker SDK is not installed ({error}); hint: pip install 'gguf-sandbox[docker]'"
        ) from error
    import requests

    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise SandboxError(
            f"no Docker engine reachable at {engine_address()}: {error}; "
            "hint: start dockerd or use --backend cgroup"
        ) from error
    return client


def _labels_of(client: docker.DockerClient, ref: str) -> dict[str, str] | None:
    """The labels of a local image, {} when it has none, None when there is no such image."""
    import docker

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    return dict(labels)


def _image_id(client: docker.DockerClient, ref: str) -> str:
    return str(client.images.get(ref).id)


def _tag(client: docker.DockerClient, image_id: str, ref: str) -> None:
    """Point `ref` at a finished image and drop the image it replaces (kept if something still uses it)."""
    import docker

    try:
        previous: str | None = _image_id(client, ref)
    except docker.errors.ImageNotFound:
        previous = None
    repository, tag = ref.rsplit(":", 1)
    if not client.api.tag(image_id, repository, tag, force=True):
        raise SandboxError(f"docker refused to tag {image_id} as {ref}")
    if previous is not None and previous != image_id:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(previous)


def _docker_build(
    context: Path,
    *,
    buildargs: dict[str, str],
    labels: dict[str, str],
    network_mode: str,
    log: Log,
) -> str:
    """Build a tar context on a private connection; returns the image id. Nothing is tagged here.

    The connection is private so that closing it on any exit (Ctrl-C included) cancels the build on the
    daemon side; forcerm makes the daemon remove the intermediate containers of a failed build.
    """
    client = engine_client()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    image_id: str | None = None
    try:
        with open(context, "rb") as fileobj:
            stream = client.api.build(
                fileobj=fileobj,
                custom_context=True,
                dockerfile="Dockerfile",
                buildargs=buildargs,
                labels=labels,
                network_mode=network_mode,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    lines = "\n".join(tail)
                    raise SandboxError(f"docker build failed: {chunk['error'].strip()}\n{lines}")
                text = str(chunk.get("stream", ""))
                for line in text.splitlines():
                    if line.strip():
                        tail.append(line)
                        log(line)
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = str(aux["ID"])
                built = re.match(r"Successfully built ([0-9a-f]+)", text)
                if built and image_id is None:
                    image_id = _image_id(client, built.group(1))
    finally:
        client.close()
    if image_id is None:
        raise SandboxError("docker build finished without reporting an image id:\n" + "\n".join(tail))
    return image_id


# ---------------------------------------------------------------------------------------------------------
# Interpreter discovery and layout


_INTROSPECT = r"""
import json, os, sys, sysconfig
libdir = sysconfig.get_config_var("LIBDIR") or ""
names = {sysconfig.get_config_var(k) for k in ("LDLIBRARY", "INSTSONAME")} - {None, ""}
shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
suffixes = (".so", ".so.1", ".so.1.0")
libs = sorted(os.path.join(libdir, n) for n in names if shared and n.endswith(suffixes))
print(json.dumps({
    "version": "%d.%d" % sys.version_info[:2],
    "full_version": sys.version.split()[0],
    "executable": os.path.realpath(sys.executable),
    "base_prefix": sys.base_prefix,
    "stdlib": sysconfig.get_path("stdlib"),
    "include": sysconfig.get_path("include"),
    "shared_libraries": [l for l in libs if os.path.exists(l)],
}))
"""


def _ask_interpreter(interpreter: Interpreter) -> dict[str, Any] | None:
    try:
        done = subprocess.run(
            [str(interpreter.path), "-I", "-c", _INTROSPECT],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **interpreter.env},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None
    return answer


def find_local_interpreter(python: str) -> InterpreterLayout | None:
    """Where the local CPython `python` (3.X) found by interpreter discovery keeps its parts, else None."""
    interpreter = find_interpreter(_checked_version(python))
    answer = _ask_interpreter(interpreter) if interpreter is not None else None
    if answer is None or answer["version"] != python:
        return None
    return InterpreterLayout(
        version=answer["version"],
        full_version=answer["full_version"],
        executable=Path(answer["executable"]),
        base_prefix=Path(answer["base_prefix"]),
        stdlib=Path(answer["stdlib"]),
        include=Path(answer["include"]) if answer.get("include") else None,
        shared_libraries=tuple(Path(p) for p in answer["shared_libraries"]),
    )


# Top-level stdlib entries a cell never needs: tests, GUIs and the host's installed packages.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo"})


def interpreter_payload(layout: InterpreterLayout) -> list[tuple[str, Path]]:
    """(path under /usr/local, file) for a relocated copy of the interpreter; symlinks kept as links."""
    prefix = layout.base_prefix

    def relative(path: Path) -> str:
        try:
            return path.relative_to(prefix).as_posix()
        except ValueError:
            raise SandboxError(
                f"Python {layout.version} at {layout.executable} keeps {path} outside its prefix {prefix}; "
                "cannot relocate it into an image; hint: use a pyenv or uv interpreter"
            ) from None

    entries = [(f"bin/python{layout.version}", layout.executable)]
    entries += [(relative(lib), lib) for lib in layout.shared_libraries]
    stdlib = relative(layout.stdlib)
    for path in sorted(layout.stdlib.rglob("*")):
        inside = path.relative_to(layout.stdlib)
        if (
            inside.parts[0] in _STDLIB_SKIP
            or path.suffix == ".a"
            or (path.is_dir() and not path.is_symlink())
        ):
            continue
        entries.append((f"{stdlib}/{inside.as_posix()}", path))
    if layout.include is not None and layout.include.is_dir():
        include = relative(layout.include)
        entries += [
            (f"{include}/{p.relative_to(layout.include).as_posix()}", p)
            for p in sorted(layout.include.rglob("*"))
            if p.is_file()
        ]
    return entries


_BASE_DOCKERFILE = """\
FROM {rootfs}
COPY python/ /usr/local/
RUN ldconfig \\
 && ln -sf python{version} /usr/local/bin/python3 \\
 && ln -sf python3 /usr/local/bin/python \\
 && python3 -c "import ssl, sqlite3, ctypes, zlib, bz2, lzma, ensurepip, pyexpat"
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
CMD ["python3"]
"""


# ---------------------------------------------------------------------------------------------------------
# Offline base: debootstrap rootfs (cached tarball) + local interpreter


def _unmount_below(root: Path) -> None:
    """Lazily unmount anything an interrupted debootstrap left mounted inside `root` (deepest first)."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    prefix = str(root.resolve()) + "/"
    points = [line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def ensure_rootfs_tarball(recipe: RootfsRecipe = DEFAULT_ROOTFS, log: Log = _quiet) -> Path:
    """The cached Debian rootfs tarball for `recipe`, made with debootstrap when missing."""
    name = f"rootfs-{recipe.suite}-{recipe.variant}-{recipe.digest[:12]}.tar"
    tarball = _images_dir() / name
    legacy = cache_root() / name  # where tarballs lived before images/: reuse, debootstrap needs a mirror
    if not tarball.is_file() and legacy.is_file():
        with contextlib.suppress(OSError):
            os.link(legacy, tarball)
    if tarball.is_file():
        return tarball
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise SandboxError(
            "the offline base needs debootstrap, which is not installed; "
            "hint: apt-get install -y debootstrap (or make python:3.X-slim pullable)"
        )
    if os.geteuid() != 0:
        raise SandboxError(
            f"debootstrap must run as root to create {tarball}; hint: run `gguf-sandbox images build` "
            "once as root, or make python:3.X-slim pullable"
        )
    with _build_lock(tarball.name):
        if tarball.is_file():
            return tarball
        workdir = Path(tempfile.mkdtemp(prefix="rootfs-", dir=_images_dir()))
        partial = tarball.with_name(tarball.name + f".{os.getpid()}.part")
        try:
            log(f"debootstrap {recipe.variant} {recipe.suite} (about a minute)")
            command = [
                debootstrap,
                f"--variant={recipe.variant}",
                f"--include={','.join(recipe.packages)}",
                recipe.suite,
                str(workdir / "root"),
                recipe.mirror,
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise SandboxError(
                    f"debootstrap of {recipe.suite} from {recipe.mirror} failed (exit {done.returncode}); "
                    f"hint: check that the Debian mirror is reachable\n{tail}"
                )
            excludes = [f"--exclude={pattern}" for pattern in recipe.excludes]
            subprocess.run(
                ["tar", "--numeric-owner", *excludes, "-C", str(workdir / "root"), "-cf", str(partial), "."],
                check=True,
                capture_output=True,
            )
            os.replace(partial, tarball)
        finally:
            _unmount_below(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            partial.unlink(missing_ok=True)
    return tarball


def ensure_rootfs_image(
    client: docker.DockerClient, recipe: RootfsRecipe = DEFAULT_ROOTFS, log: Log = _quiet
) -> str:
    """The imported rootfs image (shared by every Python version), importing the tarball when missing."""
    ref = recipe.image_ref
    if _labels_of(client, ref) is not None:
        return ref
    tarball = ensure_rootfs_tarball(recipe, log)
    log(f"docker import {tarball.name} as {ref}")
    repository, tag = ref.rsplit(":", 1)
    # The daemon tags an import only once the whole upload has been stored: an interrupt leaves nothing.
    client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    if _labels_of(client, ref) is None:
        raise SandboxError(f"docker import of {tarball} did not produce {ref}")
    return ref


def ensure_offline_base(
    python: str,
    client: docker.DockerClient,
    recipe: RootfsRecipe = DEFAULT_ROOTFS,
    log: Log = _quiet,
) -> str:
    """gguf-sandbox-base:py3.X: the Debian rootfs plus a local CPython 3.X under /usr/local."""
    layout = find_local_interpreter(python)
    if layout is None:
        raise SandboxError(
            f"no local CPython {python} found (looked for python{python} on PATH, in pyenv and uv); "
            f"hint: pyenv install {python} or uv python install {python}"
        )
    ref = base_tag(python)
    identity = hashlib.sha256(f"{RECIPE_VERSION}|{recipe.digest}|{layout.identity}".encode()).hexdigest()
    with _build_lock(f"base-py{python}"):
        labels = _labels_of(client, ref)
        if labels is not None and labels.get(HASH_LABEL) == identity:
            return ref
        rootfs = ensure_rootfs_image(client, recipe, log)
        log(f"adding CPython {layout.full_version} from {layout.base_prefix} to {ref}")
        recipe_file = _images_dir() / f"base-py{python}.Dockerfile"
        recipe_file.write_text(_BASE_DOCKERFILE.format(rootfs=rootfs, version=python))
        payload = [("Dockerfile", recipe_file)]
        payload += [(f"python/{name}", path) for name, path in interpreter_payload(layout)]
        try:
            # Not normalized: stdlib bytecode stays valid only with the sources' real mtimes.
            with _context_tar(payload, normalize=False) as context:
                image_id = _docker_build(
                    context, buildargs={}, labels={HASH_LABEL: identity}, network_mode="none", log=log
                )
        finally:
            recipe_file.unlink(missing_ok=True)
        _tag(client, image_id, ref)
    return ref


def resolve_base(python: str, client: docker.DockerClient, log: Log = _quiet) -> str:
    """python:3.X-slim when present or pullable, else the offline base; SandboxError if neither works."""
    import docker

    registry_ref = f"python:{python}-slim"
    if _labels_of(client, registry_ref) is not None:
        return registry_ref
    try:
        log(f"pulling {registry_ref}")
        client.images.pull("python", tag=f"{python}-slim")
    except docker.errors.DockerException as pull_error:
        log(f"cannot pull {registry_ref} ({_one_line(pull_error)}); building the offline base")
        try:
            return ensure_offline_base(python, client, log=log)
        except SandboxError as offline_error:
            raise SandboxError(
                f"no base image for Python {python}: pulling {registry_ref} failed "
                f"({_one_line(pull_error)}), and the offline base failed: {offline_error}"
            ) from offline_error
    return registry_ref


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# ---------------------------------------------------------------------------------------------------------
# The cell image


def build_image(
    python: str,
    project_dir: str | Path,
    *,
    client: docker.DockerClient | None = None,
    force: bool = False,
    log: Log = _quiet,
    repository: str = IMAGE_REPOSITORY,
) -> ImageBuild:
    """Make <repository>:py3.X current for the sources in `project_dir`; rebuild only when they changed."""
    client = client or engine_client()
    import docker
    import requests

    try:
        return _build_image(
            python, Path(project_dir), client=client, force=force, log=log, repository=repository
        )
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise SandboxError(
            f"the Docker engine failed while making {repository}:py{python}: {_one_line(error)}; "
            "hint: check `docker info` and retry with `gguf-sandbox images build -v`"
        ) from error


def _build_image(
    python: str,
    project_dir: Path,
    *,
    client: docker.DockerClient,
    force: bool,
    log: Log,
    repository: str,
) -> ImageBuild:
    started = time.monotonic()
    tag = f"{repository}:py{_checked_version(python)}"
    files = project_files(project_dir)
    digest = content_hash(python, files)

    def cached() -> ImageBuild | None:
        labels = _labels_of(client, tag)
        if force or labels is None or labels.get(HASH_LABEL) != digest:
            return None
        base = labels.get(BASE_LABEL, "")
        return ImageBuild(tag, _image_id(client, tag), digest, True, base, time.monotonic() - started)

    hit = cached()
    if hit is not None:
        return hit
    with _build_lock(f"{repository}-py{python}"):
        hit = cached()
        if hit is not None:
            return hit
        base = resolve_base(python, client, log)
        log(f"building {tag} on {base}")
        with _context_tar(files + _build_ca_bundle()) as context:
            image_id = _docker_build(
                context,
                buildargs={"PYTHON_VERSION": python, "BASE_IMAGE": base, "SANDBOX_UID": str(SANDBOX_UID)},
                labels={HASH_LABEL: digest, BASE_LABEL: base},
                network_mode=BUILD_NETWORK,
                log=log,
            )
        _tag(client, image_id, tag)
    return ImageBuild(tag, image_id, digest, False, base, time.monotonic() - started)


def ensure_image(python: str, project_dir: str | Path) -> str:
    """The tag of an up-to-date cell image for `python` (3.X), building it when missing or stale."""
    return build_image(python, project_dir).tag


def image_is_current(python: str, project_dir: str | Path, client: docker.DockerClient) -> bool:
    """True when gguf-sandbox:py3.X exists and was built from the current sources."""
    labels = _labels_of(client, image_tag(python))
    digest = content_hash(python, project_files(Path(project_dir)))
    return labels is not None and labels.get(HASH_LABEL) == digest


# ---------------------------------------------------------------------------------------------------------
# `gguf-sandbox images …`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="images_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build (or confirm cached) gguf-sandbox:py3.X images")
    listing = actions.add_parser("list", help="show each version's image and whether it is current")
    for sub in (build, listing):
        sub.add_argument(
            "--python",
            nargs="+",
            default=list(DEFAULT_PYTHONS),
            metavar="3.X",
            help=f"Python versions (default: {' '.join(DEFAULT_PYTHONS)})",
        )
        sub.add_argument("--project", type=Path, default=None, help="source checkout to install")
    build.add_argument("--force", action="store_true", help="rebuild even when the content hash matches")
    build.add_argument("-v", "--verbose", action="store_true", help="stream the build output")


def run(args: argparse.Namespace) -> int:
    project = find_project_dir(args.project)
    client = engine_client()
    if args.images_action == "list":
        for python in args.python:
            labels = _labels_of(client, image_tag(python))
            state = (
                "missing"
                if labels is None
                else ("current" if image_is_current(python, project, client) else "stale")
            )
            print(f"{image_tag(python):24} {state:8} base={(labels or {}).get(BASE_LABEL, '-')}")
        return 0

    def log(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    failures = 0
    for python in args.python:
        print(f"{image_tag(python)}: ", end="", flush=True)
        try:
            outcome = build_image(
                python, project, client=client, force=args.force, log=log if args.verbose else _quiet
            )
        except SandboxError as error:
            failures += 1
            print(f"FAILED\n  {error}", flush=True)
            continue
        how = "cached" if outcome.cached else "built"
        print(
            f"{how} in {outcome.seconds:.1f} s on {outcome.base_image} ({outcome.image_id[:19]})", flush=True
        )
    return 1 if failures else 0
