"""A tiny synthetic BERT checkpoint for convert's tests, the ways to break it, and the checks that a broken
one is refused — as one line through the command line — with nothing written or changed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from gguf_sandbox.cli import main as cli_main
from gguf_sandbox.embed.convert import convert
from gguf_sandbox.errors import GGUFSandboxError

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]
BLOCK_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
               "layer_output_norm")  # fmt: skip
# What an earlier conversion left at OUT (only its GGUF magic matters): the one kind of file convert replaces.
EARLIER_GGUF = b"GGUF earlier output"


def expected_names(n_layers: int) -> set[str]:
    names = {"token_embd.weight", "position_embd.weight", "token_types.weight"}
    names |= {"token_embd_norm.weight", "token_embd_norm.bias"}
    for block in range(n_layers):
        names |= {f"blk.{block}.{part}.{kind}" for part in BLOCK_PARTS for kind in ("weight", "bias")}
    return names


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


# -- ways to break it ------------------------------------------------------------------------------------
def without(name: str) -> Callable[[Path], None]:
    def remove(directory: Path) -> None:
        (directory / name).unlink()

    return remove


def with_config(**overrides: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(tiny_config(**overrides)), encoding="utf-8")

    return change


def with_tensors(change: Callable[[dict[str, np.ndarray]], object]) -> Callable[[Path], None]:
    def rewrite(directory: Path) -> None:
        tensors = tiny_tensors(tiny_config())
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"))

    return rewrite


def set_weight(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[name][0, 5] = value

    return change


def pytorch_only(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def write_text(name: str, text: str) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / name).write_text(text, encoding="utf-8")

    return write


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / name).write_bytes(data)

    return write


def write_json(name: str, content: object) -> Callable[[Path], None]:
    return write_text(name, json.dumps(content))


# -- refused, and nothing changed ------------------------------------------------------------------------
def check_bad_checkpoint(tmp_path: Path, break_it: Callable[[Path], None], message: str) -> None:
    """A clear GGUFSandboxError from convert(); the earlier GGUF at OUT left alone, nothing beside it."""
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


def check_hostile_input(
    tmp_path: Path, break_it: Callable[[Path], None], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line through the command line (exit 2); OUT and the checkpoint untouched, no partial file."""
    source = write_tiny(tmp_path / "src")
    (source / "1_Pooling").mkdir()
    break_it(source)
    inputs = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(EARLIER_GGUF)
    check_refused(source, out, message, capsys)
    assert out.read_bytes() == EARLIER_GGUF
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == inputs


def check_refused(source: Path, out: Path, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`gguf-sandbox convert SOURCE OUT` exits 2 with one short line of error that holds `message`."""
    assert cli_main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gguf-sandbox convert: error: "), err[:500]
    assert len(err) < 1000
    assert message in err


Refusals = Mapping[str, tuple[Callable[[Path], None], str]]


# Each module's tables of broken checkpoints get these two tests: pytest collects them by the names they are
# assigned to, `test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)`.
def bad_checkpoint_test(table: Refusals) -> Callable[[Path, str], None]:
    @pytest.mark.parametrize("label", list(table))
    def test(tmp_path: Path, label: str) -> None:
        check_bad_checkpoint(tmp_path, *table[label])

    return test


def hostile_input_test(table: Refusals) -> Callable[[Path, str, pytest.CaptureFixture[str]], None]:
    @pytest.mark.parametrize("label", list(table))
    def test(tmp_path: Path, label: str, capsys: pytest.CaptureFixture[str]) -> None:
        check_hostile_input(tmp_path, *table[label], capsys)

    return test
