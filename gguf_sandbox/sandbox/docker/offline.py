"""The offline base image: a debootstrapped Debian root filesystem plus a relocated local CPython."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.paths import cache_root
from gguf_sandbox.sandbox.docker.context import RECIPE_VERSION, build_lock, context_tar, images_workdir
from gguf_sandbox.sandbox.docker.engine import Log, docker_build, labels_of, one_line, quiet, tag_image
from gguf_sandbox.sandbox.docker.names import HASH_LABEL, ROOTFS_REPOSITORY, base_tag, checked_version
from gguf_sandbox.sandbox.interpreters import Interpreter, find_interpreter

if TYPE_CHECKING:
    import docker


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
    interpreter = find_interpreter(checked_version(python))
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


def ensure_rootfs_tarball(recipe: RootfsRecipe = DEFAULT_ROOTFS, log: Log = quiet) -> Path:
    """The cached Debian rootfs tarball for `recipe`, made with debootstrap when missing."""
    name = f"rootfs-{recipe.suite}-{recipe.variant}-{recipe.digest[:12]}.tar"
    tarball = images_workdir() / name
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
    with build_lock(tarball.name):
        if tarball.is_file():
            return tarball
        workdir = Path(tempfile.mkdtemp(prefix="rootfs-", dir=images_workdir()))
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
    client: docker.DockerClient, recipe: RootfsRecipe = DEFAULT_ROOTFS, log: Log = quiet
) -> str:
    """The imported rootfs image (shared by every Python version), importing the tarball when missing."""
    ref = recipe.image_ref
    if labels_of(client, ref) is not None:
        return ref
    tarball = ensure_rootfs_tarball(recipe, log)
    log(f"docker import {tarball.name} as {ref}")
    repository, tag = ref.rsplit(":", 1)
    # The daemon tags an import only once the whole upload has been stored: an interrupt leaves nothing.
    client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    if labels_of(client, ref) is None:
        raise SandboxError(f"docker import of {tarball} did not produce {ref}")
    return ref


def ensure_offline_base(
    python: str,
    client: docker.DockerClient,
    recipe: RootfsRecipe = DEFAULT_ROOTFS,
    log: Log = quiet,
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
    with build_lock(f"base-py{python}"):
        labels = labels_of(client, ref)
        if labels is not None and labels.get(HASH_LABEL) == identity:
            return ref
        rootfs = ensure_rootfs_image(client, recipe, log)
        log(f"adding CPython {layout.full_version} from {layout.base_prefix} to {ref}")
        recipe_file = images_workdir() / f"base-py{python}.Dockerfile"
        recipe_file.write_text(_BASE_DOCKERFILE.format(rootfs=rootfs, version=python))
        payload = [("Dockerfile", recipe_file)]
        payload += [(f"python/{name}", path) for name, path in interpreter_payload(layout)]
        try:
            # Not normalized: stdlib bytecode stays valid only with the sources' real mtimes.
            with context_tar(payload, normalize=False) as context:
                image_id = docker_build(
                    context, buildargs={}, labels={HASH_LABEL: identity}, network_mode="none", log=log
                )
        finally:
            recipe_file.unlink(missing_ok=True)
        tag_image(client, image_id, ref)
    return ref


def resolve_base(python: str, client: docker.DockerClient, log: Log = quiet) -> str:
    """python:3.X-slim when present or pullable, else the offline base; SandboxError if neither works."""
    import docker

    registry_ref = f"python:{python}-slim"
    if labels_of(client, registry_ref) is not None:
        return registry_ref
    try:
        log(f"pulling {registry_ref}")
        client.images.pull("python", tag=f"{python}-slim")
    except docker.errors.DockerException as pull_error:
        log(f"cannot pull {registry_ref} ({one_line(pull_error)}); building the offline base")
        try:
            return ensure_offline_base(python, client, log=log)
        except SandboxError as offline_error:
            raise SandboxError(
                f"no base image for Python {python}: pulling {registry_ref} failed "
                f"({one_line(pull_error)}), and the offline base failed: {offline_error}"
            ) from offline_error
    return registry_ref
