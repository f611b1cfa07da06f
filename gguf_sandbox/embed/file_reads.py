"""Weight bytes read from the model file in row blocks, their page cache dropped once read."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from gguf_sandbox.embed.bert import FLOAT_BYTES
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.reader import TensorInfo


def rows_per_block(info: TensorInfo, cap: int) -> int:
    """Rows per stored weight block: the reader's iter_rows boundaries (quantized plans decode in pieces)."""
    rows = cap // (info.row_len * FLOAT_BYTES)
    if rows == 0:
        raise BudgetExceeded(
            f"one row of {info.name}", info.row_len * FLOAT_BYTES, cap, "raise the single-allocation cap"
        )
    return rows


def pread(fd: int, length: int, offset: int, what: str) -> bytes:
    """os.pread whose failures (EIO from a failing disk, ...) are GGUFErrors naming what was read."""
    try:
        return os.pread(fd, length, offset)
    except OSError as error:
        raise GGUFError(
            f"{what}: reading {length:,} bytes at offset {offset:,} failed: {error.strerror or error}; "
            f"the file or its disk is failing"
        ) from None


def advise(fd: int, advice: str, offset: int = 0, length: int = 0) -> None:
    """posix_fadvise where the platform has it; advice only, so a file system refusing it is no error."""
    if hasattr(os, "posix_fadvise"):
        # Ignored advice costs page cache, not correctness.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, getattr(os, advice))


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop cached pages of the file once copied: page cache counts toward a cgroup's limit and its peak."""
    advise(fd, "POSIX_FADV_DONTNEED", offset, length)


def read_blocks(fd: int, info: TensorInfo, cap: int, *, drop: bool = True) -> Iterator[tuple[int, bytes]]:
    """(first_row, raw bytes) of the tensor's row blocks — iter_rows' boundaries — leaving no page cache.

    `fd` must be advised POSIX_FADV_RANDOM: the reader's descriptor reads ahead up to read_ahead_kb (often
    megabytes) into page cache, which a cgroup counts; each block's pages are dropped once copied (unless
    `drop` is false: streamed weights that fit stay cached).
    """
    per_block = rows_per_block(info, cap)
    for first in range(0, info.n_rows, per_block):
        rows = min(per_block, info.n_rows - first)
        offset, length = info.offset + first * info.row_nbytes, rows * info.row_nbytes
        raw = pread(fd, length, offset, info.name)
        if len(raw) != length:
            raise GGUFError(f"{info.name}: short read at offset {offset:,}; the file shrank while open")
        if drop:
            drop_cached(fd, offset, length)
        yield first, raw
