"""model.safetensors: llama.cpp's names, heads dropped, shapes and counts checked against config.json, corrupt
weights refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox.embed.convert import convert
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.conftest import traced_peak
from tests.embed.tiny_checkpoint import (
    TINY_VOCAB,
    bad_checkpoint_test,
    expected_names,
    hostile_input_test,
    pytorch_only,
    set_weight,
    tiny_config,
    tiny_tensors,
    with_config,
    with_tensors,
    write_text,
    write_tiny,
)


def test_masked_lm_checkpoint_drops_heads_and_renames(tmp_path: Path) -> None:
    """BertForMaskedLM layout: "bert." prefix, gamma/beta names, cls.predictions head dropped."""
    config = tiny_config(architectures=["BertForMaskedLM"])
    tensors = {
        name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
        for name, value in tiny_tensors(config, prefix="bert.").items()
    }
    tensors["cls.predictions.bias"] = np.zeros(len(TINY_VOCAB), dtype=np.float32)
    tensors["cls.predictions.transform.dense.weight"] = np.zeros((64, 64), dtype=np.float32)
    source = write_tiny(tmp_path / "mlm", config, tensors)
    convert(source, tmp_path / "mlm.gguf", "f32")
    with GGUFFile.open(tmp_path / "mlm.gguf") as gguf_file:
        assert set(gguf_file.tensors) == expected_names(2)
        got = gguf_file.read_tensor("blk.1.attn_output_norm.weight")
    np.testing.assert_array_equal(got, tensors["bert.encoder.layer.1.attention.output.LayerNorm.gamma"])


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-safetensors": (pytorch_only, "pytorch_model.bin"),
    "corrupt-safetensors": (write_text("model.safetensors", "garbage"), "safetensors header"),
    "missing-tensor": (
        with_tensors(lambda t: t.pop("encoder.layer.1.output.dense.weight")),
        "lacks 1 tensor",
    ),
    "wrong-shape": (
        with_tensors(
            lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((8, 64), np.float32)})
        ),
        "disagree",
    ),
    "unknown-tensor": (
        with_tensors(lambda t: t.update({"extra.weight": np.zeros((2, 64), np.float32)})),
        "no llama",
    ),
    "classifier-head": (
        with_tensors(lambda t: t.update({"classifier.weight": np.zeros((2, 64), np.float32)})),
        "not supported",
    ),
    "int-weights": (
        with_tensors(lambda t: t.update({"embeddings.LayerNorm.bias": np.zeros(64, np.int32)})),
        "only F32/F16/F64",
    ),
    "weights-nan": (
        with_tensors(set_weight("encoder.layer.1.output.dense.weight", np.nan)),
        "holds NaN or infinite",
    ),
    "weights-inf": (
        with_tensors(set_weight("embeddings.word_embeddings.weight", -np.inf)),
        "holds NaN or infinite",
    ),
    "weights-f64-beyond-float32": (
        with_tensors(
            lambda t: t.update({"embeddings.LayerNorm.bias": np.full(64, 1e300, np.float64)}),
        ),
        "holds NaN or infinite values .or F64 values beyond float32.",
    ),
}


HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # config.json's counts against the tensors model.safetensors holds
    "vocab-size-not-the-tensors": (
        with_config(vocab_size=2_000_000),
        "vocab_size 2000000 and hidden_size 64, but ",  # then model.safetensors's shape [9, 64]
    ),
    "layers-not-the-tensors": (
        with_config(num_hidden_layers=200),
        "holds 2 encoder layer(s) (0, 1); the weights",
    ),
    "fewer-layers-in-config": (with_config(num_hidden_layers=1), "num_hidden_layers 1, but"),
    "layers-numbered-oddly": (
        with_tensors(
            lambda t: t.update(
                {k.replace("layer.1.", "layer.7."): t.pop(k) for k in list(t) if "layer.1." in k}
            )
        ),
        "holds 2 encoder layer(s) (0, 7)",
    ),
    "no-word-embeddings": (
        with_tensors(lambda t: t.pop("embeddings.word_embeddings.weight")),
        "has no embeddings.word_embeddings.weight",
    ),
}


test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)
test_hostile_input_is_one_line_and_changes_nothing = hostile_input_test(HOSTILE_INPUTS)


def test_counts_are_checked_before_anything_is_sized_by_them(tmp_path: Path) -> None:
    """vocab_size 2,000,000 is within bounds but not what the weights hold: refused before the padding
    loop would make 2 million token strings (~150 MB)."""
    source = write_tiny(tmp_path / "src")
    with_config(vocab_size=2_000_000)(source)

    def run() -> None:
        with pytest.raises(GGUFSandboxError, match="vocab_size 2000000"):
            convert(source, tmp_path / "out.gguf")

    assert traced_peak(run) < 5 << 20
