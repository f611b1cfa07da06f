"""Q8_0's block (the gguf library's sizes), and which tensors the engine splits into quants and scales."""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_sandbox.gguf.reader import TensorInfo

# One fp16 scale, then 32 int8 quants.
Q8_BLOCK, Q8_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]


def is_q8_0(info: TensorInfo, byte_order: str) -> bool:
    """Whether a tensor's blocks can be split into quants and scales (big-endian Q8_0 is refused)."""
    return info.type is GGMLQuantizationType.Q8_0 and byte_order == "<"
