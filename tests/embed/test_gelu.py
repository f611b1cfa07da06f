"""Tests for gelu.py: the 5-term erf GELU against math.erf's, in place, on strided column blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gguf_sandbox.embed.gelu import GELU_STEP, gelu
from tests.embed.conftest import traced_peak


def erf_gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    x64 = x.astype(np.float64)
    return np.asarray(0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0))))


def test_max_error_against_the_erf_gelu_is_below_4e7() -> None:
    xs = np.linspace(-20.0, 20.0, 800_001, dtype=np.float32)
    assert np.abs(gelu(xs.copy()) - erf_gelu(xs)).max() <= 4e-7


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38])
def test_extremes_are_exact(value: float) -> None:
    x = np.array([value], dtype=np.float32)
    assert gelu(x.copy())[0] == np.float32(erf_gelu(x)[0])


def test_a_strided_column_block_is_done_in_place_and_nothing_else_is_touched() -> None:
    rng = np.random.default_rng(1)
    y = (rng.standard_normal((13, GELU_STEP // 5)) * 4).astype(np.float32)
    before = y.copy()
    block = y[:, 16:1000]
    assert gelu(block) is block
    assert np.abs(y[:, 16:1000] - erf_gelu(before[:, 16:1000])).max() <= 4e-7
    np.testing.assert_array_equal(y[:, :16], before[:, :16])
    np.testing.assert_array_equal(y[:, 1000:], before[:, 1000:])


def test_temporaries_live_in_the_thread_scratch() -> None:
    """After the thread's scratch exists, GELU of a 256-token FFN activation allocates ~nothing: no
    per-call temporaries for the thread's malloc arena to keep."""
    x = np.random.default_rng(2).standard_normal((256, 1536)).astype(np.float32)
    gelu(x[:1].copy())  # the scratch, once per thread
    assert traced_peak(lambda: gelu(x)) < 16 << 10


def test_a_row_wider_than_a_slice_gets_its_own_temporaries() -> None:
    x = np.linspace(-8.0, 8.0, 2 * (GELU_STEP + 5), dtype=np.float32).reshape(2, -1)
    expected = erf_gelu(x)
    assert np.abs(gelu(x) - expected).max() <= 4e-7
