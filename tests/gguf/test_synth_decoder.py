"""Synthetic decoders: what llama.cpp needs per architecture, read back by our reader and gguf-py's."""

from __future__ import annotations

import hashlib
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as T

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth_decoder import (
    NOMIC_CODE_CLASS,
    QWEN2_TINY,
    QWEN3_TINY,
    SyntheticDecoder,
    byte_level_vocabulary,
    synthetic_decoder_for_size,
    write_synthetic_decoder,
)
from gguf_sandbox.tokenizers import from_gguf

GEMMA3_TINY = SyntheticDecoder(architecture="gemma3", hidden=128, heads=4, kv_heads=1, head_dim=64, ffn=256)
LLAMA_K = SyntheticDecoder(
    architecture="llama",
    hidden=256,
    layers=8,
    heads=4,
    kv_heads=2,
    head_dim=64,
    ffn=512,
    tensor_type=T.Q4_K,
    sensitive_type=T.Q6_K,
)
SPECS = {"qwen2": QWEN2_TINY, "qwen3": QWEN3_TINY, "gemma3": GEMMA3_TINY, "llama-q4_k_m": LLAMA_K}
# Per layer, beyond llama's attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down.
EXTRA = {
    "qwen2": {"attn_q.bias", "attn_k.bias", "attn_v.bias"},
    "qwen3": {"attn_q_norm.weight", "attn_k_norm.weight"},
    "gemma3": {
        "attn_q_norm.weight",
        "attn_k_norm.weight",
        "post_attention_norm.weight",
        "post_ffw_norm.weight",
    },
    "llama-q4_k_m": set(),
}
LLAMA_LAYER = {
    f"{name}.weight"
    for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up")
} | {"ffn_down.weight"}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("decoders")
    return {key: write_synthetic_decoder(directory / f"{key}.gguf", spec) for key, spec in SPECS.items()}


@pytest.mark.parametrize("key", list(SPECS))
def test_tensors_are_named_and_shaped_as_llama_cpp_expects(key: str, written: dict[str, Path]) -> None:
    spec = SPECS[key]
    q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    with GGUFFile.open(written[key]) as gguf:
        tensors = gguf.tensors
        assert gguf.architecture == spec.architecture
        per_layer = {name.split(".", 2)[2] for name in tensors if name.startswith("blk.0.")}
        assert per_layer == LLAMA_LAYER | EXTRA[key]
        assert set(tensors) - {n for n in tensors if n.startswith("blk.")} == {
            "token_embd.weight",
            "output_norm.weight",
        }
        assert len([n for n in tensors if n.startswith("blk.")]) == spec.layers * len(per_layer)
        # GGUF dims are ggml's: row length first.
        assert tensors["token_embd.weight"].ne == (spec.hidden, spec.vocab_size)
        assert tensors["blk.0.attn_q.weight"].ne == (spec.hidden, q_dim)
        assert tensors["blk.0.attn_k.weight"].ne == (spec.hidden, kv_dim)
        assert tensors["blk.0.attn_output.weight"].ne == (q_dim, spec.hidden)
        assert tensors["blk.0.ffn_down.weight"].ne == (spec.ffn, spec.hidden)
        if "attn_q_norm.weight" in per_layer:
            assert tensors["blk.0.attn_q_norm.weight"].ne == (spec.head_dim,)
        if key == "qwen2":
            assert tensors["blk.1.attn_v.bias"].ne == (kv_dim,)
        assert all(t.type is T.F32 for n, t in tensors.items() if len(t.ne) == 1)


def test_metadata_llama_cpp_reads(written: dict[str, Path]) -> None:
    with GGUFFile.open(written["qwen3"]) as gguf:
        meta = gguf.metadata
        assert meta["qwen3.block_count"] == 2
        assert meta["qwen3.embedding_length"] == 64
        assert meta["qwen3.attention.head_count"] == 4
        assert meta["qwen3.attention.head_count_kv"] == 2
        assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 32  # ≠ 64/4
        assert meta["qwen3.feed_forward_length"] == 192
        assert meta["qwen3.rope.freq_base"] == 1e6
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
        tokens = meta["tokenizer.ggml.tokens"]
        assert isinstance(tokens, LazyArray) and len(tokens) == QWEN3_TINY.vocab_size
    with GGUFFile.open(written["gemma3"]) as gguf:
        assert gguf.metadata["gemma3.attention.sliding_window"] == 512


def test_q4_k_m_mix_follows_llama_cpp(written: dict[str, Path]) -> None:
    """attn_v and ffn_down get Q6_K on llama.cpp's use_more_bits layers (of 8: 0, 3, 6, 7), else Q4_K."""
    with GGUFFile.open(written["llama-q4_k_m"]) as gguf:
        types = {n: t.type for n, t in gguf.tensors.items()}
    sensitive = [i for i in range(8) if types[f"blk.{i}.ffn_down.weight"] is T.Q6_K]
    assert sensitive == [0, 3, 6, 7]
    assert [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] is T.Q6_K] == sensitive
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(8)} == {T.Q4_K}
    assert types["token_embd.weight"] is T.Q4_K


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_gguf_py_reads_the_tiny_files(key: str, written: dict[str, Path]) -> None:
    reader = GGUFReader(written[key])
    with GGUFFile.open(written[key]) as ours:
        assert {t.name: int(t.n_bytes) for t in reader.tensors} == {
            n: t.nbytes for n, t in ours.tensors.items()
        }
        for tensor in reader.tensors:
            assert ours.tensors[tensor.name].offset == tensor.data_offset


@pytest.mark.parametrize("key", list(SPECS))
def test_weights_decode_finite_and_sane(key: str, written: dict[str, Path]) -> None:
    with GGUFFile.open(written[key]) as gguf:
        for name, tensor in gguf.tensors.items():
            values = dequantize(np.concatenate(list(gguf.iter_raw(name))), tensor.type)
            assert np.isfinite(values).all(), name
            if "norm" in name:
                assert abs(float(values.mean()) - 1) < 0.05, name
            else:
                assert 0.01 < float(values.std()) < 0.03 and abs(float(values.mean())) < 0.005, name


def test_the_same_spec_gives_the_same_bytes(tmp_path: Path, written: dict[str, Path]) -> None:
    again = write_synthetic_decoder(tmp_path / "again.gguf", QWEN2_TINY)
    assert (
        hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(written["qwen2"].read_bytes()).digest()
    )
    other = write_synthetic_decoder(tmp_path / "seed1.gguf", replace(QWEN2_TINY, seed=1))
    assert other.stat().st_size == again.stat().st_size and other.read_bytes() != again.read_bytes()


def test_our_tokenizer_reads_the_vocabulary(written: dict[str, Path]) -> None:
    with GGUFFile.open(written["qwen2"]) as gguf:
        tokenizer = from_gguf(gguf)
        # The ids llama-cpp-python 0.3.36 gives (checked by hand): whole words, word starts with "Ġ".
        assert tokenizer.encode("hello world, the model", add_special=False) == [333, 271, 44, 258, 305]


def test_the_vocabulary_is_padded_with_unique_tokens() -> None:
    vocabulary = byte_level_vocabulary(1000)
    assert len(vocabulary.tokens) == len(set(vocabulary.tokens)) == len(vocabulary.types) == 1000
    assert vocabulary.tokens[32] == "Ġ" and vocabulary.tokens[ord("a")] == "a"
    assert vocabulary.tokens[vocabulary.eos] == "<|endoftext|>"
    assert all(" " not in m.replace(" ", "", 1) for m in vocabulary.merges)


def test_writing_holds_one_piece_not_a_tensor(tmp_path: Path) -> None:
    """A 45 MB file whose largest tensor is 14 MB is written with a few MiB of allocations."""
    spec = SyntheticDecoder(
        hidden=2048,
        layers=1,
        heads=16,
        kv_heads=4,
        head_dim=128,
        ffn=8192,
        vocab_size=8192,
        tensor_type=T.Q4_K,
        sensitive_type=T.Q6_K,
    )
    tracemalloc.start()
    try:
        path = write_synthetic_decoder(tmp_path / "mid.gguf", spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with GGUFFile.open(path) as gguf:
        largest = max(t.nbytes for t in gguf.tensors.values())
    assert largest > 12 << 20 and path.stat().st_size > 40 << 20
    assert peak < 4 << 20, f"peak {peak / (1 << 20):.1f} MiB"


def test_nomic_code_class_is_the_4_gb_q4_k_m_geometry() -> None:
    spec = NOMIC_CODE_CLASS
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.ffn) == (3584, 28, 28, 4, 18944)
    assert 4.1e9 < spec.nbytes() < 4.4e9


def test_size_helper_picks_the_smallest_layer_count() -> None:
    spec = synthetic_decoder_for_size(10 << 20, QWEN2_TINY)
    assert spec.nbytes() >= 10 << 20 > replace(spec, layers=spec.layers - 1).nbytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "gpt9"}, "unknown architecture 'gpt9'"),
        ({"kv_heads": 3}, "4 query heads cannot share 3 KV heads"),
        ({"hidden": 0}, "hidden must be a positive whole number"),
        ({"tensor_type": T.Q4_K}, "rows of 128 values are not whole Q4_K blocks of 256"),
        ({"tensor_type": T.IQ2_XXS}, "cannot synthesize IQ2_XXS"),
        ({"rope_freq_base": float("nan")}, "rope_freq_base must be finite"),
        ({"vocab_size": 300}, "vocab_size 300 is too small"),
    ],
    ids=["arch", "gqa", "hidden-0", "k-quant-rows", "type", "rope-nan", "vocab"],
)
def test_impossible_specs_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(GGUFError, match=message):
        replace(QWEN2_TINY, **change)  # type: ignore[arg-type]
