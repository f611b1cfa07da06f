"""BERT encoder forward pass in numpy: one function per sublayer, blocked so no temporary passes the cap."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

from gguf_sandbox.embed.gelu import GELU_STEP, erf, gelu
from gguf_sandbox.embed.linear import Weights, linear, linears
from gguf_sandbox.embed.rows import (
    DEFAULT_CAP,
    F32,
    FLOAT_BYTES,
    Rows,
    TokenBatch,
    gather,
    padded_rows,
    rows_per_chunk,
)
from gguf_sandbox.embed.softmax import softmax_times_values
from gguf_sandbox.embed.threads import SERIAL, Task, current_pool, spans
from gguf_sandbox.errors import GGUFError

__all__ = ["GELU_STEP", "erf", "gelu"]  # re-exported: the GELU the forward pass applies lives in gelu.py

# A sequence's heads are split between threads from this many multiply-adds of attention (2 L^2 d per
# head), fewer than a product task's (linear.MIN_TASK_MACS): 32-wide products and the softmax do less per
# multiply-add. One text on 2 threads, split here or from 4M: 94 tokens 23.1 ms against 23.6-23.7, 103
# tokens 24.9-25.1 against 25.6-25.7, 85 tokens 22.0 either way (issue #15's notes, attn_split_probe).
ATTENTION_TASK_MACS: Final = 1 << 21


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

    @property
    def column_slabs(self) -> tuple[int, int, int]:
        """A BERT pass reads its weights by rows only."""
        return (0, 0, 0)


class BertWeights(Weights, Protocol):
    """The weights of a BERT model, with its config."""

    @property
    def config(self) -> BertConfig: ...


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


def _head_floats(length: int, head_dim: int, query_rows: int, *, gathered: bool) -> int:
    """Floats one head of an attention block holds: its K and V when gathered from several pieces (2 L d;
    from one piece they are views), and per query row its scores and scaled query (L + d)."""
    return (2 * length * head_dim if gathered else 0) + query_rows * (length + head_dim)


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
    """ctx of one sequence for heads [h0, h1), in head groups whose gathered K and V, scores and scaled
    queries together stay in `cap` (all but one head's K and V when those alone leave no room for a row)."""
    length = sum(hi - lo for _, lo, hi in pieces)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    first_head, last_head = heads
    # Query blocks run within a piece (a chunk's rows), so a block is at most the longest piece, and as many
    # heads go in a group as the cap then holds: fewer numpy calls, which on 2 threads pass the GIL back and
    # forth. A 256-token text on 2 threads (pieces of 168 and 88 rows): 6 blocks per thread, not 12 of one
    # head each (attention 13.2-13.4 -> 10.6-10.9 ms a text); at 512 tokens on 1 thread, 24 blocks, not 48.
    # The 1/sqrt(d) goes on a block's queries rather than its scores: L/d times fewer multiplies, and K
    # stays a view. One buffer each for scores and queries serves every block of every group.
    budget = cap // FLOAT_BYTES
    gathered = len(pieces) > 1
    key_values = _head_floats(length, head_dim, 0, gathered=gathered)
    longest = max(hi - lo for _, lo, hi in pieces)
    # Only when one head's K and V leave no room for a single query row (MiniLM at ~4000 tokens on 1 thread,
    # BERT-base with 64-wide heads at ~2000) does a block go beyond the cap: by those K and V, which one head
    # needs whatever the block; its queries then get half the cap.
    room = (
        budget - key_values if budget >= _head_floats(length, head_dim, 1, gathered=gathered) else budget // 2
    )
    query_rows = max(1, min(longest, room // (length + head_dim)))
    group = max(
        1,
        min(last_head - first_head, budget // _head_floats(length, head_dim, query_rows, gathered=gathered)),
    )
    scores_buffer = np.empty(group * query_rows * length, dtype=np.float32)
    queries_buffer = np.empty(group * query_rows * head_dim, dtype=np.float32)
    for h0 in range(first_head, last_head, group):
        g = min(group, last_head - h0)
        columns = slice(h0 * head_dim, (h0 + g) * head_dim)
        keys = gather(k, pieces, columns).reshape(length, g, head_dim).transpose(1, 2, 0)  # [g, d, L]
        values = gather(v, pieces, columns).reshape(length, g, head_dim).transpose(1, 0, 2)  # [g, L, d]
        for chunk, lo, hi in pieces:
            for r0 in range(lo, hi, query_rows):
                n = min(query_rows, hi - r0)
                block = queries_buffer[: n * g * head_dim].reshape(n, g * head_dim)  # [n, g * d]
                np.multiply(q[chunk][r0 : r0 + n, columns], scale, out=block)
                queries = block.reshape(n, g, head_dim).transpose(1, 0, 2)  # [g, n, d]
                scores = scores_buffer[: g * n * length].reshape(g, n, length)  # [g, n, L]
                np.matmul(queries, keys, out=scores)
                out = ctx[chunk][r0 : r0 + n, columns].reshape(n, g, head_dim).transpose(1, 0, 2)
                softmax_times_values(scores, values, out)  # [g, n, d]
        del keys, values  # a gathered K and V go before the next group's are made


def attention(q: Rows, k: Rows, v: Rows, batch: TokenBatch, *, heads: int, cap: int = DEFAULT_CAP) -> Rows:
    """softmax(q k^T / sqrt(d)) v per sequence and head, in query-row blocks so scores stay within the cap.

    One task per sequence and head span: a sequence's heads are split across the pool's threads when there
    are fewer sequences than threads and its scores and context (2 L^2 d multiply-adds per head) are worth
    handing over (ATTENTION_TASK_MACS): a 25-token text's attention is ~0.5M for all heads.
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
        for span in spans(
            heads, max(1, min(wanted, 2 * length * length * heads * head_dim // ATTENTION_TASK_MACS))
        )
    ]
    # Tasks running at once share the cap, so their gathered K, V and scores together stay within what one
    # serial pass holds (plan.TRANSIENT_CAPS). One head's K and V gathered from several pieces (2 L d floats)
    # do not shrink with a task's share: no more tasks run at once than leave room beside those for a query
    # row, so each stays within its share (64-wide heads: 3 tasks at 512 tokens, 1 past ~1000). One alone
    # whose K and V outgrow the cap (past ~2000 tokens) has them held by the pass's row budget: row_bytes
    # leaves attention at least 2 d floats a token.
    running = min(pool.threads, len(work))
    longest = max((sum(hi - lo for _, lo, hi in pieces) for pieces, _ in work if len(pieces) > 1), default=0)
    if longest:
        running = max(
            1, min(running, cap // (FLOAT_BYTES * _head_floats(longest, head_dim, 1, gathered=True)))
        )
    share = cap // running
    tasks: list[Task] = [
        functools.partial(_attend, q, k, v, ctx, pieces=pieces, heads=span, head_dim=head_dim, cap=share)
        for pieces, span in work
    ]
    if running < min(pool.threads, len(tasks)):
        tasks = [functools.partial(SERIAL.run, tasks[first::running]) for first in range(running)]
    pool.run(tasks)
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


def require_finite(vectors: F32, first: int = 0) -> F32:
    """`vectors` [n, dim] unchanged, or GGUFError naming the first row holding NaN or infinity, counting
    rows from `first` (the row's index among the caller's texts)."""
    finite = np.isfinite(vectors).all(axis=1)  # [n]
    if not finite.all():
        bad, affected = first + int(np.argmin(finite)), int((~finite).sum())
        raise GGUFError(
            f"the forward pass produced NaN or infinite values for {affected} of the {finite.size} texts "
            f"embedded together (the first is text {bad}): the model's weights or hyperparameters are "
            f"corrupt; re-convert or re-download it"
        )
    return vectors


class FusedEncoder(Protocol):
    """A BERT's layers held whole by a kernel (ort_bert.FusedBert): the whole encoder for short texts, as
    many together as fit (whole_fits), one longer text's attention, or a layer's Q, K and V product and the
    rest of the layer, per activation chunk."""

    def whole_fits(self, texts: int, longest: int) -> bool: ...

    def whole(self, x: F32, lengths: Sequence[int] = ()) -> F32: ...

    @property
    def attend_tokens(self) -> int: ...

    def attend(self, q: F32, k: F32, v: F32) -> F32: ...

    def qkv(self, layer: int, x: F32) -> F32: ...

    def rest(self, layer: int, ctx: F32, x: F32) -> F32: ...


def fused_layer(x: Rows, fused: FusedEncoder, layer: int, batch: TokenBatch, *, heads: int, cap: int) -> Rows:
    """encoder_layer() with the layer's products, norms and GELU in the kernel's session, numpy's attention
    between its two parts."""
    hidden = x[0].shape[1]
    qkv = [fused.qkv(layer, chunk) for chunk in x]  # [rows, 3 hidden] per chunk
    q = [chunk[:, :hidden] for chunk in qkv]  # [rows, hidden] per chunk
    k = [chunk[:, hidden : 2 * hidden] for chunk in qkv]  # [rows, hidden] per chunk
    v = [chunk[:, 2 * hidden :] for chunk in qkv]  # [rows, hidden] per chunk
    if batch.n_sequences == 1 and batch.n_tokens <= fused.attend_tokens:
        ctx = _fused_attention(q, k, v, batch, fused)  # [rows, hidden] per chunk
    else:
        ctx = attention(q, k, v, batch, heads=heads, cap=cap)  # [rows, hidden] per chunk
    del q, k, v, qkv
    return [fused.rest(layer, context, chunk) for context, chunk in zip(ctx, x, strict=True)]


def _fused_attention(q: Rows, k: Rows, v: Rows, batch: TokenBatch, fused: FusedEncoder) -> Rows:
    """One text's attention in the kernel's session, on its threads: numpy's between two of the session's
    calls scaled poorly, its second thread meeting the session's spinning one (a 256-token MiniLM text on
    2 threads: 16.2 ms of attention, 15.2 on 1; issue #15's notes, long_parts)."""
    (pieces,) = batch.pieces
    whole = slice(None)
    context = fused.attend(gather(q, pieces, whole), gather(k, pieces, whole), gather(v, pieces, whole))
    ctx = [np.zeros_like(chunk) for chunk in q]  # [rows, hidden] per chunk: padding rows stay zero
    first = 0
    for chunk, lo, hi in pieces:
        ctx[chunk][lo:hi] = context[first : first + hi - lo]
        first += hi - lo
    return ctx


def _fused_layers(x: Rows, fused: FusedEncoder, batch: TokenBatch, config: BertConfig, cap: int) -> Rows:
    """The encoder's layers held by a kernel: short texts (whole_fits) through the whole encoder, those of
    like length together as many as fit a call, each padded to the longest among them with copies of its
    first row; a longer text on its own, layer by layer (fused_layer)."""
    lengths = np.diff(batch.starts).tolist()
    short = [
        index
        for index, (pieces, length) in enumerate(zip(batch.pieces, lengths, strict=True))
        if len(pieces) == 1 and fused.whole_fits(1, length)
    ]
    for group in _whole_groups(short, lengths, fused):
        pieces = [batch.pieces[index][0] for index in group]
        longest = max(lengths[index] for index in group)
        padded = np.empty((len(group), longest, config.hidden), dtype=np.float32)  # [texts, longest, hidden]
        for rows, (chunk, lo, hi) in zip(padded, pieces, strict=True):
            rows[: hi - lo] = x[chunk][lo:hi]
            rows[hi - lo :] = x[chunk][lo]
        out = fused.whole(padded.reshape(-1, config.hidden), [lengths[index] for index in group])
        for rows, (chunk, lo, hi) in zip(out.reshape(padded.shape), pieces, strict=True):
            x[chunk][lo:hi] = rows[: hi - lo]
    for index in sorted(set(range(batch.n_sequences)) - set(short)):
        _fused_alone(x, fused, batch, index, config=config, cap=cap)
    return x


def _whole_groups(short: list[int], lengths: list[int], fused: FusedEncoder) -> list[list[int]]:
    """The texts `short`, shortest first, in groups that whole() runs together."""
    groups: list[list[int]] = []
    for index in sorted(short, key=lengths.__getitem__):
        if groups and fused.whole_fits(len(groups[-1]) + 1, lengths[index]):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _fused_alone(
    x: Rows, fused: FusedEncoder, batch: TokenBatch, index: int, *, config: BertConfig, cap: int
) -> None:
    """Text `index` of the batch through the encoder on its own, layer by layer, its pieces as its chunks:
    its attention then goes in the session too (fused_layer), where numpy's among other texts' met the
    session's spinning thread (256-token texts, 2 threads: s32/long_batch)."""
    pieces = batch.pieces[index]
    first, last = int(batch.starts[index]), int(batch.starts[index + 1])
    sizes = [hi - lo for _, lo, hi in pieces]
    bounds = np.cumsum([0, *sizes]).tolist()
    alone = TokenBatch(
        batch.ids[first:last],
        batch.positions[first:last],
        np.array([0, last - first], dtype=np.intp),
        tuple(itertools.pairwise(bounds)),
        (tuple((chunk, 0, size) for chunk, size in enumerate(sizes)),),
    )
    rows: Rows = [x[chunk][lo:hi] for chunk, lo, hi in pieces]  # [size, hidden] per piece
    for layer in range(config.layers):
        rows = fused_layer(rows, fused, layer, alone, heads=config.heads, cap=cap)
    for (chunk, lo, hi), out in zip(pieces, rows, strict=True):
        x[chunk][lo:hi] = out


def encode(
    weights: BertWeights,
    batch: TokenBatch,
    cap: int = DEFAULT_CAP,
    *,
    unit_length: bool = True,
    check_finite: bool = True,
    fused: FusedEncoder | None = None,
) -> F32:
    """Sentence vectors [n_sequences, hidden] for a batch of token sequences, unit length unless told not;
    the layers held by `fused` where given (a kernel's session), else by numpy.

    NaN or infinite values, which only corrupt weights produce, end in GGUFError, never in a vector; a
    caller that checks them itself (the engine, across sub-batches) passes check_finite=False.
    """
    config = weights.config
    # Corrupt weights overflow and divide by zero on the way; require_finite reports it once, in words.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = embeddings(weights, batch, cap)  # [padded, hidden] per chunk
        if fused is not None:
            x = _fused_layers(x, fused, batch, config, cap)  # [rows, hidden] per chunk
        else:
            for layer in range(config.layers):
                x = encoder_layer(x, weights, layer, batch, cap)  # [rows, hidden] per chunk
        pooled = pool(x, batch, config.pooling)  # [n, hidden]
        if check_finite:
            require_finite(pooled)
        return normalize(pooled) if unit_length else pooled
