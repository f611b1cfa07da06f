"""Where convert writes: OUT is new or an earlier GGUF, never a checkpoint file, and is replaced by a
rename once the whole file is written — a failure leaves no partial file."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from gguf_sandbox.atomic import check_replaceable
from gguf_sandbox.embed.checkpoint_reads import strerror
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf.reader import MAGIC


def check_out(out: Path, inputs: tuple[Path, ...]) -> None:
    """Refuse an `out` whose replacement would lose something: a file the checkpoint is read from, a link,
    and whatever atomic.check_replaceable refuses (a directory, a device, any file but a GGUF); or a path in
    a directory that does not exist. A new file inside HF_DIR is fine: llama.cpp's converter writes there."""
    if not out.parent.is_dir():
        problem = "is not a directory" if os.path.lexists(out.parent) else "does not exist"
        raise GGUFSandboxError(
            f"OUT {out}: {out.parent} {problem}; create the directory or choose another path"
        )
    source = _checkpoint_file(out, inputs)
    if source is not None:
        raise GGUFSandboxError(
            f"OUT {out}: is the checkpoint's {source.name}, which convert reads; choose another path"
        )
    if check_replaceable(out, "OUT", "a GGUF file", _is_gguf, file_name="model.gguf") and out.is_symlink():
        # os.replace would put the GGUF where the link was, silently changing what the link's users see.
        raise GGUFSandboxError(
            f"OUT {out}: is a symbolic link; convert replaces a GGUF file itself, never a link — "
            f"remove it or choose another path"
        )


def _checkpoint_file(out: Path, inputs: tuple[Path, ...]) -> Path | None:
    """The input `out` is: the same file (a hard link, a link's target), or, for an optional file that is
    absent, the same name in the same directory (a GGUF written as tokenizer.json would be read next time)."""
    out_status, parent_status = _status(out), _status(out.parent)
    for path in inputs:
        same_place = path.name == out.name and _same_file(parent_status, _status(path.parent))
        if same_place or _same_file(out_status, _status(path)):
            return path
    return None


def _status(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # absent or unreadable: not a file convert reads (it reports those when it reads them)
        return None


def _same_file(first: os.stat_result | None, second: os.stat_result | None) -> bool:
    return (
        first is not None
        and second is not None
        and (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
    )


def _is_gguf(path: Path) -> bool:
    """An earlier conversion's output: the GGUF magic first (an empty file is not one)."""
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def write_replacing(
    out: Path, inputs: tuple[Path, ...], writer: GGUFWriter, tensors: Iterable[np.ndarray]
) -> None:
    """Write `writer`'s header and then `tensors` to a new partial file beside `out` and rename it over
    `out`. Any failure removes the partial and leaves `out` as it was; an OSError is one line naming the
    path and strerror."""
    partial = _create_partial(out)
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in tensors:
            writer.write_tensor_data(data)
        writer.close()
        # Again: the conversion took a while, and what is at `out` now is what the rename replaces.
        check_out(out, inputs)
        os.replace(partial, out)
    except OSError as error:
        _discard(writer, partial)
        raise GGUFSandboxError(f"cannot write {out}: {strerror(error)}") from error
    except BaseException:
        _discard(writer, partial)
        raise


def _create_partial(out: Path) -> Path:
    """A new empty file next to `out` (O_EXCL: never an existing one), which GGUFWriter then fills."""
    # `out`'s name cut to 200 characters: with the pid and the random part it stays within NAME_MAX (255).
    partial = out.with_name(f".{out.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as error:
        raise GGUFSandboxError(f"cannot write {out}: {strerror(error)}") from error
    return partial


def _discard(writer: GGUFWriter, partial: Path) -> None:
    # Closing flushes what is buffered, which fails again on a full disk: the file goes anyway.
    with contextlib.suppress(OSError):
        writer.close()
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)
