"""The guest image: its recipe, the cache key of what went into it, and the build (debootstrap + chroot)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf_sandbox.paths import cache_root

# Bumped when the build steps below change in a way the recipe fields do not show.
BUILD_VERSION = 1
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CHROOT_CA_BUNDLE = "/tmp/gguf-v2-host-ca.crt"
SUITE = "bookworm"
# systemd as PID 1 (pure cgroup v2 on bookworm), a kernel with its initrd, Python 3.11 with venv, and what
# an unprivileged user's systemd manager needs for `systemd-run --user` (logind, a user D-Bus).
PACKAGES = (
    "systemd-sysv",
    "linux-image-amd64",
    "udev",
    "kmod",
    "python3",
    "python3-venv",
    "dbus",
    "dbus-user-session",
    "libpam-systemd",
    "procps",
)
# The extras of the checkout's pyproject.toml installed into the guest's tool venv.
EXTRAS = ("test", "mcp")
GUEST_USER = "cell"
GUEST_UID = 1000
GUEST_VENV = "/opt/gguf-v2/venv"
GUEST_WHEELS = "/opt/gguf-v2/wheels"
GUEST_CACHE = "/var/cache/gguf-sandbox"
GUEST_USER_CACHE = f"/home/{GUEST_USER}/.cache/gguf-sandbox"
BOOT_STUB = "/usr/local/sbin/gguf-v2-boot"
SERVICE = "gguf-v2.service"
IMAGE_SLACK = 768 << 20  # free space left in the root filesystem for venvs, results and logs
DEBOOTSTRAP_TIMEOUT = 1800.0
PIP_TIMEOUT = 1800.0

# Runs at boot: mounts the run disk (the checkout, guest.sh, out/) and the models disk, runs guest.sh with
# its output on the second serial port, then powers off whatever happened.
_BOOT_STUB = """#!/bin/sh
mkdir -p /mnt/run /mnt/models
mount /dev/vdb /mnt/run || echo "@@gguf-v2 cannot mount the run disk /dev/vdb"
mount /dev/vdc /mnt/models 2>/dev/null || true
/bin/bash /mnt/run/src/tests/platform/guest.sh
rc=$?
echo "@@gguf-v2 exit $rc"
sync
umount /mnt/run 2>/dev/null
echo "@@gguf-v2 done"
systemctl poweroff --no-block
"""

_SERVICE = f"""[Unit]
Description=gguf-sandbox cgroup-v2 run
After=multi-user.target systemd-logind.service user@{GUEST_UID}.service
Wants=user@{GUEST_UID}.service

[Service]
Type=oneshot
ExecStart={BOOT_STUB}
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS1
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class Recipe:
    """Everything the image is built from; its hash names the cache entry."""

    suite: str
    packages: tuple[str, ...]
    pyproject: str  # what the install reads of pyproject.toml (install_inputs)
    extras: tuple[str, ...]
    cell_requirements: tuple[str, ...]  # what the cgroup backend installs into each cell's venv
    boot_stub: str
    service: str
    build_version: int = BUILD_VERSION

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_for(checkout: Path) -> Recipe:
    """The recipe of the image for this checkout."""
    from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS

    return Recipe(
        suite=SUITE,
        packages=PACKAGES,
        pyproject=install_inputs((checkout / "pyproject.toml").read_text(), EXTRAS),
        extras=EXTRAS,
        cell_requirements=RUNTIME_REQUIREMENTS,
        boot_stub=_BOOT_STUB,
        service=_SERVICE,
    )


def install_inputs(pyproject: str, extras: Sequence[str]) -> str:
    """What of pyproject.toml the guest's venv depends on: the dependencies and the chosen extras, so that
    edits elsewhere (tool settings, markers) keep the cached image; the whole text where tomllib is missing
    (Python 3.10)."""
    try:
        tomllib = importlib.import_module("tomllib")
    except ImportError:
        return pyproject
    project = tomllib.loads(pyproject).get("project", {})
    optional = project.get("optional-dependencies", {})
    chosen = {"dependencies": project.get("dependencies", [])}
    chosen.update({f"extra:{name}": optional.get(name, []) for name in extras})
    return json.dumps(chosen, sort_keys=True)


def vm_cache(environ: dict[str, str] | None = None) -> Path:
    """Where built images live: the project's cache directory, subdirectory vm/."""
    return cache_root(environ) / "vm"


@dataclass(frozen=True)
class Image:
    """A built image: root filesystem, the kernel and initrd to boot it with."""

    directory: Path

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def complete(self) -> bool:
        return all(path.is_file() for path in (self.rootfs, self.kernel, self.initrd))


def image_for(recipe: Recipe, cache: Path) -> Image:
    return Image(cache / f"debian-{recipe.suite}-{recipe.key()}")


def chroot_script(recipe: Recipe, checkout_in_root: str) -> str:
    """The shell script run in the chroot: guest user, boot service, tool venv, wheels, cells' venvs."""
    extras = ",".join(recipe.extras)
    cell_requirements = " ".join(f"'{requirement}'" for requirement in recipe.cell_requirements)
    return f"""set -eu
export HOME=/root PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1
echo gguf-v2 > /etc/hostname
id -u {GUEST_USER} >/dev/null 2>&1 || useradd -m -u {GUEST_UID} -s /bin/bash {GUEST_USER}
mkdir -p /var/lib/systemd/linger && touch /var/lib/systemd/linger/{GUEST_USER}
chmod 0755 {BOOT_STUB}
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/{SERVICE} /etc/systemd/system/multi-user.target.wants/{SERVICE}
python3 -m venv {GUEST_VENV}
{GUEST_VENV}/bin/pip install -q '{checkout_in_root}[{extras}]'
{GUEST_VENV}/bin/pip uninstall -q -y gguf-sandbox
mkdir -p {GUEST_WHEELS}
{GUEST_VENV}/bin/pip download -q -d {GUEST_WHEELS} pip setuptools wheel {cell_requirements}
for cache in {GUEST_CACHE} {GUEST_USER_CACHE}; do
  mkdir -p "$cache"
  PYTHONPATH={checkout_in_root} PIP_NO_INDEX=1 PIP_FIND_LINKS={GUEST_WHEELS} {GUEST_VENV}/bin/python -c \\
    "import sys; from pathlib import Path; from gguf_sandbox.sandbox.interpreters import find_interpreter; \\
from gguf_sandbox.sandbox.venvs import ensure_venv; \\
ensure_venv(find_interpreter('3.11', {{'PATH': '/usr/bin:/bin'}}), cache=Path(sys.argv[1]))" "$cache"
  rm -rf "$cache/src"
done
chown -R {GUEST_USER}:{GUEST_USER} /home/{GUEST_USER}
apt-get clean
rm -rf /var/lib/apt/lists/* /root/.cache
"""


def chroot_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The chroot's environment: a clean PATH and locale, pip's timeout, and the copied trust store (none of
    the host's pip settings, e.g. find-links into host directories)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_CERT": CHROOT_CA_BUNDLE,
    }
    if "PIP_DEFAULT_TIMEOUT" in environ:
        env["PIP_DEFAULT_TIMEOUT"] = environ["PIP_DEFAULT_TIMEOUT"]
    return env


def _run(argv: Sequence[str], what: str, timeout: float, **kwargs: object) -> None:
    print(f"[image] {what}", flush=True)
    done = subprocess.run(list(argv), timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise BuildError(f"{what}: exit {done.returncode}")


class BuildError(RuntimeError):
    """The image could not be built (a step failed): the message names the step."""


@contextlib.contextmanager
def _mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev bound into the chroot for pip and useradd; unmounted whatever happens."""
    mounted: list[Path] = []
    try:
        for name, argv in (
            ("proc", ["mount", "-t", "proc", "proc"]),
            ("sys", ["mount", "-t", "sysfs", "sysfs"]),
            ("dev", ["mount", "--bind", "/dev"]),
        ):
            target = root / name
            subprocess.run([*argv, str(target)], check=True, timeout=30)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)


def tree_size(root: Path) -> int:
    """Bytes of the regular files under `root` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                status = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (status.st_dev, status.st_ino) in seen:
                continue
            seen.add((status.st_dev, status.st_ino))
            total += status.st_size
    return total


def mkfs_size(content: int, slack: int) -> int:
    """An ext4 image size for `content` bytes: +12% for metadata, `slack` free, rounded up to 64 MiB."""
    step = 64 << 20
    wanted = content + content // 8 + slack
    return -(-wanted // step) * step


def make_ext4(source: Path, image: Path, slack: int, label: str) -> None:
    """An ext4 filesystem image holding `source` (mkfs.ext4 -d: no mount, no loop device)."""
    size = mkfs_size(tree_size(source), slack)
    image.unlink(missing_ok=True)
    with image.open("wb") as handle:
        handle.truncate(size)
    done = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(source), str(image)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"mkfs.ext4 -d {source}: {done.stderr.strip()[-400:]}")


def missing_tools() -> list[str]:
    """Host programs the build and the boot need that are not installed (Debian package names)."""
    wanted = {
        "debootstrap": "debootstrap",
        "qemu-system-x86_64": "qemu-system-x86",
        "mkfs.ext4": "e2fsprogs",
        "debugfs": "e2fsprogs",
    }
    return sorted({package for program, package in wanted.items() if shutil.which(program) is None})


def build(recipe: Recipe, checkout: Path, cache: Path, mirror: str | None = None) -> Image:
    """Build the image into the cache (root only); a build that fails leaves nothing in place."""
    image = image_for(recipe, cache)
    if image.complete():
        return image
    if os.geteuid() != 0:
        raise BuildError("building the guest image needs root (debootstrap, chroot)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as scratch:
        root = Path(scratch) / "root"
        _base_root(recipe, cache, root, mirror)
        (root / BOOT_STUB.lstrip("/")).write_text(recipe.boot_stub)
        (root / "etc/systemd/system" / SERVICE).write_text(recipe.service)
        shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
        # The host's trust store (it may hold a proxy's CA): pip in the chroot verifies PyPI against it.
        shutil.copy2(HOST_CA_BUNDLE, root / CHROOT_CA_BUNDLE.lstrip("/"))
        checkout_in_root = "/tmp/gguf-sandbox-src"
        _copy_checkout(checkout, root / checkout_in_root.lstrip("/"))
        script = root / "tmp/gguf-v2-setup.sh"
        script.write_text(chroot_script(recipe, checkout_in_root))
        with _mounted(root):
            _run(
                ["nice", "-n", "10", "chroot", str(root), "/bin/sh", "/tmp/gguf-v2-setup.sh"],
                "chroot setup",
                PIP_TIMEOUT,
                env=chroot_env(os.environ),
            )
        (root / CHROOT_CA_BUNDLE.lstrip("/")).unlink()
        shutil.rmtree(root / checkout_in_root.lstrip("/"))
        script.unlink()
        (root / "etc/resolv.conf").unlink(missing_ok=True)
        staging = Path(scratch) / "image"
        staging.mkdir()
        boot = root / "boot"
        shutil.copy2(_single(boot, "vmlinuz-*"), staging / "vmlinuz")
        shutil.copy2(_single(boot, "initrd.img-*"), staging / "initrd.img")
        print("[image] mkfs.ext4", flush=True)
        make_ext4(root, staging / "rootfs.img", IMAGE_SLACK, "gguf-v2-root")
        (staging / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1, sort_keys=True))
        staging.rename(image.directory)
    prune(cache, keep=image.directory)
    return image


def prune(cache: Path, keep: Path) -> list[Path]:
    """Remove the other built images (each is ~2 GB): only the current recipe's is kept."""
    removed = []
    for entry in cache.glob("debian-*"):
        if entry.is_dir() and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def base_key(recipe: Recipe) -> str:
    """The key of the debootstrapped base (suite and packages only): pyproject edits reuse it."""
    text = json.dumps([recipe.suite, recipe.packages, recipe.build_version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base_root(recipe: Recipe, cache: Path, root: Path, mirror: str | None) -> None:
    """Fill `root` with the debootstrapped base, from its cached tarball or by running debootstrap."""
    tarball = cache / f"base-{recipe.suite}-{base_key(recipe)}.tar"
    if not tarball.is_file():
        debootstrap = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(recipe.packages)}",
            recipe.suite,
            str(root),
            *([mirror] if mirror else []),
        ]
        _run(["nice", "-n", "10", *debootstrap], "debootstrap", DEBOOTSTRAP_TIMEOUT)
        partial = tarball.with_name(f".{tarball.name}.{os.getpid()}")
        _run(["tar", "-C", str(root), "-cf", str(partial), "."], "saving the base", DEBOOTSTRAP_TIMEOUT)
        partial.rename(tarball)
        return
    root.mkdir()
    _run(["tar", "-C", str(root), "-xf", str(tarball)], f"unpacking {tarball.name}", DEBOOTSTRAP_TIMEOUT)


def _single(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise BuildError(f"{directory}: expected one {pattern}, found {[p.name for p in found]}")
    return found[0]


def checkout_files(checkout: Path) -> list[str]:
    """The checkout's files as git sees them: tracked plus untracked-but-not-ignored (no .venv, caches)."""
    done = subprocess.run(
        ["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"git ls-files in {checkout}: {done.stderr.decode(errors='replace').strip()}")
    return sorted({name for name in done.stdout.decode().split("\0") if name})


def _copy_checkout(checkout: Path, target: Path) -> None:
    """Copy the checkout's files (see checkout_files) to `target`; deleted-but-tracked files are skipped."""
    for name in checkout_files(checkout):
        source = checkout / name
        if not source.is_file():
            continue
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
