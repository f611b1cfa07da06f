"""Q8_0 split into quants and scales, in row order and piece by piece in column order: bit for bit
dequantize()'s rows."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from gguf_sandbox.embed.q8_rows import Q8Piece, Q8Pieces, Q8Rows
from gguf_sandbox.gguf.dequant import dequantize

ROW_LEN, ROWS = 64, 12
BOUNDS = ((0, 5), (5, 6), (6, 12))


def random_q8_0(n_blocks: int, seed: int = 3) -> np.ndarray:
    """Q8_0 bytes with every kind of fp16 scale (normal, subnormal, negative, zero) and all int8 quants."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, 34), dtype=np.uint8)
    scales = rng.standard_normal(n_blocks).astype(np.float16)
    scales[::7] = np.float16(3e-6)  # subnormal
    scales[::11] = np.float16(-0.0)
    blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def bits(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows).view(np.uint32)


def test_a_piece_decodes_to_dequantize_bit_for_bit_as_a_transposed_view() -> None:
    raw = random_q8_0(ROWS * ROW_LEN // 32)
    expected = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(ROWS, ROW_LEN)
    shifted = np.concatenate([np.zeros(3, dtype=np.uint8), raw])[3:]  # a view at an odd address
    for source in (raw, raw.tobytes(), shifted):
        piece = Q8Piece.of(source, ROW_LEN)
        assert piece.n_rows == ROWS
        got = piece.decode()
        assert got.shape == (ROWS, ROW_LEN)
        # The layout the products want: W.T contiguous.
        assert got.T.flags.c_contiguous
        np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0, 12), (0, 5), (5, 6), (6, 12), (3, 4), (4, 9), (0, 1), (11, 12)],
    ids=["all", "piece0", "piece1", "piece2", "inner", "across", "first", "last"],
)
def test_any_row_range_decodes_to_dequantize_bit_for_bit(lo: int, hi: int) -> None:
    raw = random_q8_0(ROWS * ROW_LEN // 32)
    expected = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(ROWS, ROW_LEN)
    pieces = Q8Pieces.of(raw, ROW_LEN, BOUNDS)
    assert pieces.n_rows == ROWS
    got = pieces.decode(lo, hi)
    assert got.shape == (hi - lo, ROW_LEN)
    np.testing.assert_array_equal(bits(got), bits(expected[lo:hi]))


def test_a_piece_decodes_into_the_scratch_it_is_given() -> None:
    raw = random_q8_0(ROWS * ROW_LEN // 32, seed=5)
    pieces = Q8Pieces.of(raw.tobytes(), ROW_LEN, BOUNDS)
    scratch = np.full(4096, np.nan, dtype=np.float32)
    into = pieces.decode(6, 12, scratch)
    assert np.shares_memory(into, scratch)
    np.testing.assert_array_equal(into, pieces.decode(6, 12))
    # A range that is not one piece is gathered into its own array: the scratch is not written.
    scratch[:] = np.nan
    gathered = pieces.decode(4, 9, scratch)
    assert not np.shares_memory(gathered, scratch)
    assert np.isnan(scratch).all()


def test_no_rows_is_an_empty_piece() -> None:
    pieces = Q8Pieces.of(b"", ROW_LEN, ((0, 0),))
    assert pieces.n_rows == 0
    assert pieces.decode(0, 0).shape == (0, ROW_LEN)


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, 12), (3, 4), (5, 12), (0, 1)], ids=["all", "inner", "tail", "one"]
)
def test_q8_rows_decode_bit_for_bit_like_dequantize(lo: int, hi: int) -> None:
    raw = random_q8_0(ROWS * ROW_LEN // 32)
    expected = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(ROWS, ROW_LEN)
    for source in (raw, raw.tobytes()):
        split = Q8Rows.of(source, ROW_LEN)
        assert split.n_rows == ROWS
        got = split.decode(lo, hi)
        assert got.shape == (hi - lo, ROW_LEN)
        np.testing.assert_array_equal(bits(got), bits(expected[lo:hi]))


def test_q8_rows_decode_into_scratch_gives_the_same_rows() -> None:
    rows = Q8Rows.of(random_q8_0(ROWS * ROW_LEN // 32, seed=5).tobytes(), ROW_LEN)
    scratch = np.full(4096, np.nan, dtype=np.float32)
    into = rows.decode(3, 9, scratch)
    np.testing.assert_array_equal(into, rows.decode(3, 9))
    assert np.shares_memory(into, scratch)
