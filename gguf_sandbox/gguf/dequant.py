"""Dequantization of GGML tensor data to float32, one table-driven kernel per type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final, TypeAlias

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from numpy.typing import NDArray

from gguf_sandbox.errors import GGUFError, UnsupportedTensorType

__all__ = ["SUPPORTED_TYPES", "block_geometry", "dequantize"]

U8: TypeAlias = NDArray[np.uint8]
F32: TypeAlias = NDArray[np.float32]
RawBytes: TypeAlias = "NDArray[np.uint8] | bytes | bytearray | memoryview"

# A kernel reads whole blocks (uint8, shape (n_blocks, bytes_per_block), C-contiguous) and writes every
# element of `out` (flat float32, n_blocks * elements_per_block).
# Kernels keep the memory rule of the reader: every temporary is uint8 of at most one byte per element
# (or tiny per-block scale arrays); float32 work happens in place in `out`.
Kernel: TypeAlias = Callable[[U8, F32], None]

# Step in elements (the reader's 1 MiB float32 chunk): bounds temporaries when a caller passes more.
_STEP_ELEMENTS: Final = 1 << 18

# fp16 -> fp32 by bit manipulation (numpy's own half cast is scalar and ~4x slower): the int16 is
# sign-extended to int32 and shifted left by 13, so exponent+mantissa land in bits 13..27 and the sign in
# 28..31; the mask keeps bit 31 and bits 13..27. Multiplying by 2**112 rebiases the exponent (15 -> 127),
# exactly, subnormals included. Exponent 31 (inf/nan) ends up at or above 2**16 and is fixed separately.
_F16_KEEP: Final = np.int32(-0x70002000)  # 0x8FFFE000
_F16_REBIAS: Final = np.float32(2.0**112)
_F16_SPECIAL: Final = np.float32(65536.0)
_F32_EXP_ONES: Final = np.int32(0x7F800000)
# Below this many values numpy's cast wins: it is one call, the bit trick is six.
_F16_CAST_BELOW: Final = 2048

_LE_U32: Final = np.dtype("<u4")
_K_SCALE_BYTES: Final = 12  # packed 6-bit scales of Q3_K (16 scales) and Q4_K/Q5_K (8 scales + 8 mins)


def _f16_to_f32(half_bits: NDArray[np.int16], out: F32) -> F32:
    """Convert fp16 bit patterns (any strides) into the contiguous float32 `out`, bit-exact."""
    if half_bits.size < _F16_CAST_BELOW:
        np.copyto(out, half_bits.view(np.float16))
        return out
    bits = out.view(np.int32)
    np.copyto(bits, half_bits)
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _F16_KEEP, out=bits)
    np.multiply(out, _F16_REBIAS, out=out)
    # After the rebias no value is nan, so two fast reductions detect inf/nan inputs.
    if out.size and (out.max() >= _F16_SPECIAL or out.min() <= -_F16_SPECIAL):
        special = np.greater_equal(out, _F16_SPECIAL)
        special |= np.less_equal(out, -_F16_SPECIAL)
        np.bitwise_or(bits, _F32_EXP_ONES, out=bits, where=special)
    return out


def _f16_field(blocks: U8, offset: int) -> F32:
    """The fp16 field at byte `offset` of every block, as float32 of shape (n_blocks,)."""
    half_bits = blocks[:, offset : offset + 2].view(np.int16)[:, 0]
    return _f16_to_f32(half_bits, np.empty(blocks.shape[0], dtype=np.float32))


def _copy_rows(dst: U8, src: U8) -> None:
    """dst[...] = src for uint8 arrays whose last axis is contiguous, moving each row as one item.

    Element-wise ufuncs on short strided rows pay numpy's per-row overhead (~30x slower than flat);
    a void item per row turns the copy into one flat loop, so kernels compute on contiguous arrays and
    use this to gather fields out of blocks and to scatter results into block order.
    """
    item = np.dtype((np.void, dst.shape[-1]))
    np.copyto(dst.view(item), src.view(item))


def _gather(blocks: U8, start: int, stop: int) -> U8:
    """Contiguous copy of bytes [start, stop) of every block, shape (n_blocks, stop - start)."""
    field = np.empty((blocks.shape[0], stop - start), dtype=np.uint8)
    _copy_rows(field, blocks[:, start:stop])
    return field


def _nibbles(packed: U8, into: U8) -> None:
    """Low nibbles of packed (rows, k) into into[:, 0, :], high nibbles into into[:, 1, :]."""
    part = np.bitwise_and(packed, 0x0F)
    _copy_rows(into[:, 0, :], part)
    np.right_shift(packed, 4, out=part)
    _copy_rows(into[:, 1, :], part)


def _bit_planes(packed: U8, into: U8, lowest_bit: int, width: int) -> None:
    """Plane j of into (rows, planes, k): bits [j*width, (j+1)*width) of packed (rows, k), moved to
    `lowest_bit` (other bits cleared)."""
    part = np.empty_like(packed)
    for plane in range(into.shape[1]):
        shift = plane * width - lowest_bit
        if shift > 0:
            _copy_rows(into[:, plane, :], np.right_shift(packed, shift, out=part))
        elif shift < 0:
            _copy_rows(into[:, plane, :], np.left_shift(packed, -shift, out=part))
        else:
            _copy_rows(into[:, plane, :], packed)
    np.bitwise_and(into, ((1 << width) - 1) << lowest_bit, out=into)


def _scale_into(out: F32, scale: F32, offset: F32 | None = None) -> None:
    """out viewed as (n_blocks, groups, -1): multiply by scale (n_blocks, groups), then add offset."""
    n_blocks, groups = scale.shape
    view = out.reshape(n_blocks, groups, -1)
    np.multiply(view, scale.reshape(n_blocks, groups, 1), out=view)
    if offset is not None:
        np.add(view, offset.reshape(n_blocks, groups, 1), out=view)


def _f32(blocks: U8, out: F32) -> None:
    np.copyto(out, blocks.reshape(-1).view(np.float32))


def _f16(blocks: U8, out: F32) -> None:
    _f16_to_f32(blocks.reshape(-1).view(np.int16), out)


def _bf16(blocks: U8, out: F32) -> None:
    bits = out.view(np.uint32)
    np.copyto(bits, blocks.reshape(-1).view(np.uint16))
    np.left_shift(bits, 16, out=bits)


def _q8_0(blocks: U8, out: F32) -> None:
    # One pass straight from the blocks (numpy casts int8 in its own small buffer): the quants already are
    # bytes, so gathering them first only adds a copy; faster than copy-then-scale at every size.
    quants = blocks[:, 2:].view(np.int8)  # [n_blocks, 32]
    np.multiply(quants, _f16_field(blocks, 0)[:, None], out=out.reshape(blocks.shape[0], -1))


def _q4_quants(blocks: U8, qs_at: int) -> U8:
    """4-bit quants of Q4_0/Q4_1 as flat uint8: 16 low nibbles, then 16 high nibbles per block."""
    q = np.empty((blocks.shape[0], 2, 16), dtype=np.uint8)
    _nibbles(_gather(blocks, qs_at, qs_at + 16), q)
    return q.reshape(-1)


def _q4_0(blocks: U8, out: F32) -> None:
    q = _q4_quants(blocks, 2)
    np.subtract(q, 8, out=q)  # wraps in uint8; read back as int8 it is q - 8
    np.copyto(out, q.view(np.int8))
    _scale_into(out, _f16_field(blocks, 0)[:, None])


def _q4_1(blocks: U8, out: F32) -> None:
    np.copyto(out, _q4_quants(blocks, 4))
    _scale_into(out, _f16_field(blocks, 0)[:, None], _f16_field(blocks, 2)[:, None])


def _q5_quants(blocks: U8, qh_at: int) -> U8:
    """5-bit quants of Q5_0/Q5_1 as flat uint8: the Q4 nibbles plus bit j of the uint32 qh as bit 4."""
    high = np.unpackbits(_gather(blocks, qh_at, qh_at + 4).reshape(-1), bitorder="little")
    np.left_shift(high, 4, out=high)
    q = _q4_quants(blocks, qh_at + 4)
    np.bitwise_or(q, high, out=q)
    return q


def _q5_0(blocks: U8, out: F32) -> None:
    q = _q5_quants(blocks, 2)
    np.subtract(q, 16, out=q)
    np.copyto(out, q.view(np.int8))
    _scale_into(out, _f16_field(blocks, 0)[:, None])


def _q5_1(blocks: U8, out: F32) -> None:
    np.copyto(out, _q5_quants(blocks, 4))
    _scale_into(out, _f16_field(blocks, 0)[:, None], _f16_field(blocks, 2)[:, None])


def _q2_k(blocks: U8, out: F32) -> None:
    # Layout: scales[QK_K/16] (low nibble scale, high nibble min), qs[QK_K/4] (2-bit), d, dmin.
    n = blocks.shape[0]
    qs_at = QK_K // 16
    d_at = qs_at + QK_K // 4
    q = np.empty((n * 2, 4, 32), dtype=np.uint8)
    _bit_planes(_gather(blocks, qs_at, d_at).reshape(n * 2, 32), q, 0, 2)
    np.copyto(out, q.reshape(-1))
    scales = _gather(blocks, 0, qs_at)
    d = _f16_field(blocks, d_at)[:, None]
    dmin = _f16_field(blocks, d_at + 2)[:, None]
    _scale_into(out, d * np.bitwise_and(scales, 0x0F), -(dmin * np.right_shift(scales, 4)))


def _q3_k(blocks: U8, out: F32) -> None:
    # Layout: hmask[QK_K/8] (bit 2 of each quant), qs[QK_K/4] (bits 0-1), scales[12] (16 x 6 bits), d.
    n = blocks.shape[0]
    qs_at = QK_K // 8
    scales_at = qs_at + QK_K // 4
    d_at = scales_at + _K_SCALE_BYTES
    q = np.empty((n * 2, 4, 32), dtype=np.uint8)
    _bit_planes(_gather(blocks, qs_at, scales_at).reshape(n * 2, 32), q, 0, 2)
    high = np.empty((n, 8, 32), dtype=np.uint8)
    _bit_planes(_gather(blocks, 0, qs_at), high, 2, 1)
    flat = q.reshape(-1)
    np.bitwise_or(flat, high.reshape(-1), out=flat)
    # A set hmask bit means "no offset": q = low | high << 2, minus 4 (wraps; read back as int8).
    np.subtract(flat, 4, out=flat)
    np.copyto(out, flat.view(np.int8))

    # 16 scales of 6 bits: low nibbles in bytes 0..7, top 2 bits in bytes 8..11 (ggml's 32-bit word
    # unpacking, as in _k_scale_min); stored with a +32 bias.
    words = _gather(blocks, scales_at, d_at).view(_LE_U32)
    low_a, low_b, top = words[:, 0], words[:, 1], words[:, 2]
    scale = np.empty((blocks.shape[0], 4), dtype=_LE_U32)
    for column, (low, nibble_shift, top_shift) in enumerate(
        ((low_a, 0, 0), (low_b, 0, 2), (low_a, 4, 4), (low_b, 4, 6))
    ):
        high_bits = np.left_shift((top >> top_shift) & 0x03030303, 4)
        np.bitwise_or((low >> nibble_shift) & 0x0F0F0F0F, high_bits, out=scale[:, column])
    biased = scale.view(np.uint8)
    np.subtract(biased, 32, out=biased)
    _scale_into(out, _f16_field(blocks, d_at)[:, None] * biased.view(np.int8))


def _k_scale_min(packed: U8) -> tuple[U8, U8]:
    """Unpack the 12-byte scale field of Q4_K/Q5_K into eight 6-bit scales and eight 6-bit mins.

    Works on the three little-endian 32-bit words of the field (as ggml does): one flat op per word
    instead of per-byte ops on short strided rows; the masks keep every bit inside its byte.
    """
    words = packed.view(_LE_U32)
    d, m, md = words[:, 0], words[:, 1], words[:, 2]
    scale = np.empty((packed.shape[0], 2), dtype=_LE_U32)
    minimum = np.empty((packed.shape[0], 2), dtype=_LE_U32)
    np.bitwise_and(d, 0x3F3F3F3F, out=scale[:, 0])
    np.bitwise_or(md & 0x0F0F0F0F, (d >> 2) & 0x30303030, out=scale[:, 1])
    np.bitwise_and(m, 0x3F3F3F3F, out=minimum[:, 0])
    np.bitwise_or((md >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=minimum[:, 1])
    return scale.view(np.uint8), minimum.view(np.uint8)


def _k_offsets(blocks: U8) -> tuple[F32, F32]:
    """Per-sub-block scale d*sc and offset -dmin*m of Q4_K/Q5_K, each (n_blocks, 8)."""
    scale, minimum = _k_scale_min(_gather(blocks, 4, 4 + _K_SCALE_BYTES))
    d = _f16_field(blocks, 0)[:, None]
    dmin = _f16_field(blocks, 2)[:, None]
    return d * scale, -(dmin * minimum)


def _q4_k(blocks: U8, out: F32) -> None:
    # Layout: d, dmin, scales[12] (8 scales + 8 mins, 6 bits each), qs[QK_K/2] (nibbles).
    n = blocks.shape[0]
    qs_at = 4 + _K_SCALE_BYTES
    q = np.empty((n * 4, 2, 32), dtype=np.uint8)
    _nibbles(_gather(blocks, qs_at, qs_at + QK_K // 2).reshape(n * 4, 32), q)
    np.copyto(out, q.reshape(-1))
    _scale_into(out, *_k_offsets(blocks))


def _q5_k(blocks: U8, out: F32) -> None:
    # Layout: d, dmin, scales[12], qh[QK_K/8] (bit 4 of each quant), qs[QK_K/2] (nibbles).
    n = blocks.shape[0]
    qh_at = 4 + _K_SCALE_BYTES
    qs_at = qh_at + QK_K // 8
    q = np.empty((n * 4, 2, 32), dtype=np.uint8)
    _nibbles(_gather(blocks, qs_at, qs_at + QK_K // 2).reshape(n * 4, 32), q)
    high = np.empty((n, 8, 32), dtype=np.uint8)
    _bit_planes(_gather(blocks, qh_at, qs_at), high, 4, 1)
    flat = q.reshape(-1)
    np.bitwise_or(flat, high.reshape(-1), out=flat)
    np.copyto(out, flat)
    _scale_into(out, *_k_offsets(blocks))


def _q6_k(blocks: U8, out: F32) -> None:
    # Layout: ql[QK_K/2] (low nibbles), qh[QK_K/4] (2-bit highs), scales[QK_K/16] (int8), d.
    n = blocks.shape[0]
    qh_at = QK_K // 2
    scales_at = qh_at + QK_K // 4
    d_at = scales_at + QK_K // 16
    q = np.empty((n * 2, 2, 64), dtype=np.uint8)
    _nibbles(_gather(blocks, 0, qh_at).reshape(n * 2, 64), q)
    high = np.empty((n * 2, 4, 32), dtype=np.uint8)
    _bit_planes(_gather(blocks, qh_at, scales_at).reshape(n * 2, 32), high, 4, 2)
    flat = q.reshape(-1)
    np.bitwise_or(flat, high.reshape(-1), out=flat)
    np.subtract(flat, 32, out=flat)
    np.copyto(out, flat.view(np.int8))
    scales = _gather(blocks, scales_at, d_at).view(np.int8)
    _scale_into(out, _f16_field(blocks, d_at)[:, None] * scales)


_KERNELS: Final[Mapping[GGMLQuantizationType, Kernel]] = MappingProxyType(
    {
        GGMLQuantizationType.F32: _f32,
        GGMLQuantizationType.F16: _f16,
        GGMLQuantizationType.BF16: _bf16,
        GGMLQuantizationType.Q8_0: _q8_0,
        GGMLQuantizationType.Q4_0: _q4_0,
        GGMLQuantizationType.Q4_1: _q4_1,
        GGMLQuantizationType.Q5_0: _q5_0,
        GGMLQuantizationType.Q5_1: _q5_1,
        GGMLQuantizationType.Q2_K: _q2_k,
        GGMLQuantizationType.Q3_K: _q3_k,
        GGMLQuantizationType.Q4_K: _q4_k,
        GGMLQuantizationType.Q5_K: _q5_k,
        GGMLQuantizationType.Q6_K: _q6_k,
    }
)

SUPPORTED_TYPES: Final[frozenset[GGMLQuantizationType]] = frozenset(_KERNELS)

_SUPPORTED_NAMES: Final = ", ".join(t.name for t in _KERNELS)


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def _as_type(qtype: GGMLQuantizationType | int, what: str) -> GGMLQuantizationType:
    try:
        resolved = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedTensorType(
            f"{_prefix(what)}unknown GGML type id {qtype!r}; the file is newer than the installed gguf "
            f"package or corrupt; hint: upgrade `gguf` or re-export the model"
        ) from None
    if resolved not in GGML_QUANT_SIZES:
        raise UnsupportedTensorType(f"{_prefix(what)}GGML type {resolved.name} has no known block geometry")
    return resolved


def block_geometry(qtype: GGMLQuantizationType | int) -> tuple[int, int]:
    """(elements per block, bytes per block) of any GGML type gguf knows, dequantizable or not."""
    elements, nbytes = GGML_QUANT_SIZES[_as_type(qtype, "")]
    return int(elements), int(nbytes)


def _as_raw(raw: RawBytes, what: str) -> U8:
    array = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise GGUFError(
            f"{_prefix(what)}raw tensor data must be a 1-D uint8 array, got {array.dtype} of shape "
            f"{array.shape}; hint: pass np.frombuffer(chunk, dtype=np.uint8)"
        )
    return np.ascontiguousarray(array)


def _check_out(out: NDArray[np.float32], n_elements: int, what: str) -> F32:
    if out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous:
        raise GGUFError(
            f"{_prefix(what)}out must be a C-contiguous float32 array of {n_elements:,} elements, got "
            f"{out.dtype} of shape {out.shape}; hint: np.empty({n_elements}, dtype=np.float32)"
        )
    if not out.flags.writeable:
        raise GGUFError(f"{_prefix(what)}out is read-only; hint: pass a writeable float32 buffer")
    return out.reshape(-1)


def dequantize(
    raw: RawBytes,
    qtype: GGMLQuantizationType | int,
    *,
    out: NDArray[np.float32] | None = None,
    what: str = "",
) -> NDArray[np.float32]:
    """Dequantize whole blocks of little-endian GGML data to float32, flat, in the blocks' order.

    `what` (e.g. the tensor name) prefixes error messages. With `out` (C-contiguous float32 of the right
    size) the result is written there and `out` is returned; otherwise a new array is returned, which never
    aliases `raw`. Temporaries stay below ~3 bytes per element plus per-block scales; inputs larger than
    262,144 elements are processed in steps of that size, so temporaries never pass ~1 MiB.
    """
    kind = _as_type(qtype, what)
    kernel = _KERNELS.get(kind)
    if kernel is None:
        raise UnsupportedTensorType(
            f"{_prefix(what)}GGML type {kind.name} is not supported by the dequantizer "
            f"(supported: {_SUPPORTED_NAMES}); hint: re-quantize the model to one of these, "
            f"e.g. Q8_0 or Q4_K_M"
        )
    data = _as_raw(raw, what)
    elements_per_block, bytes_per_block = GGML_QUANT_SIZES[kind]
    n_blocks, leftover = divmod(data.size, bytes_per_block)
    if leftover:
        raise GGUFError(
            f"{_prefix(what)}{kind.name} data of {data.size:,} bytes is not a whole number of "
            f"{bytes_per_block}-byte blocks ({n_blocks:,} blocks + {leftover} bytes); "
            f"hint: split tensor data on block boundaries (see block_geometry)"
        )
    n_elements = n_blocks * elements_per_block
    result = np.empty(n_elements, dtype=np.float32) if out is None else _check_out(out, n_elements, what)
    step_blocks = max(1, _STEP_ELEMENTS // elements_per_block)
    # A NaN or infinite scale decodes to NaN and infinities, as in ggml; whoever computes with them refuses
    # them in one line (the engine's finite check), which numpy's warning here would only precede.
    with np.errstate(over="ignore", invalid="ignore"):
        for first in range(0, n_blocks, step_blocks):
            last = min(first + step_blocks, n_blocks)
            kernel(
                data[first * bytes_per_block : last * bytes_per_block].reshape(-1, bytes_per_block),
                result[first * elements_per_block : last * elements_per_block],
            )
    return result if out is None else out
