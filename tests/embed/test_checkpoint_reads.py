"""A checkpoint's files read within bounds: too large, not UTF-8, not JSON, nested too deeply, a number too
long, not the JSON kind expected — one line each, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.embed.tiny_checkpoint import bad_checkpoint_test, hostile_input_test, write_bytes, write_text

DEEP = "[" * 100_000 + "]" * 100_000


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "config-not-json": (write_text("config.json", "{not json"), "not valid JSON"),
}


HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # config.json
    "config-not-utf8": (
        write_bytes("config.json", b'{"model_type": "bert\xff"}'),
        "not UTF-8 text (byte 0xff",
    ),
    "config-5000-digit-int": (
        write_text("config.json", '{"vocab_size": ' + "9" * 5000 + "}"),
        "number too long",
    ),
    "config-deep-nesting": (write_text("config.json", DEEP), "nested too deeply"),
    "config-an-array": (write_text("config.json", "[]"), "expected an object, found an array"),
    "config-huge": (write_text("config.json", '{"x": "' + "x" * (5 << 20) + '"}'), "larger than 4 MiB"),
    # vocab.txt and the other files
    "vocab-not-utf8": (
        write_bytes("vocab.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n\xfe\n"),
        "vocab.txt: not UTF-8",
    ),
    "vocab-huge": (write_bytes("vocab.txt", b"a\n" * (17 << 20)), "larger than 32 MiB"),
    "modules-an-object": (
        write_text("modules.json", "{}"),
        "modules.json: expected an array, found an object",
    ),
    "tokenizer-json-deep": (write_text("tokenizer.json", DEEP), "tokenizer.json: JSON nested too deeply"),
    "tokenizer-config-not-utf8": (write_bytes("tokenizer_config.json", b'{"\x80": 1}'), "not UTF-8"),
    "special-tokens-map-bad-json": (write_text("special_tokens_map.json", "{"), "not valid JSON"),
    "sentence-bert-config-long-int": (
        write_text("sentence_bert_config.json", '{"max_seq_length": ' + "1" * 5000 + "}"),
        "number too long",
    ),
    "pooling-config-an-array": (
        write_text("1_Pooling/config.json", "[1]"),
        "expected an object, found an array",
    ),
}


test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)
test_hostile_input_is_one_line_and_changes_nothing = hostile_input_test(HOSTILE_INPUTS)
