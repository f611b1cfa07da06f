"""llama.cpp's re-typing of tokens by their text, as it decides what special=false still splits out."""

from __future__ import annotations

import pytest
from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.attributes import partition_tokens
from gguf_sandbox.tokenizers.vocab import StringTable

TOKENS = ("a", "</s>", "<|fim_prefix|>", "<tool_call>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>")
USER_DEFINED = tuple(
    (text, index)
    for index, text in enumerate(TOKENS)
    if text in ("</s>", "<|fim_prefix|>", "<tool_call>", "<|end|>")
)


def split_out(metadata: dict[str, object], tokens: tuple[str, ...] = TOKENS) -> list[str]:
    table = StringTable.build((token.encode() for token in tokens), keep_last=True, what="t")
    user_defined = tuple(entry for entry in USER_DEFINED if entry[1] < len(tokens))
    return [text for text, _ in partition_tokens(metadata, table, user_defined)]


def test_end_of_generation_and_fim_names_become_control() -> None:
    # "</s>" ends generation; "<|fim_prefix|>" is taken as the FIM prefix (no id in the file);
    # "<|channel|>" is always user-defined (gpt-oss); "<|end|>" too when "<|return|>" and "<|call|>" exist.
    assert split_out({}) == ["<tool_call>", "<|channel|>", "<|end|>"]


def test_a_fim_id_in_the_file_keeps_the_name_user_defined() -> None:
    assert split_out({Keys.Tokenizer.FIM_PRE_ID: 2}) == [
        "<|fim_prefix|>",
        "<tool_call>",
        "<|channel|>",
        "<|end|>",
    ]
    assert split_out({Keys.Tokenizer.PREFIX_ID: 2})[0] == "<|fim_prefix|>"  # the deprecated key counts too
    assert split_out({Keys.Tokenizer.FIM_PRE_ID: 99})[0] == "<tool_call>"  # out of range: as if absent


def test_end_is_control_without_the_harmony_tokens() -> None:
    assert split_out({}, TOKENS[:6]) == ["<tool_call>", "<|channel|>"]


def test_stripping_models_are_refused_when_it_would_matter() -> None:
    with pytest.raises(GGUFError, match="phi-3 rule"):
        split_out({Keys.General.NAME: "Phi-3 Mini"})
    assert split_out({Keys.General.NAME: "Phi-3 Mini"}, ("a", "</s>")) == []
