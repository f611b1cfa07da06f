"""Random weights drawn as GGML blocks: decoded finite, centred, of the asked spread, in ≤ 1 MiB pieces."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.synth_quant import PIECE_BYTES, RANDOM_TYPES, random_pieces


def decoded(qtype: T, n: int, std: float, seed: tuple[int, ...] = (0,)) -> np.ndarray:
    pieces = list(random_pieces(qtype, n, std, seed))
    assert all(piece.nbytes <= PIECE_BYTES for piece in pieces)
    return dequantize(np.concatenate([p.reshape(-1).view(np.uint8) for p in pieces]), qtype)


def type_name(qtype: T) -> str:
    return qtype.name


@pytest.mark.parametrize("qtype", sorted(RANDOM_TYPES, key=str), ids=type_name)
def test_decoded_values_have_the_asked_spread(qtype: T) -> None:
    values = decoded(qtype, 256 * 6000, 0.02)
    assert np.isfinite(values).all()
    assert abs(float(values.std()) - 0.02) < 0.002
    assert abs(float(values.mean())) < 0.003
    assert float(np.abs(values).max()) < 0.2


def test_pieces_depend_only_on_the_seed() -> None:
    a = decoded(T.Q4_K, 256 * 5000, 0.02, (1, 2))
    assert np.array_equal(a, decoded(T.Q4_K, 256 * 5000, 0.02, (1, 2)))
    assert not np.array_equal(a, decoded(T.Q4_K, 256 * 5000, 0.02, (1, 3)))


def test_unsupported_types_and_partial_blocks_are_refused() -> None:
    with pytest.raises(GGUFError, match="cannot draw random IQ2_XXS"):
        next(random_pieces(T.IQ2_XXS, 256, 0.02, (0,)))
    with pytest.raises(GGUFError, match="not whole Q4_K blocks of 256"):
        next(random_pieces(T.Q4_K, 100, 0.02, (0,)))
