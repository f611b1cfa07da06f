"""Q8_0 rows split into int8 quants and float32 scales, so decoding is one exact cast and one multiply (bit
for bit dequantize()'s, at about half its cost): in row order (streamed blocks), or piece by piece in column
order (resident-quant), which decodes into the layout BLAS multiplies fastest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gguf_sandbox.embed.q8_block import Q8_BLOCK, Q8_BLOCK_BYTES
from gguf_sandbox.embed.rows import F32


def _scales(raw: bytes | NDArray[np.uint8]) -> F32:
    """Each block's fp16 scale (its first two bytes) as float32 [blocks]."""
    return np.frombuffer(raw, dtype="<f2").reshape(-1, Q8_BLOCK_BYTES // 2)[:, 0].astype(np.float32)


@dataclass(frozen=True)
class Q8Rows:
    """Q8_0 rows in row order, as streamed blocks are split: quants [blocks, 32], scales [blocks, 1].

    Splitting is one flat copy, at half the cost of Q8Piece.of's transpose, which a block read for one use
    does not earn back: streaming through Q8Piece's was 24.4 ms a text instead of 23.5 (dequantize()
    multiplies straight from the interleaved 34-byte blocks, a buffered cast per block: twice the cost).
    """

    row_len: int
    quants: NDArray[np.int8]  # [rows * row_len / 32, 32]
    scales: F32  # [rows * row_len / 32, 1]

    @classmethod
    def of(cls, raw: bytes | NDArray[np.uint8], row_len: int) -> Q8Rows:
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, Q8_BLOCK_BYTES)  # [n, 34]
        quants = np.empty((blocks.shape[0], Q8_BLOCK), dtype=np.int8)  # [n, 32]
        # Each block's quants moved as one 32-byte item: a flat copy, where an int8 copy of short strided
        # rows pays numpy's per-row overhead.
        item = np.dtype((np.void, Q8_BLOCK))
        np.copyto(quants.view(item), blocks[:, 2:].view(item))
        return cls(row_len, quants, _scales(raw)[:, None])

    @property
    def n_rows(self) -> int:
        return int(self.quants.shape[0]) * Q8_BLOCK // self.row_len

    def decode(self, lo: int, hi: int, out: F32 | None = None) -> F32:
        per_row = self.row_len // Q8_BLOCK
        first, last = lo * per_row, hi * per_row
        if out is None:
            blocks = np.empty((last - first, Q8_BLOCK), dtype=np.float32)  # [blocks, 32]
        else:
            blocks = out[: (last - first) * Q8_BLOCK].reshape(last - first, Q8_BLOCK)  # [blocks, 32]
        np.copyto(blocks, self.quants[first:last])  # [blocks, 32] exact: every int8 is a float32
        blocks *= self.scales[first:last]  # [blocks, 32]
        return blocks.reshape(hi - lo, self.row_len)


@dataclass(frozen=True)
class Q8Piece:
    """Consecutive Q8_0 rows in column order: quants [row_len / 32, 32, rows], scales [row_len / 32, 1, rows].

    A piece decodes to W.T, contiguous [row_len, rows], and is handed out as its [rows, row_len] view: x @ W.T
    is then the product BLAS runs fastest here (a 25-token text by a 170-row piece of a 384-wide matrix:
    46 µs against 68 for W's rows), and the scale multiply runs along rows rather than 32 elements at a time.
    """

    quants: NDArray[np.int8]  # [row_len / 32, 32, rows]
    scales: F32  # [row_len / 32, 1, rows]

    @classmethod
    def of(cls, raw: bytes | NDArray[np.uint8], row_len: int) -> Q8Piece:
        per_row = row_len // Q8_BLOCK
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, Q8_BLOCK_BYTES)  # [rows * per_row, 34]
        rows = blocks.shape[0] // per_row
        stored = blocks[:, 2:].view(np.int8).reshape(rows, per_row, Q8_BLOCK)  # [rows, per_row, 32]
        quants = np.empty((per_row, Q8_BLOCK, rows), dtype=np.int8)  # [per_row, 32, rows]
        np.copyto(quants, stored.transpose(1, 2, 0))
        scales = np.ascontiguousarray(_scales(raw).reshape(rows, per_row).T)[:, None, :]  # [per_row, 1, rows]
        return cls(quants, scales)

    @property
    def n_rows(self) -> int:
        return int(self.quants.shape[2])

    def decode(self, out: F32 | None = None) -> F32:
        """All rows as float32 [rows, row_len] (a transposed view), into the front of `out` if given."""
        per_row, _, rows = self.quants.shape
        size = self.quants.size
        flat = np.empty(size, dtype=np.float32) if out is None else out[:size]
        columns = flat.reshape(per_row, Q8_BLOCK, rows)  # [per_row, 32, rows]
        np.copyto(columns, self.quants)  # exact: every int8 is a float32
        columns *= self.scales
        transposed: F32 = columns.reshape(per_row * Q8_BLOCK, rows)  # [row_len, rows]
        return np.transpose(transposed)  # [rows, row_len]


@dataclass(frozen=True)
class Q8Pieces:
    """Q8_0 rows kept as Q8Piece's cut at `bounds`: a range that is one piece decodes straight into the
    scratch it is given; any other range is gathered from its pieces into a new array."""

    row_len: int
    bounds: tuple[tuple[int, int], ...]
    pieces: tuple[Q8Piece, ...]

    @classmethod
    def of(cls, raw: bytes | NDArray[np.uint8], row_len: int, bounds: Sequence[tuple[int, int]]) -> Q8Pieces:
        row_bytes = row_len // Q8_BLOCK * Q8_BLOCK_BYTES
        data = np.frombuffer(raw, dtype=np.uint8)
        pieces = tuple(Q8Piece.of(data[lo * row_bytes : hi * row_bytes], row_len) for lo, hi in bounds)
        return cls(row_len, tuple(bounds), pieces)

    @property
    def n_rows(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def decode(self, lo: int, hi: int, out: F32 | None = None) -> F32:
        for (start, end), piece in zip(self.bounds, self.pieces, strict=True):
            if (start, end) == (lo, hi):
                return piece.decode(out)
        rows = np.empty((hi - lo, self.row_len), dtype=np.float32)  # [hi - lo, row_len]
        for (start, end), piece in zip(self.bounds, self.pieces, strict=True):
            first, last = max(start, lo), min(end, hi)
            if first < last:
                rows[first - lo : last - lo] = piece.decode()[first - start : last - start]
        return rows
