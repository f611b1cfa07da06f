"""Weight bytes read from the model file: row blocks and column slabs, their page cache dropped once read."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Iterator
from typing import Final

import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from gguf_sandbox.embed.rows import DECODE_BYTES, FLOAT_BYTES
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.reader import TensorInfo

# The unit the kernel caches and drops file pages in.
PAGE: Final = mmap.PAGESIZE


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
    """Drop cached pages of the file once copied: page cache counts toward a cgroup's limit and its peak.

    The kernel drops only the whole pages inside [offset, offset + length).
    """
    advise(fd, "POSIX_FADV_DONTNEED", offset, length)


def drop_touched(fd: int, offset: int, length: int) -> None:
    """Drop every page holding a byte of [offset, offset + length), the partial pages at its ends too:
    for bytes read for the last time (a neighbour still needing such a page reads it again)."""
    start = offset - offset % PAGE
    drop_cached(fd, start, offset + length - start + (-(offset + length)) % PAGE)


def read_blocks(
    fd: int, info: TensorInfo, cap: int, *, drop: bool = True, lo: int = 0, hi: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(first_row, raw bytes) of rows [lo, hi) of the tensor in blocks within `cap` decoded — iter_rows'
    boundaries when lo is 0 — leaving no page cache.

    `fd` must be advised POSIX_FADV_RANDOM: the reader's descriptor reads ahead up to read_ahead_kb (often
    megabytes) into page cache, which a cgroup counts; each block's pages are dropped once copied (unless
    `drop` is false: streamed weights that fit stay cached).
    """
    end = info.n_rows if hi is None else hi
    per_block = rows_per_block(info, cap)
    for first in range(lo, end, per_block):
        rows = min(per_block, end - first)
        offset, length = info.offset + first * info.row_nbytes, rows * info.row_nbytes
        raw = pread(fd, length, offset, info.name)
        if len(raw) != length:
            raise GGUFError(f"{info.name}: short read at offset {offset:,}; the file shrank while open")
        if drop:
            # The next block starts in this block's last page: that page is dropped after it; the last
            # block drops every page it touched.
            if first + rows < end:
                start, stop = offset - offset % PAGE, (offset + length) // PAGE * PAGE
                drop_cached(fd, start, stop - start)
            else:
                drop_touched(fd, offset, length)
        yield first, raw


def column_bytes(info: TensorInfo, column: int) -> int:
    """Byte offset of column `column` in a stored row: it must start a quantization block, or end the row."""
    block_elements, block_bytes = GGML_QUANT_SIZES[info.type]
    if column % block_elements and column != info.row_len:
        what = f"{info.type.name} block of {block_elements}"
        raise ValueError(f"{info.name}: column {column} is inside a {what}")
    return column // block_elements * block_bytes


def read_columns(
    fd: int, info: TensorInfo, lo: int, hi: int, rows: int, *, drop: bool = True
) -> Iterator[tuple[int, bytes]]:
    """(first_row, raw bytes) of columns [lo, hi) of every row, `rows` rows at a time: one pread per row.

    The bytes of a row's columns are whole blocks, so they decode on their own to [rows, hi - lo]. The
    pages the next piece needs that no earlier column read are asked for ahead (POSIX_FADV_WILLNEED), so
    the disk reads them while this piece is read. With `drop`, the pages of each row that every column up
    to `hi` has been read from are dropped, and the whole tensor's once its last columns are read: a pass
    over the columns slab by slab reads each page from disk once and keeps about two pages per row in page
    cache (the one being read and the one shared with the next row).
    """
    start, end, stride = column_bytes(info, lo), column_bytes(info, hi), info.row_nbytes
    width = end - start
    row_starts = info.offset + np.arange(info.n_rows, dtype=np.int64) * stride  # [n_rows]
    for first in range(0, info.n_rows, rows):
        last = min(first + rows, info.n_rows)
        _ask_ahead(fd, row_starts[last : last + rows], start, end)
        offsets = (row_starts[first:last] + start).tolist()
        raw = b"".join([pread(fd, width, offset, info.name) for offset in offsets])
        if len(raw) != width * (last - first):
            raise GGUFError(f"{info.name}: short read of rows {first}..{last}; the file shrank while open")
        if drop:
            _drop_read_pages(fd, row_starts[first:last], start, end)
        yield first, raw
    if drop and hi == info.row_len:
        drop_touched(fd, info.offset, info.nbytes)


def column_piece_rows(columns: int) -> int:
    """Rows per piece of a column slab `columns` wide: about DECODE_BYTES decoded, at most `columns` rows."""
    return max(1, min(columns, DECODE_BYTES // (columns * FLOAT_BYTES)))


def column_read_cache(rows: int, row_len: int, columns: int, element_bytes: float) -> int:
    """The most page cache a pass holds while reading the columns of a [rows, row_len] tensor stored in at
    most `element_bytes` per element, in slabs `columns` wide (read_columns with drop; 0 for no rows).

    Per row, the page shared with the previous row (read by the first slab, needed again by the last) and
    the page the next slab starts in; besides, the piece being read and the one asked ahead. Never more
    than the tensor's own pages.
    """
    if rows == 0:
        return 0
    row_bytes, width = math.ceil(row_len * element_bytes), math.ceil(columns * element_bytes)
    tensor_pages = -(-rows * row_bytes // PAGE) + 1
    piece_rows = column_piece_rows(columns)
    piece_pages = min(piece_rows * (-(-width // PAGE) + 1), -(-piece_rows * row_bytes // PAGE) + 1)
    return min(2 * rows + 2 * piece_pages, tensor_pages) * PAGE


def _ask_ahead(fd: int, row_starts: np.ndarray, start: int, end: int) -> None:
    """Ask the kernel to read the bytes [start, end) of the rows where they reach a page not read before."""
    if start:
        fresh = (row_starts + end - 1) // PAGE > (row_starts + start - 1) // PAGE  # [rows]
        row_starts = row_starts[fresh]
    for row_start in row_starts.tolist():
        advise(fd, "POSIX_FADV_WILLNEED", row_start + start, end - start)


def _drop_read_pages(fd: int, row_starts: np.ndarray, start: int, end: int) -> None:
    """Drop, for each row whose bytes [start, end) crossed a page boundary, the pages read up to `end`."""
    before = (row_starts + start) // PAGE  # [rows] page of the slab's first byte
    after = (row_starts + end) // PAGE  # [rows] page holding the next slab's first byte
    for row_start in row_starts[after > before].tolist():
        drop_cached(fd, row_start, end)
