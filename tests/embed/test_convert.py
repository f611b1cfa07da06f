"""HF BERT → GGUF converter: llama.cpp's metadata, names, types, layout; both readers open it; the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType, LlamaFileType, PoolingType, TokenType
from safetensors import safe_open

from gguf_sandbox.cli import main as cli_main
from gguf_sandbox.embed.convert import convert
from gguf_sandbox.embed.tokenizer import KEY_LOWERCASE, KEY_MAX_SEQ_LENGTH, WordPieceTokenizer
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.tiny_checkpoint import expected_names, write_tiny

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
# Largest |dequantized - source| per tensor, relative to the tensor's largest |value|.
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15}


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


def test_minilm_tokenizer_loads_from_the_converted_file(minilm_gguf: Callable[[str], Path]) -> None:
    with GGUFFile.open(minilm_gguf("q4_0")) as gguf_file:
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
    assert tokenizer.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]


# -- a tiny synthetic checkpoint: every branch, fast ------------------------------------------------------
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
