"""A GGUF written from pieces: laid out as gguf-py lays it out, and a short tensor is an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as T

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.writer import TensorPlan, write_streamed


def test_pieces_land_where_gguf_py_puts_whole_tensors(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 12)
    b = np.arange(10, dtype=np.float16)
    whole = GGUFWriter(tmp_path / "whole.gguf", "llama")
    whole.add_tensor("a", a)
    whole.add_tensor("b", b)
    whole.write_header_to_file()
    whole.write_kv_data_to_file()
    whole.write_tensors_to_file()
    whole.close()

    def pieces(index: int, plan: TensorPlan) -> Iterator[np.ndarray]:
        values = (a, b)[index].reshape(-1)
        yield values[:5]
        yield values[5:]

    streamed = GGUFWriter(tmp_path / "streamed.gguf", "llama")
    write_streamed(streamed, [TensorPlan("a", (2, 12), T.F32), TensorPlan("b", (10,), T.F16)], pieces)
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_a_tensor_short_of_its_size_is_an_error(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "short.gguf", "llama")
    with pytest.raises(GGUFError, match="a: wrote 16 bytes of data, the info says 32"):
        write_streamed(writer, [TensorPlan("a", (8,), T.F32)], lambda i, p: iter([np.zeros(4, np.float32)]))
