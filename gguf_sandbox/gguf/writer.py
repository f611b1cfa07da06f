"""Writing a GGUF whose tensor data arrives in pieces: gguf-py writes the header, we append the data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_sandbox.errors import GGUFError


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, numpy shape (rows first, as gguf-py takes it) and storage type."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block_elements, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block_elements * block_bytes

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """What gguf-py's add_tensor_info takes: quantized rows are given in bytes."""
        if self.qtype in _FLOAT_DTYPES:
            return self.shape
        block_elements, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block_elements * block_bytes)


_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

# pieces(index, plan) yields the tensor's bytes in order (any contiguous arrays); their sizes must add up to
# plan.nbytes.
Pieces = Callable[[int, TensorPlan], Iterable[np.ndarray]]


def write_streamed(writer: GGUFWriter, plans: Sequence[TensorPlan], pieces: Pieces) -> None:
    """Write `writer`'s metadata, the tensor infos of `plans`, then each tensor's pieces as they come.

    Only one piece is alive at a time, so a file of any size is written in the memory its pieces take
    (gguf-py's write_tensor_data wants each tensor whole).
    """
    for plan in plans:
        dtype = np.dtype(_FLOAT_DTYPES.get(plan.qtype, np.uint8))
        writer.add_tensor_info(plan.name, plan.stored_shape, dtype, plan.nbytes, plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if writer.fout is None or len(writer.fout) != 1:
        raise GGUFError("write_streamed writes one file; the writer was set up to split it")
    out = writer.fout[0]
    try:
        for index, plan in enumerate(plans):
            writer.write_padding(out, out.tell())
            written = 0
            for piece in pieces(index, plan):
                raw = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
                out.write(raw.data)
                written += raw.nbytes
            if written != plan.nbytes:
                raise GGUFError(
                    f"{plan.name}: wrote {written:,} bytes of data, the info says {plan.nbytes:,}"
                )
            writer.write_padding(out, written)
    finally:
        writer.close()
