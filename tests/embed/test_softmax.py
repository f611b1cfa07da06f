"""softmax(scores + mask) @ values against float64 written out here, on both sides of where rows are
normalized (more keys than head dimensions, or not)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from gguf_sandbox.embed.softmax import softmax_times_values

F64 = NDArray[np.float64]


def naive(scores: F64, values: F64, mask: F64 | None) -> F64:
    s = scores + (mask if mask is not None else 0.0)
    weights = np.exp(s - s.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    out: F64 = weights @ values
    return out


def causal(n: int, k: int) -> F64:
    """-inf above the diagonal of the last n queries over k keys (every row keeps at least one key)."""
    mask: F64 = np.where(np.arange(k)[None, :] <= np.arange(k - n, k)[:, None], 0.0, -np.inf)
    return mask


@pytest.mark.parametrize("keys", [8, 32, 200], ids=["fewer-keys", "equal", "more-keys"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "causal"])
@pytest.mark.parametrize("spread", [1.0, 60.0], ids=["small-scores", "scores-up-to-hundreds"])
def test_matches_float64(keys: int, masked: bool, spread: float) -> None:
    rng = np.random.default_rng(keys)
    heads, queries, d = 3, min(keys, 17), 32
    scores = (rng.standard_normal((heads, queries, keys)) * spread).astype(np.float32)
    values = rng.standard_normal((heads, keys, d)).astype(np.float32)
    mask = causal(queries, keys) if masked else None
    # out as attention passes it: a strided view of the context rows
    out = np.empty((queries, heads * d), dtype=np.float32).reshape(queries, heads, d).transpose(1, 0, 2)
    want = naive(scores.astype(np.float64), values.astype(np.float64), mask)
    got = softmax_times_values(scores, values, out, None if mask is None else mask.astype(np.float32))
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keys", [8, 200])
def test_a_nan_score_stays_in_its_row(keys: int) -> None:
    """A NaN reaches the output of its own query row only, where the engine's finite check refuses it."""
    scores = np.zeros((2, 4, keys), dtype=np.float32)
    scores[1, 2, 3] = np.nan
    values = np.ones((2, keys, 32), dtype=np.float32)
    out = np.empty((2, 4, 32), dtype=np.float32)
    softmax_times_values(scores, values, out)
    assert np.isnan(out[1, 2]).all()
    out[1, 2] = 1.0
    np.testing.assert_array_equal(out, 1.0)


def test_values_within_float32_max_over_k_stay_finite_and_beyond_it_overflow_loudly() -> None:
    """Late normalization sums k weighted values before dividing: exact up to float32's max / k, infinite
    (never a finite wrong number) past it."""
    keys = 200
    scores = np.zeros((1, 2, keys), dtype=np.float32)
    out = np.empty((1, 2, 32), dtype=np.float32)
    near = np.float32(np.finfo(np.float32).max / keys / 2)
    softmax_times_values(scores.copy(), np.full((1, keys, 32), near, dtype=np.float32), out)
    np.testing.assert_allclose(out, near, rtol=1e-6)
    with np.errstate(over="ignore"):
        softmax_times_values(scores.copy(), np.full((1, keys, 32), 1e37, dtype=np.float32), out)
    assert np.isinf(out).all()
