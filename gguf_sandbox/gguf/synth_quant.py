"""Random weights in GGML storage types, drawn straight as blocks: finite, centred, of a chosen spread.

No quantizer is run (gguf-py has none for K-quants, and quantizing gigabytes would take minutes): the quant
bytes are random and each block's fp16 scales are set so that the decoded values have about `std`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_sandbox.errors import GGUFError

PIECE_BYTES = 1 << 20
# Standard deviation of a uniform random quant after the type's offset: 8-bit two's complement, 4-bit q-8,
# K-quant 4-bit (0..15), 5-bit (0..31) and 6-bit (0..63) codes.
_Q8_STD = float(np.sqrt((256**2 - 1) / 12))
_Q4_STD = float(np.sqrt((16**2 - 1) / 12))
_Q5_STD = float(np.sqrt((32**2 - 1) / 12))
_Q6_STD = float(np.sqrt((64**2 - 1) / 12))
# The one sub-block scale (and min) every Q4_K/Q5_K/Q6_K sub-block gets: below 16, so the 12-byte packed
# field of Q4_K/Q5_K is the same simple pattern in every block.
_SUB_SCALE = 8


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _block_scales(rng: np.random.Generator, n_blocks: int, unit: float) -> np.ndarray:
    """Per-block scales near `unit` (±20 %), so blocks differ the way real ones do."""
    return (unit * rng.uniform(0.8, 1.2, n_blocks)).astype(np.float32)


def _q8_0(blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    # d, qs[32] (int8): x = d·q
    blocks[:, 0:2] = _f16_bytes(_block_scales(rng, len(blocks), std / _Q8_STD))


def _q4_0(blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    # d, qs[16] (nibbles): x = d·(q − 8)
    blocks[:, 0:2] = _f16_bytes(_block_scales(rng, len(blocks), std / _Q4_STD))


def _k_scales_mins(blocks: np.ndarray, rng: np.random.Generator, std: float, quant_std: float) -> None:
    # d, dmin, scales[12]: x = d·sc·q − dmin·m with sc = m = _SUB_SCALE, and dmin = d·(levels−1)/2 centres q.
    levels_half = float(np.sqrt(12 * quant_std**2 + 1) - 1) / 2
    d = _block_scales(rng, len(blocks), std / (_SUB_SCALE * quant_std))
    blocks[:, 0:2] = _f16_bytes(d)
    blocks[:, 2:4] = _f16_bytes(d * levels_half)
    blocks[:, 4:12] = _SUB_SCALE  # scales 0-3 and mins 0-3 (high bits, which scales 4-7 borrow, are 0)
    blocks[:, 12:16] = _SUB_SCALE | (_SUB_SCALE << 4)  # low nibbles of scales 4-7, high nibbles of mins 4-7


def _q4_k(blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    _k_scales_mins(blocks, rng, std, _Q4_STD)


def _q5_k(blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    _k_scales_mins(blocks, rng, std, _Q5_STD)


def _q6_k(blocks: np.ndarray, rng: np.random.Generator, std: float) -> None:
    # ql[128], qh[64], scales[16] (int8), d: x = d·sc·(q − 32)
    blocks[:, 192:208] = _SUB_SCALE
    blocks[:, 208:210] = _f16_bytes(_block_scales(rng, len(blocks), std / (_SUB_SCALE * _Q6_STD)))


_SCALES: Mapping[GGMLQuantizationType, Callable[[np.ndarray, np.random.Generator, float], None]] = (
    MappingProxyType(
        {
            GGMLQuantizationType.Q8_0: _q8_0,
            GGMLQuantizationType.Q4_0: _q4_0,
            GGMLQuantizationType.Q4_K: _q4_k,
            GGMLQuantizationType.Q5_K: _q5_k,
            GGMLQuantizationType.Q6_K: _q6_k,
        }
    )
)
_FLOATS: Mapping[GGMLQuantizationType, type[np.floating]] = MappingProxyType(
    {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
)
RANDOM_TYPES: frozenset[GGMLQuantizationType] = frozenset(_SCALES) | frozenset(_FLOATS)


def random_pieces(
    qtype: GGMLQuantizationType, n_elements: int, std: float, seed: tuple[int, ...]
) -> Iterator[np.ndarray]:
    """`n_elements` random values stored as `qtype`, in pieces of at most PIECE_BYTES.

    Each piece has its own generator (seed + piece number): the bytes do not depend on anything but the
    arguments, and no piece needs the one before it.
    """
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype not in RANDOM_TYPES:
        names = ", ".join(sorted(t.name for t in RANDOM_TYPES))
        raise GGUFError(f"cannot draw random {qtype.name} weights; choose one of {names}")
    if n_elements % block_elements:
        raise GGUFError(f"{n_elements:,} values are not whole {qtype.name} blocks of {block_elements}")
    n_blocks = n_elements // block_elements
    per_piece = max(1, PIECE_BYTES // block_bytes)
    for number, first in enumerate(range(0, n_blocks, per_piece)):
        count = min(per_piece, n_blocks - first)
        rng = np.random.default_rng([*seed, number])
        dtype = _FLOATS.get(qtype)
        if dtype is not None:
            values = rng.standard_normal(count * block_elements, dtype=np.float32)
            values *= std
            yield values.astype(dtype, copy=False)
            continue
        blocks = np.frombuffer(bytearray(rng.bytes(count * block_bytes)), dtype=np.uint8)
        blocks = blocks.reshape(count, block_bytes)
        _SCALES[qtype](blocks, rng, std)
        yield blocks
