"""Small synthetic tokenizer GGUFs: qwen2/qwen3-style byte-level BPE and SentencePiece vocabularies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gguf import GGUFWriter
from gguf.constants import TokenType

from gguf_sandbox.tokenizers.bpe import BYTE_TO_CHAR

# Merges of a tiny qwen2-style vocabulary, in rank order (GPT-2 characters: "Ġ" is a space, "Ċ" a newline).
QWEN_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "Ġ Ġ", "ĠĠ ĠĠ",
    "Ċ Ċ", "l l", "e ll", "h ell", "hell o", "H ell", "Hell o", "i s", "Ġ is", "Ġ th", "Ġth is", "' s",
    "Ġ ä", "ä ½", "ä½ ł", "å ¥", "å¥ ½",
)  # fmt: skip
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_USER_DEFINED = ("<think>", "</think>")


def qwen_tokens(user_defined: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """The 256 byte characters, each merge's result, then control and user-defined tokens."""
    tokens = [BYTE_TO_CHAR[byte] for byte in range(256)]
    tokens += [merge.replace(" ", "") for merge in QWEN_MERGES]
    types: list[int] = [TokenType.NORMAL] * len(tokens)
    tokens += [*QWEN_SPECIALS, *user_defined]
    types += [TokenType.CONTROL] * len(QWEN_SPECIALS) + [TokenType.USER_DEFINED] * len(user_defined)
    return tokens, types


def write_bpe(
    path: Path, *, pre: str = "qwen2", qwen3: bool = False, edit: Callable[[GGUFWriter], None] | None = None
) -> Path:
    """A qwen2-style (or, with `qwen3`, qwen3-style: <think> tokens user-defined) BPE vocabulary."""
    tokens, types = qwen_tokens(QWEN3_USER_DEFINED if qwen3 else ())
    writer = GGUFWriter(str(path), "qwen3" if qwen3 else "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(QWEN_MERGES))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    if edit is not None:
        edit(writer)
    return _finish(writer, path)


# A tiny SentencePiece vocabulary: <unk> <s> </s>, byte tokens, pieces with scores (higher merges first).
SPM_PIECES = (
    ("▁", -1.0), ("▁t", -2.0), ("he", -3.0), ("▁the", -1.5), ("▁a", -4.0), ("ll", -5.0), ("▁he", -6.0),
    ("llo", -7.0), ("▁hello", -2.5), ("▁w", -8.0), ("or", -9.0), ("ld", -10.0), ("▁wor", -11.0),
    ("▁world", -3.5), ("▁▁", -12.0), ("a", -20.0), ("b", -20.0), ("d", -20.0), ("e", -20.0), ("h", -20.0),
    ("l", -20.0), ("o", -20.0), ("r", -20.0), ("t", -20.0), ("w", -20.0), ("中", -21.0), ("ab", -13.0),
    ("bc", -13.0), ("c", -20.0), (">▁<", -14.0), (">", -20.0), ("<", -20.0),
)  # fmt: skip
SPM_USER_DEFINED = ("<start_of_image>", "\n", "\n\n")


def spm_tokens() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    scores += [0.0] * 256
    types += [TokenType.BYTE] * 256
    tokens += [piece for piece, _ in SPM_PIECES]
    scores += [score for _, score in SPM_PIECES]
    types += [TokenType.NORMAL] * len(SPM_PIECES)
    tokens += list(SPM_USER_DEFINED)
    scores += [0.0] * len(SPM_USER_DEFINED)
    types += [TokenType.USER_DEFINED] * len(SPM_USER_DEFINED)
    return tokens, scores, types


def write_spm(path: Path, *, edit: Callable[[GGUFWriter], None] | None = None) -> Path:
    tokens, scores, types = spm_tokens()
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if edit is not None:
        edit(writer)
    return _finish(writer, path)


def _finish(writer: GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
