"""Atomic file writes: a reader sees the old file or the new one, never half of either; and the rule for
what a write may replace: nothing, or a file of the same kind that we wrote."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from gguf_sandbox.errors import GGUFSandboxError


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a staging file beside `path`, fsync it, then rename it over `path` (OSError on
    failure, with nothing left behind). The file gets a plain file's mode under the umask: mkstemp's 0600
    would hide it from the unprivileged readers some files have (the floors file is read inside cells)."""
    descriptor, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def check_replaceable(
    path: Path, what: str, kind: str, is_ours: Callable[[Path], bool], *, file_name: str
) -> bool:
    """True when `path` is a regular file `is_ours` recognises (a write may replace it), False when nothing
    is there; else a one-line GGUFSandboxError. A directory (the error suggests `file_name` inside it), a
    device, a dangling link or a file of another kind (a user's notes, the results a report was made from)
    is never replaced."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise GGUFSandboxError(
                f"{what} {path}: a dangling symbolic link; remove it or choose another path"
            ) from None
        return False
    except OSError as error:
        raise GGUFSandboxError(f"{what} {path}: cannot inspect it ({error.strerror})") from None
    if stat.S_ISDIR(mode):
        raise GGUFSandboxError(f"{what} {path}: is a directory; give a file path such as {path / file_name}")
    if not stat.S_ISREG(mode):
        raise GGUFSandboxError(f"{what} {path}: not a regular file; give the path of {kind}")
    try:
        ours = is_ours(path)
    except OSError as error:
        raise GGUFSandboxError(f"{what} {path}: cannot read it ({error.strerror})") from None
    if not ours:
        raise GGUFSandboxError(
            f"{what} {path}: exists and is not {kind}; left untouched — choose another path or remove it"
        )
    return True


def path_argument(text: str, what: str) -> Path:
    """A path given on the command line; an empty one is refused (a Path of "" is the current directory)."""
    if not text:
        raise GGUFSandboxError(f"{what}: an empty path; give a file or directory name")
    return Path(text)


def starts_with(marker: bytes, probe_bytes: int = 4096) -> Callable[[Path], bool]:
    """An is_ours test for check_replaceable: the file is empty or holds `marker` in its first bytes."""

    def test(path: Path) -> bool:
        with path.open("rb") as handle:
            head = handle.read(probe_bytes)
        return not head or marker in head

    return test
