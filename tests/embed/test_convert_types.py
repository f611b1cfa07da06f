"""--type recipes: Q4_0 where MiniLM tolerates it, F16 for rows that do not split into whole blocks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from gguf_sandbox.embed.convert import convert
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.tiny_checkpoint import tiny_config, write_tiny

F16, Q8_0, Q4_0 = GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0


def test_minilm_q4_0_holds_most_weights_in_q4_0(minilm_gguf: Callable[[str], Path]) -> None:
    with GGUFFile.open(minilm_gguf("q4_0")) as gguf_file:
        elements: dict[GGMLQuantizationType, int] = {}
        for info in gguf_file.tensors.values():
            elements[info.type] = elements.get(info.type, 0) + info.n_elements
        q4_0_roles = {name.split(".")[-2] for name, i in gguf_file.tensors.items() if i.type == Q4_0}
    assert elements[Q4_0] > 0.55 * sum(elements.values())
    assert q4_0_roles == {"token_embd", "attn_q", "attn_k"}


def test_unblockable_rows_fall_back_to_f16(tmp_path: Path) -> None:
    """A row that is no whole number of 32-blocks is stored F16, as llama.cpp's QuantError fallback does."""
    source = write_tiny(tmp_path / "tiny", tiny_config(hidden_size=48, intermediate_size=64))
    convert(source, tmp_path / "out.gguf", "q8_0")
    with GGUFFile.open(tmp_path / "out.gguf") as gguf_file:
        assert gguf_file.tensors["blk.0.attn_q.weight"].type == F16  # rows of 48
        assert gguf_file.tensors["blk.0.ffn_down.weight"].type == Q8_0  # rows of 64
