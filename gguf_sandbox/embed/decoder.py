"""Decoder-family forward pass (llama, qwen2, qwen3, gemma3) in numpy, in bert.py's blocked style.

One pass per batch, no KV cache: RMSNorm, rotary positions, grouped-query attention (causal unless the
file says otherwise, sliding-window layers for gemma3), a gated feed-forward (SwiGLU or GeGLU), QK-norm
and post-norms where the architecture has them, then the final norm and pooling. Every temporary is a
chunk of rows (rows_per_chunk keeps it within the cap) or a block of attention scores within the cap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

import numpy as np

from gguf_sandbox.embed.bert import POOLERS, Pooling, normalize, pool, require_finite
from gguf_sandbox.embed.linear import Weights, linear, linears, multiply
from gguf_sandbox.embed.rows import (
    DEFAULT_CAP,
    F32,
    FLOAT_BYTES,
    Ids,
    Rows,
    TokenBatch,
    gather,
    padded_rows,
    rows_per_chunk,
)
from gguf_sandbox.embed.softmax import softmax_times_values
from gguf_sandbox.embed.threads import thread_scratch
from gguf_sandbox.errors import GGUFError

# Tokens per text a decoder pass runs by default (longer texts are cut; the plan reports the limit): past
# gemma3's 512-token window, while a full-length pass of a 7B-class model (~180 KiB per token) stays
# within reach of a few hundred MB. Attention's scores are blocked within the cap at any length.
DEFAULT_SEQUENCE_LIMIT: Final = 1024
# A plan may shorten the limit down to this when a full-length pass does not fit the budget.
SHORTEST_SEQUENCE_LIMIT: Final = 64
# FFN slabs are whole multiples of this many intermediate columns: every GGML block size divides it
# (K-quants 256, the legacy quants 32, floats 1), so a slab's columns of ffn_down are whole stored blocks.
SLAB_ALIGN: Final = 256
GELU_TANH_COEFFICIENT: Final = np.float32(0.044715)
_SQRT_2_OVER_PI: Final = np.float32(math.sqrt(2.0 / math.pi))


class RopeStyle(str, Enum):
    """How rotary dimensions are paired, as llama.cpp's rope types: adjacent pairs or the two halves."""

    NORM = "norm"  # (x0, x1), (x2, x3), ... — llama (its converter permutes q/k rows for this)
    NEOX = "neox"  # (x0, x_d/2), (x1, x_d/2+1), ... — qwen2, qwen3, gemma3


class Activation(str, Enum):
    """The gate's nonlinearity of the gated feed-forward."""

    SILU = "silu"  # SwiGLU
    GELU_TANH = "gelu-tanh"  # GeGLU, with the tanh approximation llama.cpp's ggml_gelu computes


@dataclass(frozen=True)
class DecoderConfig:
    """The shape and rules of a decoder stack, as its GGUF metadata and architecture state them."""

    architecture: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    context_length: int  # tokens per text the engine runs: the trained context, at most the default limit
    trained_context: int
    rms_eps: float
    rope: RopeStyle
    rope_dims: int
    rope_base: float
    activation: Activation
    causal: bool = True
    pooling: Pooling = Pooling.LAST
    attention_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embedding_scale: float = 1.0
    sliding_window: int = 0  # 0: every layer attends to the whole sequence
    # Every n-th layer is global, the others slide (gemma3: 6); 0 with a window: every layer slides.
    global_every: int = 0
    local_rope_base: float = 0.0  # rope base of sliding layers (gemma3: 10,000); 0: rope_base
    # Intermediate columns per feed-forward slab (see slabbed()); 0: the whole width at once.
    ffn_slab: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "rope_dims"):
            if getattr(self, name) <= 0:
                raise GGUFError(f"{self.architecture} config: {name} is {getattr(self, name)}; must be > 0")
        if self.context_length <= 0 or self.trained_context <= 0:
            raise GGUFError(f"{self.architecture} config: context length must be positive")
        if self.heads % self.kv_heads:
            raise GGUFError(
                f"{self.architecture} config: {self.heads} query heads do not share {self.kv_heads} KV heads "
                f"evenly"
            )
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise GGUFError(
                f"{self.architecture} config: rope dimension count {self.rope_dims} must be even and at most "
                f"the head size {self.head_dim}"
            )
        if self.pooling not in POOLERS:
            supported = ", ".join(p.name for p in POOLERS)
            raise GGUFError(
                f"{self.architecture} config: pooling type {self.pooling.name} asks for one vector per "
                f"token; the engine returns one vector per text (supported: {supported})"
            )
        if not 0 <= self.ffn_slab <= self.ffn:
            raise GGUFError(f"{self.architecture} config: ffn_slab {self.ffn_slab} is not 0 to {self.ffn}")
        for name in ("rms_eps", "rope_base", "embedding_scale"):
            if not 0 < getattr(self, name) < math.inf:
                raise GGUFError(f"{self.architecture} config: {name} {getattr(self, name)!r} must be > 0")

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def widest(self) -> int:
        """The widest activation row of a layer: the FFN intermediate (or its slab) or the queries."""
        return max(self.hidden, self.ffn_slab or self.ffn, self.query_width)

    @property
    def attention_row(self) -> int:
        """Floats one token row holds at the peak of self_attention."""
        h, q, kv = self.hidden, self.query_width, self.kv_width
        # x + normed + q, k, v; then x + q, k, v + ctx; then x + ctx + out
        return max(2 * h + q + 2 * kv, h + 2 * q + 2 * kv, h + q + h)

    @property
    def row_bytes(self) -> int:
        """Activation bytes one token row needs at the peak of a layer (see self_attention, feed_forward)."""
        h, f, s = self.hidden, self.ffn, self.ffn_slab
        # x + normed + out + a slab's gate and up; whole: x + normed + gate + up, then x + gate + out
        ffn = 3 * h + 2 * s if s else max(2 * h + 2 * f, h + f + h)
        return FLOAT_BYTES * max(self.attention_row, ffn)

    @property
    def column_slabs(self) -> tuple[int, int, int]:
        """ffn_down [hidden, ffn] is read a slab of intermediate columns at a time (slabbed_mlp)."""
        return (self.hidden, self.ffn, self.ffn_slab) if self.ffn_slab else (0, 0, 0)

    def slides(self, layer: int) -> bool:
        """Whether `layer` attends only within the sliding window (llama.cpp's swa pattern)."""
        if not self.sliding_window:
            return False
        return self.global_every == 0 or layer % self.global_every < self.global_every - 1

    def rope_base_of(self, layer: int) -> float:
        return self.local_rope_base if self.slides(layer) and self.local_rope_base else self.rope_base


class DecoderWeights(Weights, Protocol):
    """The weights of a decoder model, with its config (weights.PlannedWeights for every plan)."""

    @property
    def config(self) -> DecoderConfig: ...

    def row_slab(self, name: str, lo: int, hi: int) -> Iterable[tuple[int, F32]]:
        """Rows [lo, hi) of a 2-D weight [out, in] as (first_row, float32 [rows, in]) blocks."""
        ...

    def column_slab(self, name: str, lo: int, hi: int) -> Iterable[tuple[int, F32]]:
        """Columns [lo, hi) of a 2-D weight [out, in] as (first_row, float32 [rows, hi - lo]) blocks."""
        ...


def slab_width(config: DecoderConfig) -> int:
    """Intermediate columns per FFN slab: as wide as the row attention holds anyway allows, in whole
    SLAB_ALIGN columns (at least one), at most the whole width."""
    spare = (config.attention_row - 3 * config.hidden) // 2
    return min(config.ffn, max(SLAB_ALIGN, spare - spare % SLAB_ALIGN))


def slabbed(config: DecoderConfig) -> DecoderConfig:
    """The config of a pass that runs the feed-forward slab by slab (streaming plans), when that holds
    fewer bytes per token row; else `config`.

    A streamed weight is read from the file every time it is used: a pass applies each slab's weights to
    all its rows, and slabs keep the rows small enough that a whole batch fits one pass (with a 7B-class
    ffn of 18,944, a token row needs 47 KB instead of 180 KB).
    """
    candidate = dataclasses.replace(config, ffn_slab=slab_width(config))
    return candidate if candidate.row_bytes < config.row_bytes else config


def rms_norm(x: F32, weight: F32, eps: float) -> F32:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in place (any leading shape)."""
    width = np.float32(x.shape[-1])
    scale = np.einsum("...i,...i->...", x, x)  # [...]
    scale /= width
    scale += np.float32(eps)
    np.sqrt(scale, out=scale)
    np.divide(np.float32(1.0), scale, out=scale)  # [...] 1 / rms
    x *= scale[..., None]
    x *= weight
    return x


def normed(x: Rows, weight: F32, eps: float) -> Rows:
    """RMS-normalized copies of every chunk (the residual stream x stays as it is)."""
    return [rms_norm(chunk.copy(), weight, eps) for chunk in x]  # [rows, hidden] per chunk


def rope_angles(positions: Ids, dims: int, base: float) -> tuple[F32, F32]:
    """cos and sin [rows, dims/2] of position * base^(-2i/dims), computed in float64."""
    inverse = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)  # [dims/2]
    angles = positions.astype(np.float64)[:, None] * inverse  # [rows, dims/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x: F32, heads: int, config: DecoderConfig, cos: F32, sin: F32) -> None:
    """Rotary positions applied in place to x [rows, heads * head_dim] (the first rope_dims of each head)."""
    rows = x.shape[0]
    view = x.reshape(rows, heads, config.head_dim)[:, :, : config.rope_dims]  # [rows, heads, rope_dims]
    half = config.rope_dims // 2
    if config.rope is RopeStyle.NEOX:
        first, second = view[..., :half], view[..., half:]  # [rows, heads, half] each
    else:
        first, second = view[..., 0::2], view[..., 1::2]  # [rows, heads, half] each
    c, s = cos[:, None, :], sin[:, None, :]  # [rows, 1, half]
    rotated_first = first * c - second * s  # [rows, heads, half]
    second *= c
    second += first * s
    first[...] = rotated_first


def _mask(query_positions: Ids, key_positions: Ids, *, causal: bool, window: int) -> F32 | None:
    """Additive mask [n, k]: 0 where a query may attend a key, -inf where not; None when nothing is masked."""
    distance = query_positions[:, None] - key_positions[None, :]  # [n, k]
    allowed = np.ones(distance.shape, dtype=bool)
    if causal:
        allowed &= distance >= 0
    if window:
        allowed &= np.abs(distance) < window
    if allowed.all():
        return None
    mask: F32 = np.where(allowed, np.float32(0.0), np.float32(-np.inf)).astype(np.float32, copy=False)
    return mask


def grouped_attention(
    q: Rows, k: Rows, v: Rows, batch: TokenBatch, *, config: DecoderConfig, layer: int, cap: int
) -> Rows:
    """softmax(q k^T * scale + mask) v per sequence, query heads sharing their KV head, scores in blocks.

    Keys outside a query block's reach (after it when causal, beyond the window) are not multiplied at all.
    """
    d, group = config.head_dim, config.heads // config.kv_heads
    scale = np.float32(1.0 / math.sqrt(d))
    window = config.sliding_window if config.slides(layer) else 0
    ctx = [np.zeros_like(chunk) for chunk in q]  # [padded, heads * d] per chunk
    for pieces in batch.pieces:
        length = sum(hi - lo for _, lo, hi in pieces)
        # Scores, the int64 distances of their mask and the scaled queries of one query block within the
        # cap. The 1/sqrt(d) goes on the queries: span/d times fewer multiplies than on the scores.
        query_rows = max(1, min(length, cap // (FLOAT_BYTES * group * (2 * length + d))))
        buffer = np.empty(group * query_rows * length, dtype=np.float32)  # scores of one block, reused
        scaled = np.empty(query_rows * group * d, dtype=np.float32)  # its queries times 1/sqrt(d), reused
        for kv in range(config.kv_heads):
            kv_columns = slice(kv * d, (kv + 1) * d)
            q_columns = slice(kv * group * d, (kv + 1) * group * d)
            keys = gather(k, pieces, kv_columns)  # [L, d]
            values = gather(v, pieces, kv_columns)  # [L, d]
            start = 0  # position of the piece's first row in its sequence
            for chunk, lo, hi in pieces:
                for r0 in range(lo, hi, query_rows):
                    n = min(query_rows, hi - r0)
                    first = start + r0 - lo  # position of the block's first query
                    key_end = first + n if config.causal else length
                    if window:
                        key_end = min(key_end, first + n - 1 + window)
                    key_start = max(0, first - window + 1) if window else 0
                    span = key_end - key_start
                    block = scaled[: n * group * d].reshape(n, group * d)  # [n, g * d]
                    np.multiply(q[chunk][r0 : r0 + n, q_columns], scale, out=block)
                    queries = block.reshape(n, group, d).transpose(1, 0, 2)  # [g, n, d]
                    scores = buffer[: group * n * span].reshape(group, n, span)  # [g, n, span]
                    np.matmul(queries, keys[key_start:key_end].T, out=scores)
                    mask = _mask(
                        np.arange(first, first + n),
                        np.arange(key_start, key_end),
                        causal=config.causal,
                        window=window,
                    )
                    out = ctx[chunk][r0 : r0 + n, q_columns].reshape(n, group, d).transpose(1, 0, 2)
                    softmax_times_values(scores, values[key_start:key_end], out, mask)  # [g, n, d]
                start += hi - lo
            del keys, values  # a gathered K and V go before the next KV head's are made
    return ctx


def _head_norm(x: Rows, weight: F32, heads: int, config: DecoderConfig) -> None:
    """QK-norm: RMSNorm over each head's dimensions, in place."""
    for chunk in x:
        rms_norm(chunk.reshape(chunk.shape[0], heads, config.head_dim), weight, config.rms_eps)


def self_attention(x: Rows, weights: DecoderWeights, layer: int, batch: TokenBatch, cap: int) -> Rows:
    """Pre-norm attention with rotary positions; post-norm (gemma3) and the residual added."""
    config = weights.config
    prefix = f"blk.{layer}"
    h = normed(x, weights.vector(f"{prefix}.attn_norm.weight"), config.rms_eps)  # [rows, hidden] per chunk
    q = [np.empty((chunk.shape[0], config.query_width), dtype=np.float32) for chunk in h]  # [rows, heads*d]
    k = [np.empty((chunk.shape[0], config.kv_width), dtype=np.float32) for chunk in h]  # [rows, kv*d]
    v = [np.empty((chunk.shape[0], config.kv_width), dtype=np.float32) for chunk in h]  # [rows, kv*d]
    outputs = [(f"{prefix}.attn_q", q), (f"{prefix}.attn_k", k), (f"{prefix}.attn_v", v)]
    linears(h, weights, outputs, bias=config.attention_bias)
    del h
    if config.qk_norm:
        _head_norm(q, weights.vector(f"{prefix}.attn_q_norm.weight"), config.heads, config)
        _head_norm(k, weights.vector(f"{prefix}.attn_k_norm.weight"), config.kv_heads, config)
    base = config.rope_base_of(layer)
    for qc, kc, (first, last) in zip(q, k, batch.chunks, strict=True):
        positions = np.zeros(qc.shape[0], dtype=np.intp)  # padding rows rotate by 0
        positions[: last - first] = batch.positions[first:last]
        cos, sin = rope_angles(positions, config.rope_dims, base)  # [rows, rope_dims/2]
        rotate(qc, config.heads, config, cos, sin)
        rotate(kc, config.kv_heads, config, cos, sin)
    ctx = grouped_attention(q, k, v, batch, config=config, layer=layer, cap=cap)  # [rows, heads*d] per chunk
    del q, k, v
    out = linear(ctx, weights, f"{prefix}.attn_output", config.hidden, bias=False)  # [rows, hidden]
    del ctx
    return _residual(out, x, weights, f"{prefix}.post_attention_norm.weight")


def _residual(out: Rows, x: Rows, weights: DecoderWeights, post_norm: str) -> Rows:
    """out (post-normed when the architecture has post-norms) plus the residual stream x."""
    config = weights.config
    weight = weights.vector(post_norm) if config.post_norms else None
    for y, residual in zip(out, x, strict=True):
        if weight is not None:
            rms_norm(y, weight, config.rms_eps)
        np.add(y, residual, out=y)  # [rows, hidden]
    return out


def activate(gate: F32, up: F32, activation: Activation) -> F32:
    """gate = act(gate) * up, in place: SiLU (SwiGLU) or tanh-approximated GELU (GeGLU)."""
    if activation is Activation.SILU:
        scratch = np.negative(gate)  # [rows, ffn]
        np.exp(scratch, out=scratch)
        scratch += np.float32(1.0)
        gate /= scratch  # x * sigmoid(x)
    else:
        scratch = np.multiply(gate, gate)  # [rows, ffn]
        scratch *= GELU_TANH_COEFFICIENT
        scratch += np.float32(1.0)
        scratch *= gate
        scratch *= _SQRT_2_OVER_PI
        np.tanh(scratch, out=scratch)
        scratch += np.float32(1.0)
        scratch *= np.float32(0.5)
        gate *= scratch  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    gate *= up
    return gate


def gated_mlp(h: Rows, weights: DecoderWeights, prefix: str) -> Rows:
    """act(h Wg^T) * (h Wu^T) Wd^T over the whole intermediate width at once."""
    config = weights.config
    gate = linear(h, weights, f"{prefix}.ffn_gate", config.ffn, bias=False)  # [rows, ffn] per chunk
    up = linear(h, weights, f"{prefix}.ffn_up", config.ffn, bias=False)  # [rows, ffn] per chunk
    for g, u in zip(gate, up, strict=True):
        activate(g, u, config.activation)  # [rows, ffn]
    del up
    return linear(gate, weights, f"{prefix}.ffn_down", config.hidden, bias=False)  # [rows, hidden]


def _slab_product(h: Rows, blocks: Iterable[tuple[int, F32]], lo: int, width: int) -> Rows:
    """h @ W[lo:lo + width].T per chunk, W's rows coming as (first_row, [rows, in]) blocks."""
    ys = [np.empty((x.shape[0], width), dtype=np.float32) for x in h]  # [rows, width] per chunk
    for first, block in blocks:  # block [block_rows, in]
        columns = slice(first - lo, first - lo + block.shape[0])
        for x, y in zip(h, ys, strict=True):
            multiply(x, block, y[:, columns], thread_scratch())  # [rows, block_rows]
    return ys


def slabbed_mlp(h: Rows, weights: DecoderWeights, prefix: str) -> Rows:
    """gated_mlp one slab of ffn_slab intermediate columns at a time, accumulated into the output.

    Each slab's gate and up rows and down columns are read once and applied to every chunk before the next
    slab: a streamed pass reads each weight once, and no row holds more than a slab of the intermediate.
    """
    config = weights.config
    out = [np.zeros((x.shape[0], config.hidden), dtype=np.float32) for x in h]  # [rows, hidden] per chunk
    for lo in range(0, config.ffn, config.ffn_slab):
        hi = min(lo + config.ffn_slab, config.ffn)
        gate = _slab_product(h, weights.row_slab(f"{prefix}.ffn_gate.weight", lo, hi), lo, hi - lo)
        up = _slab_product(h, weights.row_slab(f"{prefix}.ffn_up.weight", lo, hi), lo, hi - lo)
        for g, u in zip(gate, up, strict=True):
            activate(g, u, config.activation)  # [rows, slab]
        for first, block in weights.column_slab(f"{prefix}.ffn_down.weight", lo, hi):  # [block_rows, slab]
            # up's spent buffers hold each product before it is added: pieces of at most `slab` rows.
            for start in range(0, block.shape[0], hi - lo):
                piece = block[start : start + hi - lo]  # [n, slab]
                columns = slice(first + start, first + start + piece.shape[0])
                for g, u, y in zip(gate, up, out, strict=True):
                    rows = g.shape[0]
                    product = u.reshape(-1)[: rows * piece.shape[0]].reshape(rows, -1)  # [rows, n]
                    np.add(y[:, columns], np.matmul(g, piece.T, out=product), out=y[:, columns])
        del gate, up
    return out


def feed_forward(x: Rows, weights: DecoderWeights, layer: int) -> Rows:
    """Pre-norm gated MLP (whole, or slab by slab when the config says so); post-norm (gemma3) and the
    residual added."""
    config = weights.config
    prefix = f"blk.{layer}"
    h = normed(x, weights.vector(f"{prefix}.ffn_norm.weight"), config.rms_eps)  # [rows, hidden] per chunk
    mlp = slabbed_mlp if config.ffn_slab else gated_mlp
    out = mlp(h, weights, prefix)  # [rows, hidden] per chunk
    del h
    return _residual(out, x, weights, f"{prefix}.post_ffw_norm.weight")


def token_embeddings(weights: DecoderWeights, batch: TokenBatch, cap: int = DEFAULT_CAP) -> Rows:
    """Token rows (times gemma3's sqrt(hidden)) per chunk, zero rows padding each to padded_rows()."""
    config = weights.config
    limit = rows_per_chunk(config, cap)
    xs: Rows = []
    for first, last in batch.chunks:
        x = np.zeros((padded_rows(last - first, limit), config.hidden), dtype=np.float32)  # [padded, hidden]
        x[: last - first] = weights.rows("token_embd.weight", batch.ids[first:last])
        if config.embedding_scale != 1.0:
            x *= np.float32(config.embedding_scale)
        xs.append(x)
    return xs


def encode(
    weights: DecoderWeights,
    batch: TokenBatch,
    cap: int = DEFAULT_CAP,
    *,
    unit_length: bool = True,
    check_finite: bool = True,
) -> F32:
    """Sentence vectors [n_sequences, hidden]: the stack, the final norm, then the configured pooling
    (non-finite values refused as bert.encode does, unless check_finite is False)."""
    config = weights.config
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = token_embeddings(weights, batch, cap)  # [padded, hidden] per chunk
        for layer in range(config.layers):
            # One statement each, so no layer's input outlives the sublayer that consumes it.
            x = self_attention(x, weights, layer, batch, cap)
            x = feed_forward(x, weights, layer)
        final = weights.vector("output_norm.weight")  # [hidden]
        for chunk in x:
            rms_norm(chunk, final, config.rms_eps)
        pooled = pool(x, batch, config.pooling)  # [n, hidden]
        if check_finite:
            require_finite(pooled)
        return normalize(pooled) if unit_length else pooled
