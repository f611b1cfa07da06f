"""Which tokens llama.cpp splits out of raw text (special=false): user-defined ones, after its rules by text.

A token of type USER_DEFINED is matched in the raw text before tokenizing; CONTROL ones are not. But
llama.cpp re-types some tokens by their text when it loads a vocabulary (src/llama-vocab.cpp): names of
end-of-generation and fill-in-the-middle tokens become CONTROL, a few gpt-oss names USER_DEFINED, and
so on. These tables follow it, so that "</s>" in gemma-3 (user-defined, but an end-of-generation name)
stays plain text as it does in llama.cpp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.vocab import StringTable

# Names made CONTROL when the file sets no id for their role (llama.cpp takes the first it meets in hash
# order; we take them all, which differs only for a vocabulary holding two such names as user-defined).
BY_ROLE: Mapping[tuple[str, ...], tuple[str, ...]] = {
    (Keys.Tokenizer.EOT_ID,): (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
        "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
    ),
    (Keys.Tokenizer.EOM_ID,): ("<|eom_id|>",),
    (Keys.Tokenizer.FIM_PRE_ID, Keys.Tokenizer.PREFIX_ID): (
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
        "<|code_prefix|>", "<|prefix|>",
    ),
    (Keys.Tokenizer.FIM_SUF_ID, Keys.Tokenizer.SUFFIX_ID): (
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
        "<|code_suffix|>", "<|suffix|>",
    ),
    (Keys.Tokenizer.FIM_MID_ID, Keys.Tokenizer.MIDDLE_ID): (
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
        "<|code_middle|>", "<|middle|>",
    ),
    (Keys.Tokenizer.FIM_PAD_ID,): ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    (Keys.Tokenizer.FIM_REP_ID,): ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    (Keys.Tokenizer.FIM_SEP_ID,): ("<|file_sep|>",),
}  # fmt: skip
# End-of-generation names: always made CONTROL.
END_OF_GENERATION = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>",
    "[e~[",
)  # fmt: skip
# Always USER_DEFINED, whatever their type (llama.cpp's gpt-oss rule).
ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")
# general.name fragments for which llama.cpp strips whitespace around special tokens: not implemented.
STRIPPING_MODELS = ("phi-3", "phi3", "modern-bert")


def partition_tokens(
    metadata: Mapping[str, Any], tokens: StringTable, user_defined: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, int], ...]:
    """The (text, id) pairs llama.cpp matches in raw text with special=false, from the USER_DEFINED ones."""
    control: set[int] = set()
    for keys, names in BY_ROLE.items():
        if not any(_in_range(metadata.get(key), len(tokens)) for key in keys):
            control.update(_ids(tokens, names))
    control.update(_ids(tokens, END_OF_GENERATION))
    found = {token: text for text, token in user_defined if token not in control}
    for name, token in zip(
        ALWAYS_USER_DEFINED, _ids(tokens, ALWAYS_USER_DEFINED, keep_missing=True), strict=True
    ):
        if token >= 0:
            found[token] = name
    # Harmony / solar-open: "<|end|>" is not an end of generation there, but user-defined.
    present = {
        name
        for name in ("<|return|>", "<|call|>", "<|calls|>", "<|flush|>")
        if tokens.find(name.encode()) >= 0
    }
    calls = bool(present & {"<|call|>", "<|calls|>"})
    end = tokens.find(b"<|end|>")
    if end >= 0 and calls and present & {"<|return|>", "<|flush|>"}:
        found[end] = "<|end|>"
    # gemma-4 / plamo-2: "</s>" is a normal token when "<|tool_response>" ends generation instead.
    if tokens.find(b"<|tool_response>") >= 0:
        found.pop(tokens.find(b"</s>"), None)
    model_name = metadata.get(Keys.General.NAME)
    lowered = model_name.lower() if isinstance(model_name, str) else ""
    stripping = [fragment for fragment in STRIPPING_MODELS if fragment in lowered]
    if stripping and found:
        raise GGUFError(
            f"general.name {model_name!r}: llama.cpp strips whitespace around this model's special tokens "
            f"({stripping[0]} rule), which gguf-sandbox does not implement; its ids would differ"
        )
    return tuple(sorted(((text, token) for token, text in found.items()), key=lambda entry: entry[1]))


def _ids(tokens: StringTable, names: tuple[str, ...], *, keep_missing: bool = False) -> list[int]:
    ids = [tokens.find(name.encode()) for name in names]
    return ids if keep_missing else [token for token in ids if token >= 0]


def _in_range(value: object, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count
