"""vocab.txt and the tokenizer files: the vocabulary, normalizer flags and special tokens convert writes, and
the fields it refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.embed.convert import convert
from gguf_sandbox.embed.tokenizer import KEY_LOWERCASE
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.conftest import traced_peak
from tests.embed.tiny_checkpoint import (
    bad_checkpoint_test,
    hostile_input_test,
    with_config,
    without,
    write_bytes,
    write_json,
    write_text,
    write_tiny,
)

BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-vocab": (without("vocab.txt"), "vocab.txt is missing"),
    "vocab-too-big": (with_config(vocab_size=4), "vocab_size 4"),
    "vocab-without-cls": (write_text("vocab.txt", "[PAD]\n[UNK]\nhello\n"), "lacks"),
}


HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "vocab-many-short-lines": (write_bytes("vocab.txt", b"\n" * 100), "has 100 tokens but config.json says"),
    # fields of the tokenizer files (and config.json's *_token_id), of the wrong type
    "added-tokens-a-number": (
        write_json("tokenizer.json", {"added_tokens": 5}),
        "added_tokens is 5, expected an",
    ),
    "added-token-a-number": (
        write_json("tokenizer.json", {"added_tokens": [5]}),
        "added_tokens[0] is 5, expected",
    ),
    "added-token-content-a-number": (
        write_json("tokenizer.json", {"added_tokens": [{"id": 1, "content": 5}]}),
        "content is 5, expected a string",
    ),
    "added-token-negative-id": (
        write_json("tokenizer.json", {"added_tokens": [{"id": -1, "content": "[UNK]"}]}),
        "added_tokens[0] has id -1, expected a token id ≥ 0",
    ),
    "added-token-special-a-string": (
        write_json("tokenizer.json", {"added_tokens": [{"id": 1, "content": "[UNK]", "special": "yes"}]}),
        "special is 'yes', expected true or false",
    ),
    "added-tokens-decoder-an-array": (
        write_json("tokenizer_config.json", {"added_tokens_decoder": []}),
        "added_tokens_decoder is an array, expected an object",
    ),
    "special-token-a-number": (
        write_json("tokenizer_config.json", {"cls_token": 5}),
        "cls_token is 5, expected a",
    ),
    "special-token-content-a-number": (
        write_json("special_tokens_map.json", {"sep_token": {"content": 5}}),
        "special_tokens_map.json: content is 5, expected a string",
    ),
    "do-lower-case-a-string": (
        write_json("tokenizer_config.json", {"do_lower_case": "false"}),
        "do_lower_case is 'false', expected true or false",
    ),
    "strip-accents-a-number": (
        write_json("tokenizer_config.json", {"strip_accents": 0}),
        "strip_accents is 0",
    ),
    "normalizer-a-string": (
        write_json("tokenizer.json", {"normalizer": "x"}),
        "normalizer is 'x', expected an obj",
    ),
    "normalizers-a-number": (
        write_json("tokenizer.json", {"normalizer": {"type": "Sequence", "normalizers": 5}}),
        "normalizers is 5, expected an array",
    ),
    "normalizers-of-numbers": (
        write_json("tokenizer.json", {"normalizer": {"type": "Sequence", "normalizers": [5]}}),
        "a normalizer is 5, expected an object",
    ),
    "bert-normalizer-lowercase-a-string": (
        write_json("tokenizer.json", {"normalizer": {"type": "BertNormalizer", "lowercase": "yes"}}),
        "lowercase is 'yes', expected true or false",
    ),
    "post-processor-a-string": (
        write_json("tokenizer.json", {"post_processor": "x"}),
        "post_processor is 'x'",
    ),
    "post-processor-template-of-numbers": (
        write_json("tokenizer.json", {"post_processor": {"type": "TemplateProcessing", "single": [5, 6]}}),
        "gguf-py cannot read the special tokens of tokenizer.json/tokenizer_config.json (AttributeError: ",
    ),
    "chat-template-a-number": (
        write_json("tokenizer_config.json", {"chat_template": 5}),
        "chat_template is 5, expected a string or an array of {name, template} objects",
    ),
    "chat-template-lone-surrogate": (
        write_text("tokenizer_config.json", '{"chat_template": "x\\ud800"}'),
        "chat_template holds '\\ud800' at 1, which UTF-8 cannot encode",
    ),
    "config-token-id-negative": (with_config(pad_token_id=-1), "pad_token_id is -1, expected a token id ≥ 0"),
    "config-token-id-true": (with_config(pad_token_id=True), "pad_token_id is true, expected an integer"),
    "config-token-id-a-list": (
        with_config(eos_token_id=[1, 2]),
        "eos_token_id is an array, expected an integer",
    ),
}


test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)
test_hostile_input_is_one_line_and_changes_nothing = hostile_input_test(HOSTILE_INPUTS)


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
