"""The int8 kernel: onnxruntime's MatMulNBits on Q8_0 weights."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from gguf_sandbox.embed import int8_kernel
from gguf_sandbox.embed.int8_kernel import Q8_BLOCK, Q8_BLOCK_BYTES, Int8Matrix
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.dequant import dequantize

UNLIMITED = 1 << 40
needs_kernel = pytest.mark.skipif(
    not int8_kernel.available(), reason="the int8 kernel needs the `fast` extra (onnxruntime, onnx)"
)


def _q8_blocks(quants: np.ndarray, scales: np.ndarray) -> bytes:
    """Q8_0 bytes of int8 quants [rows, row_len] with one fp16 scale per 32 of a row [rows, row_len / 32]."""
    rows, row_len = quants.shape
    blocks = np.empty((rows, row_len // Q8_BLOCK, Q8_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., :2] = scales.astype("<f2").reshape(rows, -1, 1).view(np.uint8)
    blocks[..., 2:] = quants.astype(np.int8).reshape(rows, -1, Q8_BLOCK).view(np.uint8)
    return blocks.tobytes()


@needs_kernel
def test_quants_keep_their_sign_and_scale() -> None:
    """Every int8 value, -128 and 127 included, times its block's scale: ones multiply exactly (1.0
    quantizes to 127 at scale 1/127), so a wrong zero point or scale would show."""
    quants = np.tile(np.arange(-128, 128, dtype=np.int8), (3, 1))  # [3, 256]
    scales = np.array([[1.0] * 8, [0.5] * 8, [2.0, -1.0] * 4])  # [3, 8]
    blocks = [(0, _q8_blocks(quants[:2], scales[:2])), (2, _q8_blocks(quants[2:], scales[2:]))]
    kernel = Int8Matrix("w", 3, 256, blocks, threads=1)
    got = kernel.multiply(np.ones((2, 256), dtype=np.float32))
    expected = (quants.reshape(3, 8, 32).sum(-1) * scales).sum(-1)  # [3]
    np.testing.assert_allclose(got, np.tile(expected, (2, 1)), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 26, 300])
def test_products_are_the_dequantized_products_to_int8_rounding(rows: int) -> None:
    rng = np.random.default_rng(rows)
    weight = (rng.standard_normal((200, 384)) * 0.05).astype(np.float32)
    raw = quantize(weight, GGMLQuantizationType.Q8_0).tobytes()
    kernel = Int8Matrix("w", 200, 384, [(0, raw)], threads=2)
    x = rng.standard_normal((rows, 384)).astype(np.float32)
    reference = x @ dequantize(raw, GGMLQuantizationType.Q8_0).reshape(200, 384).T
    got = kernel.multiply(x)
    assert got.shape == (rows, 200)
    # Activations rounded to 8 bits per block of 32: ~0.5% of the largest output at worst, never more.
    assert np.abs(got - reference).max() <= 0.01 * np.abs(reference).max()
    assert np.abs(got - reference).max() > 0  # the kernel really is the int8 one, not float32's


@needs_kernel
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=str)
def test_a_row_that_is_not_finite_gives_a_nan_row(poison: float) -> None:
    """The kernel rounds a NaN activation to some int8, and its row would come out finite and wrong: the
    row is NaN instead, as a float32 product makes it, and the other rows are untouched."""
    rng = np.random.default_rng(7)
    raw = quantize((rng.standard_normal((64, 64)) * 0.05).astype(np.float32), GGMLQuantizationType.Q8_0)
    kernel = Int8Matrix("w", 64, 64, [(0, raw.tobytes())], threads=1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    clean = kernel.multiply(x)
    x[1, 17] = poison
    got = kernel.multiply(x)
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], clean[[0, 2]])


@needs_kernel
def test_a_poisoned_scale_is_refused_when_loaded() -> None:
    blocks = np.zeros((2, 34), dtype=np.uint8)
    blocks[1, :2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    with pytest.raises(GGUFError, match=r"^blk\.0\.ffn_up\.weight: a Q8_0 block scale is NaN or infinite"):
        Int8Matrix("blk.0.ffn_up.weight", 2, 32, [(0, blocks.tobytes())], threads=1)
