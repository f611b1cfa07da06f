"""Tests for gguf_sandbox.gguf.dequant: equality with gguf-py, errors, and the memory rule."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from numpy.typing import NDArray

from gguf_sandbox.errors import GGUFError, UnsupportedTensorType
from gguf_sandbox.gguf.dequant import SUPPORTED_TYPES, block_geometry, dequantize

Q = GGMLQuantizationType
EXPECTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
TYPES = sorted(EXPECTED_TYPES, key=lambda t: t.name)
TYPE_IDS = [t.name for t in TYPES]

# Byte offsets of the fp16 scale fields in one block of each quantized type.
F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

CHUNK_ELEMENTS = 1 << 18  # the reader's largest chunk: 1 MiB of float32 output
MIB = 1 << 20


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> NDArray[np.uint8]:
    """Random raw bytes of n_blocks blocks, with finite fp16 scales (random bits elsewhere)."""
    rng = np.random.default_rng(seed)
    _, nbytes = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal(n_blocks, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8)
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, ()):
        scales = rng.standard_normal(n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def reference(raw: NDArray[np.uint8], qtype: GGMLQuantizationType) -> NDArray[np.float32]:
    with np.errstate(all="ignore"):
        return np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32).reshape(-1)


def assert_same(ours: NDArray[np.float32], theirs: NDArray[np.float32]) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours[~finite], theirs[~finite])


def blocks_per_step(qtype: GGMLQuantizationType) -> int:
    return CHUNK_ELEMENTS // GGML_QUANT_SIZES[qtype][0]


def test_supported_types_are_the_documented_ones() -> None:
    assert SUPPORTED_TYPES == EXPECTED_TYPES


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_blocks", [1, 3, 1000], ids=lambda n: f"{n}blocks")
def test_matches_gguf_py_on_random_blocks(qtype: GGMLQuantizationType, n_blocks: int) -> None:
    raw = random_blocks(qtype, n_blocks, seed=n_blocks)
    assert_same(dequantize(raw, qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
def test_matches_gguf_py_across_internal_steps(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, blocks_per_step(qtype) + 5, seed=7)
    assert_same(dequantize(raw, qtype), reference(raw, qtype))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_blocks", [7, 2500], ids=lambda n: f"{n}blocks")
def test_matches_gguf_py_on_arbitrary_bytes(qtype: GGMLQuantizationType, n_blocks: int) -> None:
    # Every bit pattern, scales included: inf and nan must propagate exactly as in gguf-py, both on
    # small inputs and on inputs long enough for the bit-twiddling fp16 path, and without a numpy warning
    # (a hostile file's error is one line, from whoever refuses the values).
    _, nbytes = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(n_blocks).integers(0, 256, n_blocks * nbytes, dtype=np.uint8)
    ours = dequantize(raw, qtype)
    assert_same(ours, reference(raw, qtype))


QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=[t.name for t in QUANTIZABLE])
def test_matches_gguf_py_on_quantized_weights(qtype: GGMLQuantizationType) -> None:
    weights = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32) * 0.05
    raw = np.asarray(gguf_quantize(weights, qtype)).view(np.uint8).reshape(-1)
    ours = dequantize(raw, qtype)
    assert_same(ours, reference(raw, qtype))
    np.testing.assert_allclose(ours, weights.reshape(-1), atol=0.05 / 2)


def test_f16_is_bit_exact_for_every_pattern() -> None:
    patterns = np.arange(1 << 16, dtype=np.uint16)
    ours = dequantize(patterns.view(np.uint8), Q.F16)
    expected = patterns.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
def test_accepts_bytes_and_unaligned_memory(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, 40, seed=5)
    expected = reference(raw, qtype)
    shifted = np.empty(raw.size + 1, dtype=np.uint8)[1:]
    shifted[:] = raw
    assert_same(dequantize(shifted, qtype), expected)
    assert_same(dequantize(raw.tobytes(), qtype), expected)
    assert_same(dequantize(memoryview(raw.tobytes()), qtype), expected)


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
def test_writes_into_out_and_never_aliases_raw(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, 20, seed=9)
    elements, _ = block_geometry(qtype)
    out = np.full(20 * elements, np.nan, dtype=np.float32)
    result = dequantize(raw, qtype, out=out)
    assert result is out
    assert_same(out, reference(raw, qtype))
    assert not np.shares_memory(dequantize(raw, qtype), raw)


def test_empty_input_gives_empty_output() -> None:
    result = dequantize(np.empty(0, dtype=np.uint8), Q.Q4_K)
    assert result.dtype == np.float32
    assert result.shape == (0,)


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0, Q.Q8_K, Q.I32], ids=lambda t: t.name)
def test_unsupported_type_names_type_tensor_and_hint(qtype: GGMLQuantizationType) -> None:
    _, nbytes = GGML_QUANT_SIZES[qtype]
    with pytest.raises(UnsupportedTensorType) as caught:
        dequantize(np.zeros(nbytes, dtype=np.uint8), qtype, what="blk.0.ffn_up.weight")
    message = str(caught.value)
    assert qtype.name in message
    assert "blk.0.ffn_up.weight" in message
    assert "hint" in message


def test_unknown_type_id_is_unsupported() -> None:
    with pytest.raises(UnsupportedTensorType, match="999"):
        dequantize(np.zeros(4, dtype=np.uint8), 999)


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
def test_partial_block_is_a_format_error(qtype: GGMLQuantizationType) -> None:
    _, nbytes = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(3 * nbytes + 1, dtype=np.uint8)
    with pytest.raises(GGUFError, match=f"{qtype.name}.*{raw.size}") as caught:
        dequantize(raw, qtype, what="token_embd.weight")
    assert not isinstance(caught.value, UnsupportedTensorType)
    assert "token_embd.weight" in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [np.zeros((2, 34), dtype=np.uint8), np.zeros(34, dtype=np.int8), np.zeros(17, dtype=np.uint16)],
    ids=["2d", "int8", "uint16"],
)
def test_raw_must_be_flat_uint8(raw: NDArray[np.generic]) -> None:
    with pytest.raises(GGUFError, match="1-D uint8"):
        dequantize(raw, Q.Q8_0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "out",
    [
        np.empty(31, dtype=np.float32),
        np.empty(32, dtype=np.float64),
        np.empty(64, dtype=np.float32)[::2],
    ],
    ids=["short", "float64", "strided"],
)
def test_bad_out_is_rejected(out: NDArray[np.generic]) -> None:
    with pytest.raises(GGUFError, match="out must be"):
        dequantize(np.zeros(34, dtype=np.uint8), Q.Q8_0, out=out)  # type: ignore[arg-type]


def test_read_only_out_is_rejected() -> None:
    out = np.empty(32, dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(GGUFError, match="read-only"):
        dequantize(np.zeros(34, dtype=np.uint8), Q.Q8_0, out=out)


@pytest.mark.parametrize("qtype", list(GGML_QUANT_SIZES), ids=lambda t: t.name)
def test_block_geometry_covers_every_known_type(qtype: GGMLQuantizationType) -> None:
    assert block_geometry(qtype) == tuple(GGML_QUANT_SIZES[qtype])
    assert block_geometry(int(qtype)) == tuple(GGML_QUANT_SIZES[qtype])


def test_block_geometry_of_unknown_id_is_unsupported() -> None:
    with pytest.raises(UnsupportedTensorType, match="999"):
        block_geometry(999)


def traced_peak(run: Callable[[], object]) -> int:
    """Peak traced bytes (numpy buffers included) while calling run()."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


SLACK = 16 << 10  # Python objects: views, dtypes, small per-call bookkeeping


@pytest.mark.parametrize("qtype", TYPES, ids=TYPE_IDS)
def test_chunk_temporaries_stay_within_one_mib(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, blocks_per_step(qtype))
    dequantize(raw, qtype)  # warm caches (type objects, lazily built tables)
    output_bytes = CHUNK_ELEMENTS * 4
    peak = traced_peak(lambda: dequantize(raw, qtype))
    assert peak - output_bytes <= MIB + SLACK, f"{qtype.name}: temporaries peaked at {peak - output_bytes:,}"
    out = np.empty(CHUNK_ELEMENTS, dtype=np.float32)
    peak_into_out = traced_peak(lambda: dequantize(raw, qtype, out=out))
    assert peak_into_out <= MIB + SLACK, f"{qtype.name}: peak {peak_into_out:,} with out="


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_large_inputs_are_processed_in_bounded_steps(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, 4 * blocks_per_step(qtype))
    out = np.empty(4 * CHUNK_ELEMENTS, dtype=np.float32)
    peak = traced_peak(lambda: dequantize(raw, qtype, out=out))
    assert peak <= MIB + SLACK, f"{qtype.name}: peak {peak:,} for a 4 MiB output"
