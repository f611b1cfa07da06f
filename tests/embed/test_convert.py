"""HF BERT → GGUF converter: llama.cpp's metadata, names, types, layout; both readers open it; bad input."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType, LlamaFileType, PoolingType, TokenType
from safetensors import safe_open
from safetensors.numpy import save_file

from gguf_sandbox.cli import main as cli_main
from gguf_sandbox.embed.convert import convert
from gguf_sandbox.embed.tokenizer import KEY_LOWERCASE, KEY_MAX_SEQ_LENGTH, WordPieceTokenizer
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.conftest import traced_peak

F32, F16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16
Q8_0, Q4_0 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0
MATRIX_TYPE = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
TOKEN_EMBD_TYPE = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
# Roles q4_0 keeps at Q8_0: the ones MiniLM's vectors are most sensitive to.
KEPT_TYPE = {"q4_0": {"attn_v": Q8_0, "attn_output": Q8_0, "ffn_up": Q8_0, "ffn_down": Q8_0}}
FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}
BLOCK_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
               "layer_output_norm")  # fmt: skip
# Largest |dequantized - source| per tensor, relative to the tensor's largest |value|.
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15}


def expected_names(n_layers: int) -> set[str]:
    names = {"token_embd.weight", "position_embd.weight", "token_types.weight"}
    names |= {"token_embd_norm.weight", "token_embd_norm.bias"}
    for block in range(n_layers):
        names |= {f"blk.{block}.{part}.{kind}" for part in BLOCK_PARTS for kind in ("weight", "bias")}
    return names


def expected_type(name: str, ne: tuple[int, ...], out_type: str) -> GGMLQuantizationType:
    if (
        len(ne) == 1
        or name.endswith(("_norm.weight", ".bias"))
        or name.startswith(("position", "token_types"))
    ):
        return F32
    role = name.split(".")[2] if name.startswith("blk.") else ""
    if name == "token_embd.weight":
        wanted = TOKEN_EMBD_TYPE[out_type]
    else:
        wanted = KEPT_TYPE.get(out_type, {}).get(role, MATRIX_TYPE[out_type])
    return wanted if ne[0] % 32 == 0 else F16


# -- the real all-MiniLM-L6-v2 ----------------------------------------------------------------------------
MINILM_METADATA: dict[str, Any] = {
    "bert.context_length": 512,
    "bert.embedding_length": 384,
    "bert.feed_forward_length": 1536,
    "bert.block_count": 6,
    "bert.attention.head_count": 12,
    "bert.attention.causal": False,
    "bert.pooling_type": PoolingType.MEAN,
    "tokenizer.ggml.model": "bert",
    "tokenizer.ggml.pre": "jina-v2-en",  # what llama.cpp's hash table answers for this vocabulary
    "tokenizer.ggml.token_type_count": 2,
    "tokenizer.ggml.bos_token_id": 101,
    "tokenizer.ggml.eos_token_id": 102,
    "tokenizer.ggml.seperator_token_id": 102,
    "tokenizer.ggml.unknown_token_id": 100,
    "tokenizer.ggml.padding_token_id": 0,
    "tokenizer.ggml.mask_token_id": 103,
    KEY_MAX_SEQ_LENGTH: 256,
    KEY_LOWERCASE: True,
}


@pytest.mark.parametrize("out_type", list(MATRIX_TYPE))
def test_minilm_metadata_follows_llama_cpp(minilm_gguf: Callable[[str], Path], out_type: str) -> None:
    with GGUFFile.open(minilm_gguf(out_type)) as gguf_file:
        meta = gguf_file.metadata
        assert gguf_file.architecture == "bert"
        expected = {**MINILM_METADATA, "general.file_type": FILE_TYPE[out_type]}
        assert {key: meta.get(key) for key in expected} == expected
        assert meta["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
        tokens = meta["tokenizer.ggml.tokens"]
        assert isinstance(tokens, LazyArray)
        assert len(tokens) == 30522
        assert tokens[0:2] == ["[PAD]", "▁[unused0]"]
        assert tokens[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert tokens[1996] == "▁the"
        assert tokens[2015] == "s"  # vocab.txt "##s"
        token_types = meta["tokenizer.ggml.token_type"]
        assert isinstance(token_types, LazyArray)
        types = list(token_types)
        control = [index for index, kind in enumerate(types) if kind == TokenType.CONTROL]
        assert control == [0, 100, 101, 102, 103]
        assert types.count(TokenType.NORMAL) == 30522 - 5


@pytest.mark.parametrize("out_type", list(MATRIX_TYPE))
def test_minilm_tensors_names_types_shapes(minilm_gguf: Callable[[str], Path], out_type: str) -> None:
    with GGUFFile.open(minilm_gguf(out_type)) as gguf_file:
        tensors = gguf_file.tensors
        assert set(tensors) == expected_names(6)
        assert tensors["token_embd.weight"].ne == (384, 30522)
        assert tensors["position_embd.weight"].ne == (384, 512)
        assert tensors["token_types.weight"].ne == (384, 2)
        assert tensors["blk.0.ffn_up.weight"].ne == (384, 1536)
        assert tensors["blk.0.ffn_down.weight"].ne == (1536, 384)
        assert tensors["blk.5.attn_q.bias"].ne == (384,)
        wrong = {
            name: info.type.name
            for name, info in tensors.items()
            if info.type != expected_type(name, info.ne, out_type)
        }
        assert wrong == {}


@pytest.mark.parametrize("out_type", list(MATRIX_TYPE))
def test_minilm_values_match_the_checkpoint(
    minilm_gguf: Callable[[str], Path], minilm_dir: Path, out_type: str
) -> None:
    """Rows read back (through our reader's dequantization) are the checkpoint's rows, not transposed."""
    checks = {
        "token_embd.weight": ("embeddings.word_embeddings.weight", [0, 101, 1996, 30521]),
        "position_embd.weight": ("embeddings.position_embeddings.weight", [0, 511]),
        "blk.3.ffn_down.weight": ("encoder.layer.3.output.dense.weight", [0, 383]),
        "blk.0.attn_q.weight": ("encoder.layer.0.attention.self.query.weight", [5, 200]),
        "blk.5.layer_output_norm.bias": ("encoder.layer.5.output.LayerNorm.bias", [0]),
    }
    weights = str(minilm_dir / "model.safetensors")
    with safe_open(weights, framework="numpy") as source, GGUFFile.open(minilm_gguf(out_type)) as gguf_file:
        for name, (source_name, rows) in checks.items():
            original = source.get_tensor(source_name).astype(np.float32)
            original = original.reshape(1, -1) if original.ndim == 1 else original
            got = gguf_file.read_rows(name, rows)
            scale = float(np.abs(original).max())
            error = float(np.abs(got - original[rows]).max())
            assert error <= TOLERANCE[out_type] * scale, f"{name}: error {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("out_type", list(MATRIX_TYPE))
def test_minilm_opens_in_gguf_py_too(minilm_gguf: Callable[[str], Path], out_type: str) -> None:
    path = minilm_gguf(out_type)
    reader = GGUFReader(path)
    with GGUFFile.open(path) as ours:
        assert [t.name for t in reader.tensors] == list(ours.tensors)
        assert {t.name: int(t.data_offset) for t in reader.tensors} == {
            name: info.offset for name, info in ours.tensors.items()
        }
        assert {t.name: t.tensor_type for t in reader.tensors} == {n: i.type for n, i in ours.tensors.items()}
    assert reader.fields["general.architecture"].contents() == "bert"


def test_minilm_sizes_shrink_with_the_type(minilm_gguf: Callable[[str], Path]) -> None:
    sizes = [minilm_gguf(out_type).stat().st_size for out_type in ("f32", "f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 85_000_000  # 22.7 M float32 parameters


def test_minilm_q4_0_holds_most_weights_in_q4_0(minilm_gguf: Callable[[str], Path]) -> None:
    with GGUFFile.open(minilm_gguf("q4_0")) as gguf_file:
        elements: dict[GGMLQuantizationType, int] = {}
        for info in gguf_file.tensors.values():
            elements[info.type] = elements.get(info.type, 0) + info.n_elements
        q4_0_roles = {name.split(".")[-2] for name, i in gguf_file.tensors.items() if i.type == Q4_0}
    assert elements[Q4_0] > 0.55 * sum(elements.values())
    assert q4_0_roles == {"token_embd", "attn_q", "attn_k"}


def test_minilm_tokenizer_loads_from_the_converted_file(minilm_gguf: Callable[[str], Path]) -> None:
    with GGUFFile.open(minilm_gguf("q4_0")) as gguf_file:
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
    assert tokenizer.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]


# -- a tiny synthetic checkpoint: every branch, fast ------------------------------------------------------
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]


def tiny_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": 16,
        "vocab_size": len(TINY_VOCAB),
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    }
    config.update(overrides)
    return config


def tiny_tensors(config: dict[str, Any], prefix: str = "", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, ff = config["hidden_size"], config["intermediate_size"]

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": rand(config["vocab_size"], n),
        "embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], n),
        "embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], n),
        "embeddings.LayerNorm.weight": rand(n),
        "embeddings.LayerNorm.bias": rand(n),
        "embeddings.position_ids": np.arange(config["max_position_embeddings"], dtype=np.int64)[None],
        "pooler.dense.weight": rand(n, n),
        "pooler.dense.bias": rand(n),
    }
    for layer in range(config["num_hidden_layers"]):
        base = f"encoder.layer.{layer}."
        for part, shape in (
            ("attention.self.query", (n, n)),
            ("attention.self.key", (n, n)),
            ("attention.self.value", (n, n)),
            ("attention.output.dense", (n, n)),
            ("intermediate.dense", (ff, n)),
            ("output.dense", (n, ff)),
        ):
            tensors[f"{base}{part}.weight"] = rand(*shape)
            tensors[f"{base}{part}.bias"] = rand(shape[0])
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{base}{norm}.weight"] = rand(n)
            tensors[f"{base}{norm}.bias"] = rand(n)
    return {prefix + name: value for name, value in tensors.items()}


def write_tiny(
    directory: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    vocab: list[str] | None = None,
) -> Path:
    config = tiny_config() if config is None else config
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(tiny_tensors(config) if tensors is None else tensors, str(directory / "model.safetensors"))
    (directory / "vocab.txt").write_text(
        "\n".join(TINY_VOCAB if vocab is None else vocab) + "\n", encoding="utf-8"
    )
    return directory


@pytest.mark.parametrize("out_type", list(MATRIX_TYPE))
def test_tiny_checkpoint_converts_with_llama_cpp_rules(tmp_path: Path, out_type: str) -> None:
    """vocab.txt only (no tokenizer files, no sentence-transformers config): defaults fill the gaps."""
    source = write_tiny(tmp_path / "tiny")
    out = tmp_path / "tiny.gguf"
    convert(source, out, out_type)
    with GGUFFile.open(out) as gguf_file:
        meta = gguf_file.metadata
        assert set(gguf_file.tensors) == expected_names(2)
        assert all(info.type == expected_type(n, info.ne, out_type) for n, info in gguf_file.tensors.items())
        assert meta["general.name"] == "tiny"
        assert meta["bert.pooling_type"] == PoolingType.MEAN
        assert meta["tokenizer.ggml.pre"] == "default"
        assert KEY_MAX_SEQ_LENGTH not in meta
        roles = ("bos", "seperator", "unknown", "padding")
        assert [meta[f"tokenizer.ggml.{role}_token_id"] for role in roles] == [2, 3, 1, 0]
        tokens = meta["tokenizer.ggml.tokens"]
        assert isinstance(tokens, LazyArray)
        assert list(tokens) == [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "▁hello", "▁world", "s", "▁!",
        ]  # fmt: skip
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
        assert tokenizer.encode("Hellos world!") == [2, 5, 7, 6, 8, 3]
        assert tokenizer.max_length == 16


def test_unblockable_rows_fall_back_to_f16(tmp_path: Path) -> None:
    """A row that is no whole number of 32-blocks is stored F16, as llama.cpp's QuantError fallback does."""
    source = write_tiny(tmp_path / "tiny", tiny_config(hidden_size=48, intermediate_size=64))
    convert(source, tmp_path / "out.gguf", "q8_0")
    with GGUFFile.open(tmp_path / "out.gguf") as gguf_file:
        assert gguf_file.tensors["blk.0.attn_q.weight"].type == F16  # rows of 48
        assert gguf_file.tensors["blk.0.ffn_down.weight"].type == Q8_0  # rows of 64


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


def test_sentence_transformers_files_set_pooling_and_truncation(tmp_path: Path) -> None:
    source = write_tiny(tmp_path / "st")
    (source / "modules.json").write_text(
        json.dumps([{"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}]),
        encoding="utf-8",
    )
    (source / "pool").mkdir()
    (source / "pool" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}), encoding="utf-8"
    )
    (source / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}), encoding="utf-8")
    (source / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    convert(source, tmp_path / "st.gguf", "f16", name="custom")
    with GGUFFile.open(tmp_path / "st.gguf") as gguf_file:
        meta = gguf_file.metadata
        assert meta["general.name"] == "custom"
        assert meta["bert.pooling_type"] == PoolingType.CLS
        assert meta[KEY_MAX_SEQ_LENGTH] == 8
        assert meta[KEY_LOWERCASE] is False
        assert WordPieceTokenizer.from_gguf(gguf_file).max_length == 8


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_tiny(tmp_path / "tiny")
    out = tmp_path / "cli.gguf"
    assert cli_main(["convert", str(source), str(out), "--type", "q4_0"]) == 0
    assert "cli.gguf" in capsys.readouterr().out
    with GGUFFile.open(out) as gguf_file:
        assert gguf_file.metadata["general.file_type"] == LlamaFileType.MOSTLY_Q4_0


def test_cli_reports_bad_input_as_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "x.gguf")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


# -- bad input: a clear GGUFSandboxError, nothing half-written -------------------------------------------
def _without(name: str) -> Callable[[Path], None]:
    def remove(directory: Path) -> None:
        (directory / name).unlink()

    return remove


def _config(**overrides: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(tiny_config(**overrides)), encoding="utf-8")

    return change


def _tensors(change: Callable[[dict[str, np.ndarray]], object]) -> Callable[[Path], None]:
    def rewrite(directory: Path) -> None:
        tensors = tiny_tensors(tiny_config())
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"))

    return rewrite


def _set(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[name][0, 5] = value

    return change


def _pytorch_only(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def _write(name: str, text: str) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / name).write_text(text, encoding="utf-8")

    return write


# What an earlier conversion left at OUT (only its GGUF magic matters): the one kind of file convert replaces.
EARLIER_GGUF = b"GGUF earlier output"

BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (_without("config.json"), "config.json is missing"),
    "config-not-json": (_write("config.json", "{not json"), "not valid JSON"),
    "llama-config": (_config(architectures=["LlamaForCausalLM"], model_type="llama"), "not a BERT encoder"),
    "missing-hparam": (_config(num_hidden_layers=None), "num_hidden_layers"),
    "heads-do-not-divide": (_config(num_attention_heads=3), "not a multiple"),
    "relative-positions": (_config(position_embedding_type="relative_key"), "position_embedding_type"),
    "no-vocab": (_without("vocab.txt"), "vocab.txt is missing"),
    "vocab-too-big": (_config(vocab_size=4), "vocab_size 4"),
    "vocab-without-cls": (_write("vocab.txt", "[PAD]\n[UNK]\nhello\n"), "lacks"),
    "no-safetensors": (_pytorch_only, "pytorch_model.bin"),
    "corrupt-safetensors": (_write("model.safetensors", "garbage"), "safetensors header"),
    "missing-tensor": (_tensors(lambda t: t.pop("encoder.layer.1.output.dense.weight")), "lacks 1 tensor"),
    "wrong-shape": (
        _tensors(
            lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((8, 64), np.float32)})
        ),
        "disagree",
    ),
    "unknown-tensor": (
        _tensors(lambda t: t.update({"extra.weight": np.zeros((2, 64), np.float32)})),
        "no llama",
    ),
    "classifier-head": (
        _tensors(lambda t: t.update({"classifier.weight": np.zeros((2, 64), np.float32)})),
        "not supported",
    ),
    "int-weights": (
        _tensors(lambda t: t.update({"embeddings.LayerNorm.bias": np.zeros(64, np.int32)})),
        "only F32/F16/F64",
    ),
    "weights-nan": (_tensors(_set("encoder.layer.1.output.dense.weight", np.nan)), "holds NaN or infinite"),
    "weights-inf": (_tensors(_set("embeddings.word_embeddings.weight", -np.inf)), "holds NaN or infinite"),
    "weights-f64-beyond-float32": (
        _tensors(
            lambda t: t.update({"embeddings.LayerNorm.bias": np.full(64, 1e300, np.float64)}),
        ),
        "holds NaN or infinite values .or F64 values beyond float32.",
    ),
    "cls-pooling-unsupported": (
        _write("1_Pooling/config.json", '{"pooling_mode_max_tokens": true}'),
        "pooling",
    ),
}


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_checkpoint_is_a_clear_error_and_leaves_no_file(tmp_path: Path, label: str) -> None:
    break_it, message = BAD_INPUTS[label]
    source = write_tiny(tmp_path / "src")
    (source / "1_Pooling").mkdir()
    break_it(source)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(EARLIER_GGUF)
    with pytest.raises(GGUFSandboxError, match=message):
        convert(source, out, "q8_0")
    assert out.read_bytes() == EARLIER_GGUF
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize(
    ("make_source", "out_type", "message"),
    [
        (lambda p: p / "does-not-exist", "f16", "not a directory"),
        (lambda p: write_tiny(p / "tiny"), "q5_k", "unknown output type"),
    ],
    ids=["missing-directory", "unknown-type"],
)
def test_bad_arguments(
    tmp_path: Path, make_source: Callable[[Path], Path], out_type: str, message: str
) -> None:
    with pytest.raises(GGUFSandboxError, match=message):
        convert(make_source(tmp_path), tmp_path / "x.gguf", out_type)


# -- hostile inputs: one line through the CLI (exit 2), OUT and the checkpoint untouched --------------------
def _write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / name).write_bytes(data)

    return write


def _json(name: str, content: object) -> Callable[[Path], None]:
    return _write(name, json.dumps(content))


DEEP = "[" * 100_000 + "]" * 100_000
POOLING = "sentence_transformers.models.Pooling"

HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # config.json: unreadable as JSON
    "config-not-utf8": (
        _write_bytes("config.json", b'{"model_type": "bert\xff"}'),
        "not UTF-8 text (byte 0xff",
    ),
    "config-5000-digit-int": (_write("config.json", '{"vocab_size": ' + "9" * 5000 + "}"), "number too long"),
    "config-deep-nesting": (_write("config.json", DEEP), "nested too deeply"),
    "config-an-array": (_write("config.json", "[]"), "expected an object, found an array"),
    "config-huge": (_write("config.json", '{"x": "' + "x" * (5 << 20) + '"}'), "larger than 4 MiB"),
    # config.json: fields of the wrong type
    "architectures-a-number": (_config(architectures=5), "architectures is 5, expected an array"),
    "architectures-of-numbers": (_config(architectures=[5]), "architectures must be an array of strings"),
    "model-type-an-array": (_config(architectures=None, model_type=["bert"]), "model_type is an array"),
    "hidden-size-true": (_config(hidden_size=True), "non-integer hidden_size"),
    "type-vocab-size-float": (_config(type_vocab_size=2.0), "type_vocab_size is 2.0, expected an integer"),
    "position-type-a-number": (_config(position_embedding_type=1), "position_embedding_type is 1, expected"),
    "layer-norm-eps-string": (_config(layer_norm_eps="x"), "layer_norm_eps is 'x'; it must be a finite"),
    "layer-norm-eps-null": (_config(layer_norm_eps=None), "layer_norm_eps is null"),
    "layer-norm-eps-true": (_config(layer_norm_eps=True), "layer_norm_eps is true"),
    "layer-norm-eps-nan": (_config(layer_norm_eps=float("nan")), "layer_norm_eps is nan; it must be"),
    "layer-norm-eps-inf": (_config(layer_norm_eps=float("inf")), "layer_norm_eps is inf"),
    "layer-norm-eps-negative": (_config(layer_norm_eps=-1e-5), "layer_norm_eps is -1e-05"),
    "layer-norm-eps-zero": (_config(layer_norm_eps=0), "layer_norm_eps is 0"),
    "layer-norm-eps-below-float32": (_config(layer_norm_eps=1e-50), "float32 can hold"),
    "layer-norm-eps-above-float32": (_config(layer_norm_eps=1e39), "float32 can hold"),
    "layer-norm-eps-400-digits": (_config(layer_norm_eps=10**400), "float32 can hold"),
    "layer-norm-epsilon-string": (
        _config(layer_norm_eps=None, layer_norm_epsilon="1e-12"),
        "layer_norm_eps is null",  # layer_norm_eps wins when present, as in HF configs
    ),
    # config.json's counts: bounded, and checked against model.safetensors before anything is sized by them
    "vocab-size-10**15": (_config(vocab_size=10**15), "vocab_size 1000000000000000 is out of range; a BERT"),
    "layers-10**9": (_config(num_hidden_layers=10**9), "num_hidden_layers 1000000000 is out of range"),
    "layers-1e9": (_config(num_hidden_layers=1e9), "non-integer num_hidden_layers"),
    "hidden-size-negative": (_config(hidden_size=-64), "hidden_size -64 is out of range"),
    "heads-zero": (_config(num_attention_heads=0), "num_attention_heads 0 is out of range"),
    "type-vocab-size-zero": (_config(type_vocab_size=0), "type_vocab_size 0 is out of range"),
    "positions-2**40": (
        _config(max_position_embeddings=2**40),
        "max_position_embeddings 1099511627776 is out",
    ),
    "vocab-size-not-the-tensors": (
        _config(vocab_size=2_000_000),
        "vocab_size 2000000 and hidden_size 64, but ",  # then model.safetensors's shape [9, 64]
    ),
    "layers-not-the-tensors": (
        _config(num_hidden_layers=200),
        "holds 2 encoder layer(s) (0, 1); the weights",
    ),
    "fewer-layers-in-config": (_config(num_hidden_layers=1), "num_hidden_layers 1, but"),
    "layers-numbered-oddly": (
        _tensors(
            lambda t: t.update(
                {k.replace("layer.1.", "layer.7."): t.pop(k) for k in list(t) if "layer.1." in k}
            )
        ),
        "holds 2 encoder layer(s) (0, 7)",
    ),
    "no-word-embeddings": (
        _tensors(lambda t: t.pop("embeddings.word_embeddings.weight")),
        "has no embeddings.word_embeddings.weight",
    ),
    # vocab.txt and the other files
    "vocab-not-utf8": (
        _write_bytes("vocab.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n\xfe\n"),
        "vocab.txt: not UTF-8",
    ),
    "vocab-huge": (_write_bytes("vocab.txt", b"a\n" * (17 << 20)), "larger than 32 MiB"),
    "vocab-many-short-lines": (_write_bytes("vocab.txt", b"\n" * 100), "has 100 tokens but config.json says"),
    "modules-an-object": (_write("modules.json", "{}"), "modules.json: expected an array, found an object"),
    "tokenizer-json-deep": (_write("tokenizer.json", DEEP), "tokenizer.json: JSON nested too deeply"),
    "tokenizer-config-not-utf8": (_write_bytes("tokenizer_config.json", b'{"\x80": 1}'), "not UTF-8"),
    "special-tokens-map-bad-json": (_write("special_tokens_map.json", "{"), "not valid JSON"),
    "sentence-bert-config-long-int": (
        _write("sentence_bert_config.json", '{"max_seq_length": ' + "1" * 5000 + "}"),
        "number too long",
    ),
    "pooling-config-an-array": (_write("1_Pooling/config.json", "[1]"), "expected an object, found an array"),
    # fields of the tokenizer and sentence-transformers files, of the wrong type
    "added-tokens-a-number": (_json("tokenizer.json", {"added_tokens": 5}), "added_tokens is 5, expected an"),
    "added-token-a-number": (
        _json("tokenizer.json", {"added_tokens": [5]}),
        "added_tokens[0] is 5, expected",
    ),
    "added-token-content-a-number": (
        _json("tokenizer.json", {"added_tokens": [{"id": 1, "content": 5}]}),
        "content is 5, expected a string",
    ),
    "added-token-negative-id": (
        _json("tokenizer.json", {"added_tokens": [{"id": -1, "content": "[UNK]"}]}),
        "added_tokens[0] has id -1, expected a token id ≥ 0",
    ),
    "added-token-special-a-string": (
        _json("tokenizer.json", {"added_tokens": [{"id": 1, "content": "[UNK]", "special": "yes"}]}),
        "special is 'yes', expected true or false",
    ),
    "added-tokens-decoder-an-array": (
        _json("tokenizer_config.json", {"added_tokens_decoder": []}),
        "added_tokens_decoder is an array, expected an object",
    ),
    "special-token-a-number": (
        _json("tokenizer_config.json", {"cls_token": 5}),
        "cls_token is 5, expected a",
    ),
    "special-token-content-a-number": (
        _json("special_tokens_map.json", {"sep_token": {"content": 5}}),
        "special_tokens_map.json: content is 5, expected a string",
    ),
    "do-lower-case-a-string": (
        _json("tokenizer_config.json", {"do_lower_case": "false"}),
        "do_lower_case is 'false', expected true or false",
    ),
    "strip-accents-a-number": (_json("tokenizer_config.json", {"strip_accents": 0}), "strip_accents is 0"),
    "normalizer-a-string": (
        _json("tokenizer.json", {"normalizer": "x"}),
        "normalizer is 'x', expected an obj",
    ),
    "normalizers-a-number": (
        _json("tokenizer.json", {"normalizer": {"type": "Sequence", "normalizers": 5}}),
        "normalizers is 5, expected an array",
    ),
    "normalizers-of-numbers": (
        _json("tokenizer.json", {"normalizer": {"type": "Sequence", "normalizers": [5]}}),
        "a normalizer is 5, expected an object",
    ),
    "bert-normalizer-lowercase-a-string": (
        _json("tokenizer.json", {"normalizer": {"type": "BertNormalizer", "lowercase": "yes"}}),
        "lowercase is 'yes', expected true or false",
    ),
    "post-processor-a-string": (_json("tokenizer.json", {"post_processor": "x"}), "post_processor is 'x'"),
    "post-processor-template-of-numbers": (
        _json("tokenizer.json", {"post_processor": {"type": "TemplateProcessing", "single": [5, 6]}}),
        "gguf-py cannot read the special tokens of tokenizer.json/tokenizer_config.json (AttributeError: ",
    ),
    "chat-template-a-number": (
        _json("tokenizer_config.json", {"chat_template": 5}),
        "chat_template is 5, expected a string or an array of {name, template} objects",
    ),
    "chat-template-lone-surrogate": (
        _write("tokenizer_config.json", '{"chat_template": "x\\ud800"}'),
        "chat_template holds '\\ud800' at 1, which UTF-8 cannot encode",
    ),
    "config-token-id-negative": (_config(pad_token_id=-1), "pad_token_id is -1, expected a token id ≥ 0"),
    "config-token-id-true": (_config(pad_token_id=True), "pad_token_id is true, expected an integer"),
    "config-token-id-a-list": (_config(eos_token_id=[1, 2]), "eos_token_id is an array, expected an integer"),
    "modules-entry-a-number": (_json("modules.json", [5]), "modules.json: entry 0 is 5, expected an object"),
    "modules-type-a-number": (_json("modules.json", [{"type": 5}]), "type is 5, expected a string"),
    "modules-path-a-number": (_json("modules.json", [{"type": POOLING, "path": 5}]), "path is 5, expected"),
    "modules-path-escapes": (
        _json("modules.json", [{"type": POOLING, "path": "../../etc"}]),
        "the Pooling module's path '../../etc' leaves the checkpoint directory",
    ),
    "modules-path-absolute": (
        _json("modules.json", [{"type": POOLING, "path": "/etc"}]),
        "leaves the checkp",
    ),
    "pooling-mode-a-string": (
        _json("1_Pooling/config.json", {"pooling_mode_mean_tokens": "true"}),
        "pooling_mode_mean_tokens is 'true', expected true or false",
    ),
    "max-seq-length-a-string": (
        _json("sentence_bert_config.json", {"max_seq_length": "256"}),
        "max_seq_length is '256', expected an integer",
    ),
    "max-seq-length-one": (_json("sentence_bert_config.json", {"max_seq_length": 1}), "leaves no room"),
}


@pytest.mark.parametrize("label", list(HOSTILE_INPUTS))
def test_hostile_input_is_one_line_and_changes_nothing(
    tmp_path: Path, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    break_it, message = HOSTILE_INPUTS[label]
    source = write_tiny(tmp_path / "src")
    (source / "1_Pooling").mkdir()
    break_it(source)
    inputs = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(EARLIER_GGUF)
    assert cli_main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gguf-sandbox convert: error: "), err[:500]
    assert len(err) < 1000
    assert message in err
    assert out.read_bytes() == EARLIER_GGUF
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == inputs


def test_counts_are_checked_before_anything_is_sized_by_them(tmp_path: Path) -> None:
    """vocab_size 2,000,000 is within bounds but not what the weights hold: refused before the padding
    loop would make 2 million token strings (~150 MB)."""
    source = write_tiny(tmp_path / "src")
    _config(vocab_size=2_000_000)(source)

    def run() -> None:
        with pytest.raises(GGUFSandboxError, match="vocab_size 2000000"):
            convert(source, tmp_path / "out.gguf")

    assert traced_peak(run) < 5 << 20


def test_chat_template_files_are_not_read(tmp_path: Path) -> None:
    """gguf-py's SpecialVocab reads chat_template.jinja whole; convert runs it on checked copies only, so a
    256 MiB (sparse) template next to a tokenizer_config.json costs nothing."""
    source = write_tiny(tmp_path / "src")
    (source / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]"}), encoding="utf-8")
    with (source / "chat_template.jinja").open("wb") as handle:
        handle.truncate(256 << 20)

    def run() -> None:
        convert(source, tmp_path / "out.gguf", "f32")

    assert traced_peak(run) < 16 << 20
    with GGUFFile.open(tmp_path / "out.gguf") as gguf_file:
        assert "tokenizer.chat_template" not in gguf_file.metadata
        assert gguf_file.metadata["tokenizer.ggml.bos_token_id"] == 2


@pytest.mark.parametrize(
    ("normalizers", "lowercase"),
    [
        ([{"type": "Lowercase"}, {"type": "BertNormalizer", "lowercase": False}], False),
        ([{"type": "BertNormalizer", "lowercase": False}, {"type": "Lowercase"}], True),
        ([{"type": "Sequence", "normalizers": [{"type": "BertNormalizer", "lowercase": False}]}], False),
    ],
    ids=["later-bert-normalizer-wins", "later-lowercase-wins", "nested-sequence"],
)
def test_normalizer_sequences_are_read_in_order(
    tmp_path: Path, normalizers: list[dict[str, Any]], lowercase: bool
) -> None:
    source = write_tiny(tmp_path / "src")
    tokenizer = {"normalizer": {"type": "Sequence", "normalizers": normalizers}}
    (source / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    convert(source, tmp_path / "out.gguf", "f32")
    with GGUFFile.open(tmp_path / "out.gguf") as gguf_file:
        assert gguf_file.metadata[KEY_LOWERCASE] is lowercase


def test_name_must_be_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_tiny(tmp_path / "src")
    assert cli_main(["convert", str(source), str(tmp_path / "out.gguf"), "--name", "x\udcff"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "gguf-sandbox convert: error: --name holds '\\udcff' at 1, which UTF-8 cannot encode; "
        "pass a name in UTF-8\n"
    )
    assert not (tmp_path / "out.gguf").exists()


def test_non_utf8_paths_convert_and_print(tmp_path: Path) -> None:
    """A folder and OUT named with a non-UTF-8 byte: general.name gets "?" for it, the report \\xe9."""
    source = write_tiny(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9")))
    out = os.fsdecode(bytes(tmp_path) + b"/out\xe9.gguf")
    done = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "convert", str(source), out, "--type", "f32"],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.startswith(b"wrote " + bytes(tmp_path) + b"/out\\xe9.gguf (")
    with GGUFFile.open(Path(out)) as gguf_file:
        assert gguf_file.metadata["general.name"] == "caf?"


# -- hostile OUT: refused in one line (exit 2), nothing replaced, no partial file left ---------------------
def _mknod_null(path: Path) -> None:
    """A character device like /dev/null (1, 3), made in the test's own directory — never a real /dev path."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod of a character device needs root (CAP_MKNOD)")


def _regular(content: bytes) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = tmp_path / "out.gguf"
        out.write_bytes(content)
        return out

    return make


def _node(kind: str) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = tmp_path / "out.gguf"
        if kind == "device":
            _mknod_null(out)
        elif kind == "fifo":
            os.mkfifo(out)
        elif kind == "directory":
            out.mkdir()
            (out / "keep.txt").write_text("mine", encoding="utf-8")
        else:  # a symlink to an earlier GGUF: replacing it would silently change what the link was
            (tmp_path / "target.gguf").write_bytes(EARLIER_GGUF)
            out.symlink_to(tmp_path / "target.gguf")
        return out

    return make


def _checkpoint_file(name: str) -> Callable[[Path, Path], Path]:
    def pick(tmp_path: Path, source: Path) -> Path:
        return source / name

    return pick


def _under_a_file(tmp_path: Path, source: Path) -> Path:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    return tmp_path / "notes.txt" / "out.gguf"


def _linked_input(tmp_path: Path, source: Path) -> Path:
    """OUT outside HF_DIR but the very file HF_DIR's tokenizer_config.json links to (starting as a GGUF)."""
    out = tmp_path / "shared.gguf"
    out.write_bytes(EARLIER_GGUF)
    (source / "tokenizer_config.json").symlink_to(out)
    return out


def _dangling_link(tmp_path: Path, source: Path) -> Path:
    out = tmp_path / "out.gguf"
    out.symlink_to(tmp_path / "gone.gguf")
    return out


def _in_checkpoint(name: str, content: bytes) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = source / name
        out.write_bytes(content)
        return out

    return make


HOSTILE_OUT: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "device-node": (_node("device"), "out.gguf: not a regular file; give the path of a GGUF file"),
    "fifo": (_node("fifo"), "out.gguf: not a regular file; give the path of a GGUF file"),
    "directory": (_node("directory"), "out.gguf: is a directory; give a file path such as "),
    "symlink": (_node("symlink"), "out.gguf: is a symbolic link; convert replaces a GGUF file itself"),
    "dangling-symlink": (_dangling_link, "out.gguf: a dangling symbolic link; remove it or choose another"),
    "not-gguf": (
        _regular(b"my notes"),
        "out.gguf: exists and is not a GGUF file; left untouched — choose another path or remove it",
    ),
    "empty-file": (_regular(b""), "exists and is not a GGUF file"),
    "checkpoint-weights": (
        _checkpoint_file("model.safetensors"),
        "is the checkpoint's model.safetensors, which convert reads; choose another path",
    ),
    "checkpoint-config": (_checkpoint_file("config.json"), "is the checkpoint's config.json, which convert"),
    # Absent, but convert (and transformers) would read a GGUF written there as the tokenizer next time.
    "absent-checkpoint-file": (_checkpoint_file("tokenizer.json"), "is the checkpoint's tokenizer.json"),
    "checkpoint-directory": (lambda tmp, source: source, "src: is a directory; give a file path such as "),
    "not-gguf-in-checkpoint": (_in_checkpoint("README.md", b"# my model"), "exists and is not a GGUF file"),
    "linked-input": (_linked_input, "is the checkpoint's tokenizer_config.json, which convert reads"),
    "missing-directory": (lambda tmp, source: tmp / "nowhere" / "out.gguf", "nowhere does not exist; create"),
    "file-as-directory": (_under_a_file, "notes.txt is not a directory; create the directory or choose"),
}


def _snapshot(path: Path) -> tuple[int, int, bytes | None, list[str]]:
    """What OUT is: its type, inode, bytes (regular files) and entries (directories)."""
    status = path.lstat()
    data = path.read_bytes() if stat.S_ISREG(status.st_mode) else None
    entries = sorted(p.name for p in path.iterdir()) if stat.S_ISDIR(status.st_mode) else []
    return stat.S_IFMT(status.st_mode), status.st_ino, data, entries


@pytest.mark.parametrize("label", list(HOSTILE_OUT))
def test_hostile_out_is_refused_and_left_alone(
    tmp_path: Path, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_out, message = HOSTILE_OUT[label]
    source = write_tiny(tmp_path / "src")
    out = make_out(tmp_path, source)
    before = _snapshot(out) if os.path.lexists(out) else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    sources = {p.name: p.read_bytes() for p in source.iterdir()}
    assert cli_main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gguf-sandbox convert: error: ")
    assert message in err
    assert (_snapshot(out) if os.path.lexists(out) else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no partial file
    assert {p.name: p.read_bytes() for p in source.iterdir()} == sources


def test_an_earlier_gguf_is_replaced(tmp_path: Path) -> None:
    source = write_tiny(tmp_path / "src")
    out = tmp_path / "out.gguf"
    out.write_bytes(EARLIER_GGUF)
    convert(source, out, "f32")
    with GGUFFile.open(out) as gguf_file:
        assert set(gguf_file.tensors) == expected_names(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src"]


def test_a_new_file_inside_the_checkpoint_is_written_and_then_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`convert minilm/ minilm/model.gguf`, as llama.cpp's converter writes into the model directory; a second
    run replaces that GGUF. The checkpoint's own files are left as they were."""
    source = write_tiny(tmp_path / "minilm")
    inputs = {p.name: p.read_bytes() for p in source.iterdir()}
    out = source / "model.gguf"
    for out_type in ("f32", "q8_0"):
        assert cli_main(["convert", str(source), str(out), "--type", out_type]) == 0
        assert capsys.readouterr().err == ""
        with GGUFFile.open(out) as gguf_file:
            assert gguf_file.metadata["general.file_type"] == FILE_TYPE[out_type]
            assert gguf_file.metadata["general.name"] == "minilm"
    assert sorted(p.name for p in source.iterdir()) == sorted([*inputs, "model.gguf"])
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.name != "model.gguf"} == inputs


@pytest.mark.parametrize("argv", [["", "out.gguf"], ["src", ""]], ids=["hf-dir", "out"])
def test_an_empty_path_is_refused(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty argument is no path ("" would be the current directory)."""
    write_tiny(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main(["convert", *argv]) == 2
    what = "HF_DIR" if argv[0] == "" else "OUT"
    assert capsys.readouterr().err == (
        f"gguf-sandbox convert: error: {what}: an empty path; give a file or directory name\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_an_out_name_of_255_bytes_converts(tmp_path: Path) -> None:
    """The partial file's name (".NAME.PID.RANDOM.partial") must fit NAME_MAX too."""
    source = write_tiny(tmp_path / "src")
    out = tmp_path / ("x" * 250 + ".gguf")
    convert(source, out, "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "src"])


def test_a_write_error_is_one_line_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk mid-write: the path and strerror in one line, the earlier GGUF kept, the partial gone."""
    source = write_tiny(tmp_path / "src")
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(EARLIER_GGUF)

    def disk_full(self: GGUFWriter, tensor: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", disk_full)
    assert cli_main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"gguf-sandbox convert: error: cannot write {out}: No space left on device\n"
    assert out.read_bytes() == EARLIER_GGUF
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
