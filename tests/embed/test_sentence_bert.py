"""sentence-transformers' files: the pooling mode and max_seq_length convert records; fields it refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gguf.constants import PoolingType

from gguf_sandbox.embed.convert import convert
from gguf_sandbox.embed.tokenizer import KEY_LOWERCASE, KEY_MAX_SEQ_LENGTH, WordPieceTokenizer
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.tiny_checkpoint import (
    bad_checkpoint_test,
    hostile_input_test,
    write_json,
    write_text,
    write_tiny,
)

POOLING = "sentence_transformers.models.Pooling"


def test_sentence_transformers_files_set_pooling_and_truncation(tmp_path: Path) -> None:
    source = write_tiny(tmp_path / "st")
    (source / "modules.json").write_text(
        json.dumps([{"idx": 1, "name": "1", "path": "pool", "type": POOLING}]),
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


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "cls-pooling-unsupported": (
        write_text("1_Pooling/config.json", '{"pooling_mode_max_tokens": true}'),
        "pooling",
    ),
}


HOSTILE_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "modules-entry-a-number": (
        write_json("modules.json", [5]),
        "modules.json: entry 0 is 5, expected an object",
    ),
    "modules-type-a-number": (write_json("modules.json", [{"type": 5}]), "type is 5, expected a string"),
    "modules-path-a-number": (
        write_json("modules.json", [{"type": POOLING, "path": 5}]),
        "path is 5, expected",
    ),
    "modules-path-escapes": (
        write_json("modules.json", [{"type": POOLING, "path": "../../etc"}]),
        "the Pooling module's path '../../etc' leaves the checkpoint directory",
    ),
    "modules-path-absolute": (
        write_json("modules.json", [{"type": POOLING, "path": "/etc"}]),
        "leaves the checkp",
    ),
    "pooling-mode-a-string": (
        write_json("1_Pooling/config.json", {"pooling_mode_mean_tokens": "true"}),
        "pooling_mode_mean_tokens is 'true', expected true or false",
    ),
    "max-seq-length-a-string": (
        write_json("sentence_bert_config.json", {"max_seq_length": "256"}),
        "max_seq_length is '256', expected an integer",
    ),
    "max-seq-length-one": (write_json("sentence_bert_config.json", {"max_seq_length": 1}), "leaves no room"),
}


test_bad_checkpoint_is_a_clear_error_and_leaves_no_file = bad_checkpoint_test(BAD_INPUTS)
test_hostile_input_is_one_line_and_changes_nothing = hostile_input_test(HOSTILE_INPUTS)
