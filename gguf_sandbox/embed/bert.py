"""BERT encoder forward pass in numpy: one function per sublayer, blocked so no temporary passes the cap."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

from gguf_sandbox.embed.gelu import GELU_STEP, erf, gelu
from gguf_sandbox.embed.threads import Task, current_pool, spans
from gguf_sandbox.errors import GGUFError

F32: TypeAlias = NDArray[np.float32]
__all__ = ["GELU_STEP", "erf", "gelu"]  # re-exported: the GELU the forward pass applies lives in gelu.py
Ids: TypeAlias = NDArray[np.intp]
# Activations of a batch: its token rows split into chunks, one array [chunk_rows, width] per chunk.
Rows: TypeAlias = list[F32]
# What a product task applies to its output columns in place before it ends (GELU).
Epilogue: TypeAlias = Callable[[F32], object]
# Decodes one piece of a quantized matrix, into the flat float32 scratch it is given when its type allows.
Decoder: TypeAlias = Callable[[F32 | None], F32]
# A piece of a stored weight block: (first output row, rows, its decoder).
Part: TypeAlias = tuple[int, int, Decoder]

DEFAULT_CAP: Final = 1 << 20
FLOAT_BYTES: Final = 4
# BLAS multiplies in panels of 4 rows (OpenBLAS's sgemm kernels here): 1-3 leftover rows cost about as
# much as a whole panel, so activation chunks get zero rows up to a multiple of this. A 19-token sentence
# padded to 20 rows has its products ~20% faster; the padding never reaches attention or pooling.
ROW_ALIGN: Final = 4
# Output columns of a product are split across threads at multiples of this (a 64-byte line of floats).
COLUMN_ALIGN: Final = 16
# A product task smaller than this many multiply-adds (~40 µs of single-threaded BLAS here) gains less from
# another thread than handing it over costs: a 25-token text's 384-wide products cut four ways made two
# threads slower than one (issue #15). Smaller products are cut into fewer, larger tasks.
MIN_TASK_MACS: Final = 1 << 21
# Tasks a product aims for per thread: a batch's ~5 chunks as 5 tasks kept one of 2 threads idle a fifth of
# the time; cut into 10 (and chunks of unequal size spread over more tasks) the threads end together.
TASKS_PER_THREAD: Final = 4
# Each compute thread decodes quantized weight pieces into one scratch buffer of this size, kept for the
# thread's life: no fresh array (and no page faults) per piece.
SCRATCH_BYTES: Final = 1 << 19
_thread_scratch = threading.local()


class Pooling(IntEnum):
    """How token vectors become one sentence vector; values are llama.cpp's LLAMA_POOLING_TYPE.

    NONE (one vector per token) is named so files declaring it are refused by name: the engine returns one
    vector per text.
    """

    NONE = 0
    MEAN = 1
    CLS = 2
    LAST = 3


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, as its GGUF metadata states it."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    context_length: int
    layer_norm_eps: float = 1e-12
    pooling: Pooling = Pooling.MEAN
    has_token_types: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "ffn", "context_length"):
            if getattr(self, name) <= 0:
                raise GGUFError(f"BERT config: {name} is {getattr(self, name)}; it must be positive")
        if self.hidden % self.heads:
            raise GGUFError(
                f"BERT config: hidden size {self.hidden} is not divisible by {self.heads} attention heads"
            )
        if self.pooling not in POOLERS:
            supported = ", ".join(p.name for p in POOLERS)
            raise GGUFError(
                f"BERT config: pooling type {self.pooling.name} ({int(self.pooling)}) asks for one vector "
                f"per token, which the engine does not produce: it returns one vector per text (supported: "
                f"{supported})"
            )
        if not 0 < self.layer_norm_eps < math.inf:
            raise GGUFError(f"BERT config: layer_norm_eps {self.layer_norm_eps!r} must be finite and > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def widest(self) -> int:
        """The widest activation row: the FFN intermediate or, for odd models, the hidden state."""
        return max(self.hidden, self.ffn)

    @property
    def row_bytes(self) -> int:
        """Activation bytes one token row needs at the peak of a layer (x, q, k, v, ctx or x, up, out)."""
        return FLOAT_BYTES * (max(5 * self.hidden, 2 * self.hidden + self.ffn) + self.hidden)


class Weights(Protocol):
    """Where a forward pass gets its weights, by GGUF tensor name; every plan in weights.py implements it."""

    def vector(self, name: str) -> F32:
        """A 1-D tensor (bias, norm) as float32 [n]."""
        ...

    def rows(self, name: str, ids: Ids) -> F32:
        """Rows `ids` of an embedding table as float32 [len(ids), row_len]."""
        ...

    def blocks(self, name: str) -> Iterable[tuple[int, F32]]:
        """A 2-D weight [out, in] as (first_row, float32 [rows, in]) blocks in row order.

        Blocks decoded for the call stay within the cap; weights held resident may come as one block.
        """
        ...


class BertWeights(Weights, Protocol):
    """The weights of a BERT model, with its config."""

    @property
    def config(self) -> BertConfig: ...


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


def layer_norm(x: F32, gamma: F32, beta: F32, eps: float) -> F32:
    """Normalize each row of x [rows, hidden] in place to zero mean, unit variance; then scale and shift."""
    width = np.float32(x.shape[1])
    # add.reduce and a division are what x.mean() computes, without its Python-level bookkeeping.
    mean = np.add.reduce(x, axis=1, keepdims=True)  # [rows, 1]
    mean /= width  # [rows, 1]
    x -= mean  # [rows, hidden]
    variance = np.einsum("ij,ij->i", x, x)  # [rows]
    variance /= width  # [rows]
    variance += np.float32(eps)  # [rows]
    np.sqrt(variance, out=variance)  # [rows]
    np.divide(np.float32(1.0), variance, out=variance)  # [rows]
    x *= variance[:, None]  # [rows, hidden]
    x *= gamma  # [rows, hidden]
    x += beta  # [rows, hidden]
    return x


def _product(
    x: F32,
    block: F32,
    y: F32,
    columns: slice,
    *,
    bias: F32 | None,
    residual: F32 | None,
    after: Epilogue | None,
) -> None:
    """y[:, columns] = after(x @ block.T (+ bias) (+ residual)): one task, every step on the same columns."""
    out = y[:, columns]  # [rows, span]
    np.matmul(x, block.T, out=out)  # [rows, span]
    _epilogue(out, columns, bias, residual, after)


def _scratch() -> F32:
    """This thread's decode scratch (float32, SCRATCH_BYTES), allocated at its first use."""
    buffer: F32 | None = getattr(_thread_scratch, "buffer", None)
    if buffer is None:
        buffer = _thread_scratch.buffer = np.empty(SCRATCH_BYTES // FLOAT_BYTES, dtype=np.float32)
    return buffer


def _decoded_product(xs: Rows, ys: Rows, part: Part) -> None:
    """One piece of a quantized matrix decoded into this thread's scratch, then multiplied for every chunk."""
    first, count, decode = part
    fits = count * xs[0].shape[1] * FLOAT_BYTES <= SCRATCH_BYTES
    block = decode(_scratch() if fits else None)  # [count, in]
    for x, y in zip(xs, ys, strict=True):
        np.matmul(x, block.T, out=y[:, first : first + count])  # [rows, count]


def _epilogue(
    out: F32, columns: slice, bias: F32 | None, residual: F32 | None, after: Epilogue | None
) -> None:
    """Bias, residual and `after` on columns of one chunk's product, in place."""
    if bias is not None:
        out += bias[columns]  # [rows, span]
    if residual is not None:
        out += residual[:, columns]  # [rows, span]
    if after is not None:
        after(out)  # [rows, span]


def column_parts(xs: Rows, columns: int, threads: int) -> int:
    """Output-column spans per chunk for the products of `xs` by a block of `columns` output rows: about
    TASKS_PER_THREAD tasks per thread in all, none below MIN_TASK_MACS (so at least one per chunk)."""
    if threads == 1:
        return 1
    wanted = -(-TASKS_PER_THREAD * threads // len(xs))
    macs_per_chunk = sum(int(x.shape[0]) for x in xs) * int(xs[0].shape[1]) * columns // len(xs)
    return max(1, min(wanted, macs_per_chunk // MIN_TASK_MACS))


@dataclass(frozen=True)
class _LinearWork:
    """A product's tasks: `runs` (one list per weight block, produced as the blocks are read) and then
    `epilogues` (bias, residual and `after` per chunk, when the runs do not apply them themselves)."""

    runs: Iterator[list[Task]]
    epilogues: list[Task]


def _linear_work(
    xs: Rows,
    ys: Rows,
    weights: Weights,
    name: str,
    *,
    bias: bool,
    residual: Rows | None,
    after: Epilogue | None,
) -> _LinearWork:
    """The tasks of ys = after(xs @ W.T (+ b) (+ residual)) for the current pool."""
    threads = current_pool().threads
    b = weights.vector(f"{name}.bias") if bias else None  # [out]
    residuals: Sequence[F32 | None] = residual if residual is not None else [None] * len(xs)
    stored = getattr(weights, "parts", None)
    pieces = stored(f"{name}.weight") if stored is not None else None
    if pieces is not None:
        # A quantized matrix: each task decodes a piece of a stored block and multiplies every chunk by it;
        # then one task per chunk applies bias, residual and `after` to all its columns (per piece, those
        # ~16 numpy calls would cost more than the product for a short text).
        every = slice(0, ys[0].shape[1])
        runs: Iterator[list[Task]] = (
            [functools.partial(_decoded_product, xs, ys, part) for part in parts] for parts in pieces
        )
        if b is None and residual is None and after is None:
            return _LinearWork(runs, [])
        epilogues: list[Task] = [
            functools.partial(_epilogue, y, every, b, r, after) for y, r in zip(ys, residuals, strict=True)
        ]
        return _LinearWork(runs, epilogues)

    def block_tasks(first: int, block: F32) -> list[Task]:  # block [block_rows, in]
        parts = column_parts(xs, block.shape[0], threads)
        return [
            functools.partial(
                _product, x, block[lo:hi], y, slice(first + lo, first + hi), bias=b, residual=r, after=after
            )
            for x, y, r in zip(xs, ys, residuals, strict=True)
            for lo, hi in spans(block.shape[0], parts, COLUMN_ALIGN)
        ]

    return _LinearWork((block_tasks(first, block) for first, block in weights.blocks(f"{name}.weight")), [])


def linear(
    xs: Rows,
    weights: Weights,
    name: str,
    out_dim: int,
    *,
    bias: bool = True,
    residual: Rows | None = None,
    after: Epilogue | None = None,
    out: Rows | None = None,
) -> Rows:
    """x @ W.T (+ b) (+ residual), then `after` in place, per chunk, into `out` (new arrays when None).

    W [out, in] comes block by block, each used for every chunk, then dropped. Each block's products are
    split into tasks by chunk and, when chunks are too few to keep the pool's threads busy, by output-column
    spans too (column_parts); bias, residual and `after` (an elementwise function: GELU) run inside each
    task, on columns that are still in cache.
    """
    pool = current_pool()
    ys = out if out is not None else [np.empty((x.shape[0], out_dim), dtype=np.float32) for x in xs]
    work = _linear_work(xs, ys, weights, name, bias=bias, residual=residual, after=after)
    for tasks in work.runs:
        pool.run(tasks)
    pool.run(work.epilogues)
    return ys


def linears(xs: Rows, weights: Weights, outputs: Sequence[tuple[str, Rows]]) -> None:
    """Several products of the same input with their biases (Q, K and V), each into its output rows.

    When every matrix is held in memory (weights.held: the resident plans), all their tasks go to the pool
    at once: a 25-token text's three 384-wide products are each too small to share between threads, but
    together keep two busy. Streamed matrices are read one after the other (linear() each), so no more
    than one block is held at a time.
    """
    held = getattr(weights, "held", None)
    if held is None or not all(held(f"{name}.weight") for name, _ in outputs):
        for name, ys in outputs:
            linear(xs, weights, name, ys[0].shape[1], out=ys)
        return
    works = [
        _linear_work(xs, ys, weights, name, bias=True, residual=None, after=None) for name, ys in outputs
    ]
    pool = current_pool()
    pool.run([task for work in works for tasks in work.runs for task in tasks])
    pool.run([task for work in works for task in work.epilogues])


def embeddings(weights: BertWeights, batch: TokenBatch, cap: int = DEFAULT_CAP) -> Rows:
    """Token + position + token-type (type 0) embeddings, layer-normalized, per chunk.

    Each chunk is padded with zero rows to padded_rows(); layer norm turns them into beta, a harmless row
    that every later sublayer computes alongside the tokens and that attention and pooling never read.
    """
    config = weights.config
    limit = rows_per_chunk(config, cap)
    gamma = weights.vector("token_embd_norm.weight")  # [hidden]
    beta = weights.vector("token_embd_norm.bias")  # [hidden]
    type_zero = np.zeros(1, dtype=np.intp)
    type_row = (
        weights.rows("token_types.weight", type_zero) if config.has_token_types else None
    )  # [1, hidden]
    xs: Rows = []
    for first, last in batch.chunks:
        x = np.zeros((padded_rows(last - first, limit), config.hidden), dtype=np.float32)  # [padded, hidden]
        tokens = x[: last - first]  # [rows, hidden]
        tokens += weights.rows("token_embd.weight", batch.ids[first:last])  # [rows, hidden]
        tokens += weights.rows("position_embd.weight", batch.positions[first:last])  # [rows, hidden]
        if type_row is not None:
            tokens += type_row  # [rows, hidden]
        xs.append(layer_norm(x, gamma, beta, config.layer_norm_eps))
    return xs


def gather(chunks: Rows, pieces: tuple[tuple[int, int, int], ...], columns: slice) -> F32:
    """The rows of one sequence (its pieces across chunks) restricted to `columns`: a view when possible."""
    if len(pieces) == 1:
        chunk, lo, hi = pieces[0]
        return chunks[chunk][lo:hi, columns]  # [length, width]
    return np.concatenate([chunks[chunk][lo:hi, columns] for chunk, lo, hi in pieces])  # [length, width]


def _attend(
    q: Rows,
    k: Rows,
    v: Rows,
    ctx: Rows,
    *,
    pieces: tuple[tuple[int, int, int], ...],
    heads: tuple[int, int],
    head_dim: int,
    cap: int,
) -> None:
    """ctx of one sequence for heads [h0, h1), in head groups whose gathered K, V and scores stay in `cap`."""
    length = sum(hi - lo for _, lo, hi in pieces)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    first_head, last_head = heads
    # Heads per group: a gathered K or V of the group, [length, group * head_dim], stays within the cap.
    group = max(1, min(last_head - first_head, cap // (FLOAT_BYTES * length * head_dim)))
    for h0 in range(first_head, last_head, group):
        g = min(group, last_head - h0)
        columns = slice(h0 * head_dim, (h0 + g) * head_dim)
        keys = gather(k, pieces, columns).reshape(length, g, head_dim).transpose(1, 2, 0)  # [g, d, L]
        values = gather(v, pieces, columns).reshape(length, g, head_dim).transpose(1, 0, 2)  # [g, L, d]
        query_rows = max(1, min(length, cap // (FLOAT_BYTES * g * length)))
        # One scores buffer per group, reused by every query block (a new one would briefly double it).
        buffer = np.empty((g, query_rows, length), dtype=np.float32)  # [g, query_rows, L]
        for chunk, lo, hi in pieces:
            for r0 in range(lo, hi, query_rows):
                r1 = min(r0 + query_rows, hi)
                queries = q[chunk][r0:r1, columns].reshape(r1 - r0, g, head_dim).transpose(1, 0, 2)
                scores = np.matmul(queries, keys, out=buffer[:, : r1 - r0])  # [g, n, L]
                scores *= scale  # [g, n, L]
                scores -= np.maximum.reduce(scores, axis=2, keepdims=True)  # [g, n, L]
                np.exp(scores, out=scores)  # [g, n, L]
                scores /= np.add.reduce(scores, axis=2, keepdims=True)  # [g, n, L]
                out = ctx[chunk][r0:r1, columns].reshape(r1 - r0, g, head_dim).transpose(1, 0, 2)
                np.matmul(scores, values, out=out)  # [g, n, d]


def attention(q: Rows, k: Rows, v: Rows, batch: TokenBatch, *, heads: int, cap: int = DEFAULT_CAP) -> Rows:
    """softmax(q k^T / sqrt(d)) v per sequence and head, in query-row blocks so scores stay within the cap.

    One task per sequence and head span: a sequence's heads are split across the pool's threads when there
    are fewer sequences than threads and its scores and context (2 L^2 d multiply-adds per head) are worth
    handing over (MIN_TASK_MACS): a 25-token text's attention is ~0.5M for all heads.
    """
    pool = current_pool()
    head_dim = q[0].shape[1] // heads
    ctx = [np.empty((chunk.shape[0], heads * head_dim), dtype=np.float32) for chunk in q]  # per chunk
    for padded, (first, last) in zip(ctx, batch.chunks, strict=True):
        padded[last - first :] = 0  # padding rows: no sequence writes them
    wanted = -(-pool.threads // batch.n_sequences)  # head spans per sequence
    lengths = np.diff(batch.starts).tolist()
    work = [
        (pieces, span)
        for pieces, length in zip(batch.pieces, lengths, strict=True)
        for span in spans(heads, max(1, min(wanted, 2 * length * length * heads * head_dim // MIN_TASK_MACS)))
    ]
    # Tasks running at once share the cap, so their gathered K, V and scores together stay within what one
    # serial pass holds (plan.TRANSIENT_CAPS).
    share = cap // min(pool.threads, len(work))
    pool.run(
        [
            functools.partial(_attend, q, k, v, ctx, pieces=pieces, heads=span, head_dim=head_dim, cap=share)
            for pieces, span in work
        ]
    )
    return ctx


def _layer_norms(ys: Rows, weights: BertWeights, name: str) -> None:
    """Layer norm of every chunk in place, chunks spread over the pool."""
    gamma = weights.vector(f"{name}.weight")  # [hidden]
    beta = weights.vector(f"{name}.bias")  # [hidden]
    eps = weights.config.layer_norm_eps
    current_pool().run([functools.partial(layer_norm, y, gamma, beta, eps) for y in ys])


def self_attention(x: Rows, weights: BertWeights, layer: int, batch: TokenBatch, cap: int) -> Rows:
    """Multi-head self-attention with its output projection, residual and layer norm (post-LN BERT).

    Q, K and V are written side by side into one [rows, 3 hidden] array per chunk (one allocation, and
    attention reads them as column views).
    """
    config = weights.config
    prefix = f"blk.{layer}"
    hidden = config.hidden
    qkv = [np.empty((chunk.shape[0], 3 * hidden), dtype=np.float32) for chunk in x]  # [rows, 3h] per chunk
    linears(
        x,
        weights,
        [
            (f"{prefix}.{part}", [chunk[:, index * hidden : (index + 1) * hidden] for chunk in qkv])
            for index, part in enumerate(("attn_q", "attn_k", "attn_v"))
        ],
    )
    q = [chunk[:, :hidden] for chunk in qkv]  # [rows, hidden] per chunk
    k = [chunk[:, hidden : 2 * hidden] for chunk in qkv]  # [rows, hidden] per chunk
    v = [chunk[:, 2 * hidden :] for chunk in qkv]  # [rows, hidden] per chunk
    ctx = attention(q, k, v, batch, heads=config.heads, cap=cap)  # [rows, hidden] per chunk
    del q, k, v, qkv
    out = linear(ctx, weights, f"{prefix}.attn_output", hidden, residual=x)  # [rows, hidden] per chunk
    del ctx
    _layer_norms(out, weights, f"{prefix}.attn_output_norm")  # [rows, hidden] per chunk
    return out


def feed_forward(x: Rows, weights: BertWeights, layer: int) -> Rows:
    """GELU MLP with residual and layer norm."""
    config = weights.config
    prefix = f"blk.{layer}"
    up = linear(x, weights, f"{prefix}.ffn_up", config.ffn, after=gelu)  # [rows, ffn] per chunk
    out = linear(up, weights, f"{prefix}.ffn_down", config.hidden, residual=x)  # [rows, hidden] per chunk
    del up
    _layer_norms(out, weights, f"{prefix}.layer_output_norm")  # [rows, hidden] per chunk
    return out


def encoder_layer(x: Rows, weights: BertWeights, layer: int, batch: TokenBatch, cap: int) -> Rows:
    """One transformer block: self-attention then feed-forward."""
    return feed_forward(self_attention(x, weights, layer, batch, cap), weights, layer)


def _mean_rows(x: Rows, pieces: tuple[tuple[int, int, int], ...]) -> NDArray[np.float64]:
    total = np.zeros(x[0].shape[1], dtype=np.float64)  # [hidden]
    for chunk, lo, hi in pieces:
        total += x[chunk][lo:hi].sum(axis=0, dtype=np.float64)  # [hidden]
    return total / sum(hi - lo for _, lo, hi in pieces)  # [hidden]


def _first_row(x: Rows, pieces: tuple[tuple[int, int, int], ...]) -> F32:
    chunk, lo, _ = pieces[0]
    return x[chunk][lo : lo + 1].reshape(-1)  # [hidden]


def _last_row(x: Rows, pieces: tuple[tuple[int, int, int], ...]) -> F32:
    chunk, _, hi = pieces[-1]
    return x[chunk][hi - 1 : hi].reshape(-1)  # [hidden]


Pooler: TypeAlias = Callable[[Rows, tuple[tuple[int, int, int], ...]], "NDArray[np.float32 | np.float64]"]


# Pooling.NONE has no pooler: BertConfig refuses it.
POOLERS: dict[Pooling, Pooler] = {
    Pooling.MEAN: _mean_rows,
    Pooling.CLS: _first_row,
    Pooling.LAST: _last_row,
}
# What a caller may ask for instead of the file's pooling (`--pooling`).
POOLING_NAMES: Final = tuple(p.name.lower() for p in POOLERS)


def pool(x: Rows, batch: TokenBatch, pooling: Pooling) -> F32:
    """One vector per sequence: mean over its tokens, its [CLS] row or its last row."""
    pooler = POOLERS[pooling]
    out = np.empty((batch.n_sequences, x[0].shape[1]), dtype=np.float32)  # [n, hidden]
    for index, pieces in enumerate(batch.pieces):
        out[index] = pooler(x, pieces)  # [hidden]
    return out


def normalize(v: F32) -> F32:
    """Scale each row of v [n, dim] to unit L2 norm in place (rows of zeros stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))  # [n]
    v /= np.maximum(norms, 1e-12).astype(np.float32)[:, None]  # [n, dim]
    return v


def require_finite(vectors: F32) -> F32:
    """`vectors` [n, dim] unchanged, or GGUFError naming the first row holding NaN or infinity."""
    finite = np.isfinite(vectors).all(axis=1)  # [n]
    if not finite.all():
        first = int(np.argmin(finite))
        raise GGUFError(
            f"the forward pass produced NaN or infinite values (sequence {first} of the batch, "
            f"{int((~finite).sum())} of {finite.size} affected): the model's weights or hyperparameters are "
            f"corrupt; re-convert or re-download it"
        )
    return vectors


def encode(
    weights: BertWeights, batch: TokenBatch, cap: int = DEFAULT_CAP, *, unit_length: bool = True
) -> F32:
    """Sentence vectors [n_sequences, hidden] for a batch of token sequences, unit length unless told not.

    NaN or infinite values, which only corrupt weights produce, end in GGUFError, never in a vector.
    """
    # Corrupt weights overflow and divide by zero on the way; require_finite reports it once, in words.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = embeddings(weights, batch, cap)  # [padded, hidden] per chunk
        for layer in range(weights.config.layers):
            x = encoder_layer(x, weights, layer, batch, cap)  # [rows, hidden] per chunk
        pooled = require_finite(pool(x, batch, weights.config.pooling))  # [n, hidden]
    return normalize(pooled) if unit_length else pooled
