"""Activation rows of a forward pass: a batch's token rows laid end to end and cut into chunks whose widest
array stays within the single-allocation cap (padded to BLAS's panel height), and a sequence's rows gathered
back from its chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

F32: TypeAlias = NDArray[np.float32]
Ids: TypeAlias = NDArray[np.intp]
# Activations of a batch: its token rows split into chunks, one array [chunk_rows, width] per chunk.
Rows: TypeAlias = list[F32]
# The single-allocation cap: no temporary of a pass (an activation chunk, a block of weights) is larger.
DEFAULT_CAP: Final = 1 << 20
FLOAT_BYTES: Final = 4
# Decoded weight pieces of quantized plans: half a core's L2 (512 KiB here), so a piece is still cached
# when multiplied.
DECODE_BYTES: Final = 1 << 18
# BLAS multiplies in panels of 4 rows (OpenBLAS's sgemm kernels here): 1-3 leftover rows cost about as
# much as a whole panel, so activation chunks get zero rows up to a multiple of this. A 19-token sentence
# padded to 20 rows has its products ~20% faster; the padding never reaches attention or pooling.
ROW_ALIGN: Final = 4


class Widths(Protocol):
    """What sizes activation chunks: the widest row of a layer (BertConfig, DecoderConfig)."""

    @property
    def widest(self) -> int: ...


def rows_per_chunk(config: Widths, cap: int = DEFAULT_CAP) -> int:
    """How many token rows one activation chunk holds so that its widest array stays within `cap`.

    A multiple of ROW_ALIGN where the cap allows one, so padded chunks stay within it too.
    """
    rows = max(1, cap // (FLOAT_BYTES * config.widest))
    return rows - rows % ROW_ALIGN if rows >= ROW_ALIGN else rows


def aligned(rows: int) -> int:
    """`rows` rounded up to a multiple of ROW_ALIGN."""
    return -(-rows // ROW_ALIGN) * ROW_ALIGN


def padded_rows(rows: int, limit: int) -> int:
    """Rows of an activation chunk holding `rows` tokens: aligned, but never past `limit` (the cap's)."""
    return max(rows, min(aligned(rows), limit))


@dataclass(frozen=True)
class TokenBatch:
    """Token rows of several sequences laid end to end (no padding), cut into chunks of whole sequences.

    A sequence longer than a chunk is cut into chunk-sized pieces; every other sequence lies in one chunk.
    """

    ids: Ids  # [T] token ids
    positions: Ids  # [T] position of each row inside its sequence
    starts: Ids  # [n + 1] row where each sequence starts; starts[-1] == T
    chunks: tuple[tuple[int, int], ...]  # (first_row, end_row) of each chunk, covering [0, T)
    pieces: tuple[tuple[tuple[int, int, int], ...], ...] = field(repr=False)  # per sequence: (chunk, lo, hi)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], chunk_rows: int) -> TokenBatch:
        if not sequences:
            raise ValueError("TokenBatch needs at least one sequence")
        lengths = [len(s) for s in sequences]
        if min(lengths) == 0:
            raise ValueError("TokenBatch: every sequence needs at least one token (the tokenizer adds [CLS])")
        starts = np.zeros(len(sequences) + 1, dtype=np.intp)
        np.cumsum(lengths, out=starts[1:])
        ids = np.fromiter((t for s in sequences for t in s), dtype=np.intp, count=int(starts[-1]))
        positions = np.arange(int(starts[-1]), dtype=np.intp) - np.repeat(starts[:-1], lengths)
        chunks: list[tuple[int, int]] = []
        pieces: list[tuple[tuple[int, int, int], ...]] = []
        for first, length in zip(starts[:-1].tolist(), lengths, strict=True):
            if chunks and chunks[-1][1] - chunks[-1][0] + length <= chunk_rows:
                chunks[-1] = (chunks[-1][0], first + length)
                begin = first - chunks[-1][0]
                pieces.append(((len(chunks) - 1, begin, begin + length),))
                continue
            own: list[tuple[int, int, int]] = []
            for lo in range(first, first + length, chunk_rows):
                hi = min(lo + chunk_rows, first + length)
                chunks.append((lo, hi))
                own.append((len(chunks) - 1, 0, hi - lo))
            pieces.append(tuple(own))
        return cls(ids, positions, starts, tuple(chunks), tuple(pieces))

    @property
    def n_sequences(self) -> int:
        return len(self.pieces)

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])


def gather(chunks: Rows, pieces: tuple[tuple[int, int, int], ...], columns: slice) -> F32:
    """The rows of one sequence (its pieces across chunks) restricted to `columns`: a view when possible."""
    if len(pieces) == 1:
        chunk, lo, hi = pieces[0]
        return chunks[chunk][lo:hi, columns]  # [length, width]
    return np.concatenate([chunks[chunk][lo:hi, columns] for chunk, lo, hi in pieces])  # [length, width]
