"""Attention's weighted sum: softmax over a block of scores, times the values, for BERT and the decoders."""

from __future__ import annotations

import numpy as np

from gguf_sandbox.embed.rows import F32


def softmax_times_values(scores: F32, values: F32, out: F32, mask: F32 | None = None) -> F32:
    """out = softmax(scores + mask, last axis) @ values; scores [g, n, k] are overwritten.

    With more keys than head dimensions, the rows are normalized after the product, on out's d columns
    rather than the scores' k: at 256 tokens and 32-wide heads, 8x fewer divisions. Each row's maximum is
    subtracted first, so exp() stays within (0, 1] and a row's sum within [1, k]. The product before the
    division is at most k max|v|: it overflows only for values beyond float32's max / k (~6.6e35 at 512
    keys), which no trained model's activations approach; a corrupt model's overflow reaches out as
    infinities, which the engine refuses in words like any non-finite pass.
    """
    if mask is not None:
        scores += mask  # [g, n, k]
    scores -= np.maximum.reduce(scores, axis=2, keepdims=True)  # [g, n, k]
    np.exp(scores, out=scores)  # [g, n, k]
    sums = np.add.reduce(scores, axis=2, keepdims=True)  # [g, n, 1]
    if scores.shape[2] <= out.shape[2]:  # no more keys than head dimensions: normalize the scores
        scores /= sums  # [g, n, k]
        return np.matmul(scores, values, out=out)  # [g, n, d]
    np.matmul(scores, values, out=out)  # [g, n, d]
    out /= sums  # [g, n, d]
    return out
