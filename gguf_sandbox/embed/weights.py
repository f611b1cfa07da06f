"""A plan's weights: resident float32, resident quantized, or streamed from the file, as rows and blocks."""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final, Protocol

import numpy as np
from gguf.constants import GGMLQuantizationType
from numpy.typing import NDArray

from gguf_sandbox.embed.file_reads import (
    advise,
    column_piece_rows,
    drop_cached,
    drop_touched,
    pread,
    read_blocks,
    read_columns,
)
from gguf_sandbox.embed.layout import ModelLayout
from gguf_sandbox.embed.linear import Decoder, KernelSlice
from gguf_sandbox.embed.ort_bert import FusedBert
from gguf_sandbox.embed.ort_kernel import Int8Matrix, PackedMatrix
from gguf_sandbox.embed.plan import Plan, PlanName, TableMode
from gguf_sandbox.embed.q8_block import Q8_BLOCK, Q8_BLOCK_BYTES, is_q8_0
from gguf_sandbox.embed.q8_rows import Q8Pieces, Q8Rows
from gguf_sandbox.embed.rows import DECODE_BYTES, F32, FLOAT_BYTES, Ids
from gguf_sandbox.errors import GGUFError, UnsupportedTensorType
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo

# Big-endian files can only hold tensors whose bytes a swap decodes (the reader refuses the rest).
_SWAPPED: Final = {GGMLQuantizationType.F32: ">f4", GGMLQuantizationType.F16: ">f2"}
# The largest norm weight or bias a file may hold: one whose square overflows float32 is no trained value
# (gemma3-270m's largest is 1,657), and numpy's layer norm and onnxruntime's part ways on it (they agree up
# to 1e30, differ at 3e38: issue #15's notes, bias_bound). Refused at load, by every plan alike.
VECTOR_LIMIT: Final = float(np.sqrt(np.finfo(np.float32).max))


def decode(info: TensorInfo, raw: bytes | NDArray[np.uint8], byte_order: str) -> F32:
    """Raw bytes of whole rows of `info` as flat float32 — the same function for every plan and the reader."""
    if byte_order == ">":
        swapped = _SWAPPED.get(info.type)
        if swapped is None:
            raise UnsupportedTensorType(
                f"{info.name}: {info.type.name} data in a big-endian GGUF is not supported (only F32 and F16 "
                f"are); convert the file to little-endian"
            )
        return np.frombuffer(raw, dtype=swapped).astype(np.float32)
    return dequantize(raw, info.type, what=info.name)


class StoredRows(Protocol):
    """Consecutive rows of a matrix as stored; any row range decodes to float32."""

    @property
    def n_rows(self) -> int: ...

    def decode(self, lo: int, hi: int, out: F32 | None = None) -> F32:
        """Rows [lo, hi) as float32 [hi - lo, row_len]; into the front of `out` (flat scratch) when the type
        decodes in place (Q8_0), else a new array."""
        ...


@dataclass(frozen=True)
class RawRows:
    """Rows kept as the file stores them, decoded by decode()."""

    info: TensorInfo
    data: NDArray[np.uint8]  # [rows * row_nbytes]
    byte_order: str

    @property
    def n_rows(self) -> int:
        return self.data.size // self.info.row_nbytes

    def decode(self, lo: int, hi: int, out: F32 | None = None) -> F32:
        size = self.info.row_nbytes
        return decode(self.info, self.data[lo * size : hi * size], self.byte_order).reshape(hi - lo, -1)


def stored_rows(info: TensorInfo, raw: bytes | NDArray[np.uint8], order: str) -> StoredRows:
    """Whole rows of `info` as read from the file, Q8_0 split into quants and scales (row order)."""
    if is_q8_0(info, order):
        return Q8Rows.of(raw, info.row_len)
    return RawRows(info, np.frombuffer(raw, dtype=np.uint8), order)


def kept_rows(info: TensorInfo, raw: bytes | NDArray[np.uint8], order: str) -> StoredRows:
    """Whole rows of `info` as resident-quant keeps them: Q8_0 split and cut into the pieces stored_parts()
    and decoded_blocks() decode, each in column order; other types as stored."""
    if is_q8_0(info, order):
        rows = len(raw) // (info.row_len // Q8_BLOCK * Q8_BLOCK_BYTES)
        return Q8Pieces.of(raw, info.row_len, piece_bounds(info, rows))
    return RawRows(info, np.frombuffer(raw, dtype=np.uint8), order)


def piece_bounds(info: TensorInfo, count: int) -> list[tuple[int, int]]:
    """Row ranges of `count` stored rows that decode to about DECODE_BYTES each (at most 1.5x, or one row
    where a row is larger): each piece costs a fixed ~20 us of numpy calls, so no sliver of a few rows gets
    a piece of its own, and no piece is empty."""
    pieces = max(1, min(count, round(count * info.row_len * FLOAT_BYTES / DECODE_BYTES)))
    return list(pairwise(count * k // pieces for k in range(pieces + 1)))


def stored_parts(info: TensorInfo, first: int, rows: StoredRows) -> list[tuple[int, int, Decoder]]:
    """A stored block as pieces any thread may decode (into its own scratch): (first_row, rows, decode)."""
    return [
        (first + lo, hi - lo, functools.partial(rows.decode, lo, hi))
        for lo, hi in piece_bounds(info, rows.n_rows)
    ]


def decoded_blocks(info: TensorInfo, first: int, rows: StoredRows) -> Iterator[tuple[int, F32]]:
    """A stored block's rows decoded in L2-sized pieces: each is multiplied while still in cache.

    A 1 MiB decoded block would not fit a core's L2, so the multiply after decoding it would read it back
    from L3 or memory; pieces of DECODE_BYTES make a single sentence ~30% faster on quantized plans. The
    products are the same up to BLAS's choice of kernel for a piece's last columns (vectors differ from
    resident-f32's by ~1e-7).
    """
    for lo, hi in piece_bounds(info, rows.n_rows):
        yield first + lo, rows.decode(lo, hi)


class RowSource(Protocol):
    """Rows of an embedding table."""

    def rows(self, ids: Ids) -> F32: ...


class BlockSource(Protocol):
    """A weight matrix as row blocks; a slab of its rows or columns as blocks of that slab."""

    def blocks(self) -> Iterator[tuple[int, F32]]: ...

    def row_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        """Rows [lo, hi) as (first_row, float32 [rows, in]) blocks."""
        ...

    def column_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        """Columns [lo, hi) of every row as (first_row, float32 [rows, hi - lo]) blocks."""
        ...


def _rows_of(blocks: Iterable[tuple[int, F32]], lo: int, hi: int) -> Iterator[tuple[int, F32]]:
    """Rows [lo, hi) of row blocks, as views."""
    for first, block in blocks:
        start, end = max(first, lo), min(first + block.shape[0], hi)
        if start < end:
            yield start, block[start - first : end - first]


def _columns_of(blocks: Iterable[tuple[int, F32]], lo: int, hi: int) -> Iterator[tuple[int, F32]]:
    """Columns [lo, hi) of row blocks, as views."""
    for first, block in blocks:
        yield first, block[:, lo:hi]


def _check_ids(info: TensorInfo, ids: Ids) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= info.n_rows):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise GGUFError(f"row {bad} of {info.name} is out of range (it has {info.n_rows} rows)")


class F32Table:
    """A table kept decoded, as one float32 [rows, row_len] array (resident: allocated once, at load)."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, F32]]) -> None:
        self.info = info
        self._table = np.empty((info.n_rows, info.row_len), dtype=np.float32)  # [rows, row_len]
        for first, block in blocks:
            self._table[first : first + block.shape[0]] = block

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        return np.take(self._table, ids, axis=0)  # [n, row_len]


class RawTable:
    """A table kept as stored (quantized) rows, in one array; only the rows asked for are decoded."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, bytes]], order: str) -> None:
        self.info = info
        self._raw = np.empty((info.n_rows, info.row_nbytes), dtype=np.uint8)  # [rows, row_nbytes]
        for first, raw in blocks:
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, info.row_nbytes)
            self._raw[first : first + rows.shape[0]] = rows
        self._order = order

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        raw = np.take(self._raw, ids, axis=0)  # [n, row_nbytes]
        return decode(self.info, raw.reshape(-1), self._order).reshape(ids.size, self.info.row_len)


class FileTable:
    """A table left in the file: each distinct row is read with one pread (positional, so thread-safe)."""

    def __init__(self, info: TensorInfo, fd: int, order: str, *, uncached: bool = False) -> None:
        self.info = info
        self._fd = fd
        self._order = order
        self._uncached = uncached

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        size, base = self.info.row_nbytes, self.info.offset
        name = self.info.name
        raw = b"".join(pread(self._fd, size, base + row * size, name) for row in unique.tolist())
        if self._uncached:
            drop_touched(
                self._fd, base + int(unique[0]) * size, (int(unique[-1]) - int(unique[0]) + 1) * size
            )
        if len(raw) != size * unique.size:
            raise GGUFError(f"{self.info.name}: short read of {unique.size} rows; the file shrank while open")
        decoded = decode(self.info, raw, self._order).reshape(unique.size, self.info.row_len)
        return decoded[inverse.reshape(-1)]  # [n, row_len]


class F32Matrix:
    """A matrix kept decoded, as one block: the whole float32 [out, in] the forward pass multiplies by.

    Resident weights are allocated once, at load, so the single-allocation cap does not bound them; one
    product per matrix saves BLAS the narrow edge panels of row blocks (~6% of the FFN's time for a
    sentence). The matrix is stored transposed ([in, out], C-contiguous) and handed out as its .T view:
    the forward pass computes x @ W.T, which BLAS then reads as a plain x @ W^T (~10% faster than W's rows
    for a sentence of ~15 tokens).
    """

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, F32]]) -> None:
        transposed = np.empty((info.row_len, info.n_rows), dtype=np.float32)  # [in, out]
        for first, block in blocks:  # block [rows, in]
            transposed[:, first : first + block.shape[0]] = block.T
        self._weight = transposed.T  # [out, in]

    def blocks(self) -> Iterator[tuple[int, F32]]:
        yield 0, self._weight

    def row_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return _rows_of(self.blocks(), lo, hi)

    def column_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return _columns_of(self.blocks(), lo, hi)


class RawMatrix:
    """A matrix kept quantized (Q8_0 split into column-order pieces, other types as stored); each block is
    decoded when used."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, StoredRows]]) -> None:
        self.info = info
        self._blocks = list(blocks)
        self._parts = [stored_parts(info, first, rows) for first, rows in self._blocks]

    def blocks(self) -> Iterator[tuple[int, F32]]:
        for first, rows in self._blocks:
            yield from decoded_blocks(self.info, first, rows)

    def row_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        for first, rows in self._blocks:
            start, end = max(first, lo), min(first + rows.n_rows, hi)
            if start < end:
                yield start, rows.decode(start - first, end - first)

    def column_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return _columns_of(self.blocks(), lo, hi)

    def parts(self) -> Iterator[list[tuple[int, int, Decoder]]]:
        return iter(self._parts)


class KernelMatrix:
    """A matrix held by one of onnxruntime's kernels (resident-int8, or resident-f32 packed), which multiplies
    it on threads of its own; its blocks and slabs, which only a streamed pass asks for, are read from the
    file."""

    def __init__(self, kernel: KernelSlice, stream: StreamMatrix) -> None:
        self.kernel = kernel
        self._stream = stream

    def blocks(self) -> Iterator[tuple[int, F32]]:
        return self._stream.blocks()

    def row_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return self._stream.row_slab(lo, hi)

    def column_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return self._stream.column_slab(lo, hi)


class StreamedBytes:
    """Bytes of weights read from the file by streaming passes so far (for reports: GB/s streamed)."""

    def __init__(self) -> None:
        self._total = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes

    @property
    def total(self) -> int:
        return self._total


class StreamMatrix:
    """A matrix read from the file block by block (the reader's blocks), decoded in pieces, every use."""

    def __init__(
        self, gguf: GGUFFile, info: TensorInfo, cap: int, fd: int, *, uncached: bool, streamed: StreamedBytes
    ) -> None:
        self._gguf = gguf
        self.info = info
        self._cap = cap
        self._fd = fd
        self._uncached = uncached
        self._streamed = streamed

    def blocks(self) -> Iterator[tuple[int, F32]]:
        info, order = self.info, self._gguf.byte_order
        for first, raw in read_blocks(self._fd, info, self._cap, drop=self._uncached):
            self._streamed.add(len(raw))
            yield from decoded_blocks(info, first, stored_rows(info, raw, order))

    def row_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        info, order = self.info, self._gguf.byte_order
        for first, raw in read_blocks(self._fd, info, self._cap, drop=self._uncached, lo=lo, hi=hi):
            self._streamed.add(len(raw))
            yield from decoded_blocks(info, first, stored_rows(info, raw, order))

    def column_slab(self, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        """Columns [lo, hi) read row by row (one pread each), decoded in pieces of about DECODE_BYTES and
        of at most hi - lo rows."""
        info, order = self.info, self._gguf.byte_order
        rows = column_piece_rows(hi - lo)
        for first, raw in read_columns(self._fd, info, lo, hi, rows, drop=self._uncached):
            self._streamed.add(len(raw))
            yield first, decode(info, raw, order).reshape(-1, hi - lo)

    def parts(self) -> Iterator[list[tuple[int, int, Decoder]]]:
        info, order = self.info, self._gguf.byte_order
        for first, raw in read_blocks(self._fd, info, self._cap, drop=self._uncached):
            self._streamed.add(len(raw))
            yield stored_parts(info, first, stored_rows(info, raw, order))


class PlannedWeights:
    """The weights of one plan, for any model's forward pass (bert.BertWeights, decoder.DecoderWeights):
    vectors always decoded; tables and matrices where the plan keeps them."""

    def __init__(
        self,
        config: Any,
        plan: Plan,
        *,
        vectors: dict[str, F32],
        tables: dict[str, RowSource],
        matrices: dict[str, BlockSource],
        fd: int,
        streamed: StreamedBytes,
        fused: FusedBert | None = None,
    ) -> None:
        self._config = config
        # A packed BERT held whole in one session (plan.fused): its matrices are then only read from the
        # file, by whoever asks for their blocks.
        self.fused = fused
        self.streamed = streamed
        self.plan = plan
        self._vectors = vectors
        self._tables = tables
        self._matrices = matrices
        self._fd = fd

    @property
    def config(self) -> Any:
        """The model's config, as its forward pass reads it (BertConfig, DecoderConfig)."""
        return self._config

    def vector(self, name: str) -> F32:
        return self._vectors[name]

    def rows(self, name: str, ids: Ids) -> F32:
        return self._tables[name].rows(ids)

    def blocks(self, name: str) -> Iterator[tuple[int, F32]]:
        return self._matrices[name].blocks()

    def row_slab(self, name: str, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return self._matrices[name].row_slab(lo, hi)

    def column_slab(self, name: str, lo: int, hi: int) -> Iterator[tuple[int, F32]]:
        return self._matrices[name].column_slab(lo, hi)

    def held(self, name: str) -> bool:
        """Whether a matrix is held in memory (resident plans), so that handing out its blocks reads nothing
        and holds nothing new: a pass may then line up the tasks of several matrices at once."""
        return isinstance(self._matrices[name], F32Matrix | RawMatrix)

    def kernel(self, name: str) -> KernelSlice | None:
        """Where one of onnxruntime's kernels holds a matrix (resident-int8, resident-f32 packed), which
        multiplies on its own threads; None otherwise."""
        matrix = self._matrices[name]
        return matrix.kernel if isinstance(matrix, KernelMatrix) else None

    def parts(self, name: str) -> Iterator[list[tuple[int, int, Decoder]]] | None:
        """A quantized matrix's stored blocks as pieces for the compute pool's threads to decode (bert.Parts);
        None for matrices kept decoded (resident-f32: use blocks())."""
        matrix = self._matrices[name]
        return matrix.parts() if isinstance(matrix, RawMatrix | StreamMatrix) else None

    def close(self) -> None:
        """Drop the weights and close the file handle used for row reads."""
        self._vectors, self._tables, self._matrices = {}, {}, {}
        self.fused = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _f32_blocks(fd: int, info: TensorInfo, cap: int, order: str) -> Iterator[tuple[int, F32]]:
    """(first_row, float32 [rows, row_len]) blocks, read and decoded one at a time."""
    for first, raw in read_blocks(fd, info, cap):
        yield first, decode(info, raw, order).reshape(-1, info.row_len)


def _table(gguf: GGUFFile, info: TensorInfo, plan: Plan, fd: int) -> RowSource:
    mode, cap, order = plan.tables, plan.cap, gguf.byte_order
    if mode is TableMode.F32:
        return F32Table(info, _f32_blocks(fd, info, cap, order))
    if mode is TableMode.RAW:
        return RawTable(info, read_blocks(fd, info, cap), order)
    return FileTable(info, fd, gguf.byte_order, uncached=plan.uncached)


def _matrix(gguf: GGUFFile, info: TensorInfo, plan: Plan, fd: int, streamed: StreamedBytes) -> BlockSource:
    if plan.name is PlanName.RESIDENT_F32:
        order = gguf.byte_order
        # One block at a time, so loading never holds a matrix twice.
        return F32Matrix(info, _f32_blocks(fd, info, plan.cap, order))
    if plan.name is PlanName.RESIDENT_QUANT:
        order = gguf.byte_order
        return RawMatrix(
            info,
            ((first, kept_rows(info, raw, order)) for first, raw in read_blocks(fd, info, plan.cap)),
        )
    return StreamMatrix(gguf, info, plan.cap, fd, uncached=plan.uncached, streamed=streamed)


# Matrices of one layer a kernel holds as one: they multiply the same input and a pass asks for them
# together (linears()). One product of 1152 columns for a 26-token text takes 176 µs on 1 thread and 114-123
# on 2, three of 384 take 196 and 183 (issue #15's notes, fused_probe).
FUSED: Final = ("attn_q", "attn_k", "attn_v")


def _fused_groups(gguf: GGUFFile, layout: ModelLayout) -> list[list[str]]:
    """The layout's matrices in groups a kernel holds as one: a layer's Q, K and V when their rows
    are as long and their product no wider than the widest activation a chunk is sized for (Llama-2-7B's
    Q, K and V are 12288 wide, its FFN 11008), else alone."""
    names = [name for name in layout.shapes if name in layout.matrices]
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for name in names:
        if name in grouped:
            continue
        prefix, _, part = name.removesuffix(".weight").rpartition(".")
        group = [f"{prefix}.{other}.weight" for other in FUSED] if part in FUSED else [name]
        present = all(member in layout.matrices for member in group)
        infos = [gguf.tensor(member) for member in group] if present else []
        fits = sum(info.n_rows for info in infos) <= layout.config.widest
        if not present or not fits or len({info.row_len for info in infos}) != 1:
            group = [name]
        groups.append(group)
        grouped.update(group)
    return groups


def _kernel_matrices(
    gguf: GGUFFile,
    layout: ModelLayout,
    plan: Plan,
    fd: int,
    streamed: StreamedBytes,
    *,
    vectors: dict[str, F32],
    threads: int,
) -> dict[str, BlockSource]:
    """Every matrix in one of onnxruntime's kernels (Q, K and V of a layer as one), with its bias when each
    has one: Q8_0 in the int8 kernel (resident-int8), or float32 packed (resident-f32 with `plan.packed`)."""
    matrices: dict[str, BlockSource] = {}
    order = gguf.byte_order
    for group in _fused_groups(gguf, layout):
        infos = [gguf.tensor(name) for name in group]
        firsts = list(itertools.accumulate((info.n_rows for info in infos), initial=0))
        biases = [
            vectors[key]
            for key in (name.removesuffix(".weight") + ".bias" for name in group)
            if key in vectors
        ]
        bias = np.concatenate(biases) if len(biases) == len(group) else None  # [rows]
        name, rows, row_len = ", ".join(group), firsts[-1], infos[0].row_len
        kernel: Int8Matrix | PackedMatrix
        if plan.name is PlanName.RESIDENT_INT8:
            raw = (
                (first + lo, block)
                for info, first in zip(infos, firsts[:-1], strict=True)
                for lo, block in read_blocks(fd, info, plan.cap)
            )
            kernel = Int8Matrix(name, rows, row_len, raw, bias=bias, threads=threads)
        else:
            decoded = (
                (first + lo, block)
                for info, first in zip(infos, firsts[:-1], strict=True)
                for lo, block in _f32_blocks(fd, info, plan.cap, order)
            )
            kernel = PackedMatrix(name, rows, row_len, decoded, bias=bias, threads=threads)
        for member, info, first in zip(group, infos, firsts[:-1], strict=True):
            stream = StreamMatrix(gguf, info, plan.cap, fd, uncached=False, streamed=streamed)
            held = KernelSlice(kernel, slice(first, first + info.n_rows), biased=bias is not None)
            matrices[member] = KernelMatrix(held, stream)
    return matrices


def bounded_vector(name: str, vector: F32) -> F32:
    """`vector` unchanged, or GGUFError naming its first finite element past VECTOR_LIMIT (NaN and infinity
    are refused by the pass that meets them, every plan's alike)."""
    huge = np.isfinite(vector) & (np.abs(vector) > VECTOR_LIMIT)
    if huge.any():
        at = int(np.argmax(huge))
        raise GGUFError(
            f"{name} holds {float(vector[at]):.3g} at element {at}: no norm weight or bias is trained that "
            f"large (its square overflows float32; the bound is {VECTOR_LIMIT:.3g}); the file is corrupt: "
            f"re-convert or re-download it"
        )
    return vector


def load_weights(gguf: GGUFFile, layout: ModelLayout, plan: Plan, *, threads: int = 1) -> PlannedWeights:
    """Build the plan's weights from an open file (which must stay open while they are used); `threads`
    is how many onnxruntime's kernels multiply on (resident-int8, resident-f32 packed)."""
    try:
        fd = os.open(gguf.path, os.O_RDONLY)
    except OSError as error:
        raise GGUFError(f"cannot reopen {gguf.path} to read its weights: {error.strerror or error}") from None
    try:
        # Our reads are whole blocks or random rows: readahead would only fill the page cache.
        advise(fd, "POSIX_FADV_RANDOM")
        vectors: dict[str, F32] = {}
        tables: dict[str, RowSource] = {}
        matrices: dict[str, BlockSource] = {}
        streamed = StreamedBytes()
        in_kernel = plan.name is PlanName.RESIDENT_INT8 or (plan.packed and not plan.fused)
        fused: FusedBert | None = None
        for name in layout.shapes:
            info = gguf.tensor(name)
            if name in layout.tables:
                tables[name] = _table(gguf, info, plan, fd)
            elif name in layout.matrices:
                if plan.fused:
                    matrices[name] = StreamMatrix(gguf, info, plan.cap, fd, uncached=False, streamed=streamed)
                elif not in_kernel:
                    matrices[name] = _matrix(gguf, info, plan, fd, streamed)
            else:
                blocks = _f32_blocks(fd, info, plan.cap, gguf.byte_order)
                vectors[name] = bounded_vector(name, np.concatenate([piece.ravel() for _, piece in blocks]))
        if in_kernel:
            matrices = _kernel_matrices(gguf, layout, plan, fd, streamed, vectors=vectors, threads=threads)
        if plan.fused:
            order = gguf.byte_order
            fused = FusedBert(
                layout.config,
                lambda name: _f32_blocks(fd, gguf.tensor(name), plan.cap, order),
                vectors,
                cap=plan.cap,
                threads=threads,
            )
    except BaseException:
        os.close(fd)
        raise
    # What the header parse and the tokenizer read (with readahead) is not needed again.
    drop_cached(fd)
    return PlannedWeights(
        layout.config,
        plan,
        vectors=vectors,
        tables=tables,
        matrices=matrices,
        fd=fd,
        streamed=streamed,
        fused=fused,
    )
