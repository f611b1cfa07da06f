"""Decoder-family tokenizers from GGUF metadata, matching llama.cpp's ids: from_gguf picks one by model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.tokenizers.base import Tokenizer
from gguf_sandbox.tokenizers.bpe import BPETokenizer
from gguf_sandbox.tokenizers.spm import SPMTokenizer

if TYPE_CHECKING:
    from gguf_sandbox.gguf.reader import GGUFFile

__all__ = ["LOADERS", "BPETokenizer", "SPMTokenizer", "Tokenizer", "from_gguf", "vocabulary_bytes"]

# What building a tokenizer holds at its peak: per token, and per byte of token and merge text (GGUF's
# strings with their 8-byte lengths), which it holds about twice over. tracemalloc's peak is 17.43 MB for
# gemma-3 (262,144 tokens, 4.41 MB of text; this estimate 19.4 MB), 3.26 MB for SmolLM2 (5.3 MB), the same
# on Python 3.10–3.13; a vocabulary of 2,259 tokens of ~4 KB peaks at 2.06 bytes per text byte.
# tests/tokenizers/test_vocabulary_bytes.py holds the estimate above the peak for real and hostile shapes.
# 64 and 2 (25.6 MB for gemma-3) refused gemma-3's server in 64 MiB for 3.6 MB it did not need.
VOCAB_BYTES_PER_TOKEN = 36
VOCAB_TEXT_SHARE = (9, 4)  # 2.25 bytes per text byte

# tokenizer.ggml.model → loader. BERT's WordPiece ("bert") lives in gguf_sandbox.embed.tokenizer.
LOADERS: Mapping[str, Callable[[GGUFFile], Tokenizer]] = MappingProxyType(
    {"gpt2": BPETokenizer.from_gguf, "llama": SPMTokenizer.from_gguf}
)


def vocabulary_bytes(gguf: GGUFFile) -> int:
    """Memory from_gguf() needs at its peak for the file's vocabulary (an upper estimate)."""
    tokens = gguf.metadata.get(Keys.Tokenizer.LIST)
    merges = gguf.metadata.get(Keys.Tokenizer.MERGES)
    count = len(tokens) if isinstance(tokens, LazyArray) else 0
    text = sum(array.nbytes for array in (tokens, merges) if isinstance(array, LazyArray))
    return count * VOCAB_BYTES_PER_TOKEN + text * VOCAB_TEXT_SHARE[0] // VOCAB_TEXT_SHARE[1]


def from_gguf(gguf: GGUFFile) -> Tokenizer:
    """The tokenizer a GGUF's metadata describes; a GGUFError names what is missing or unsupported."""
    model = gguf.metadata.get(Keys.Tokenizer.MODEL)
    loader = LOADERS.get(model) if isinstance(model, str) else None
    if loader is None:
        raise GGUFError(
            f"{Keys.Tokenizer.MODEL} is {model!r}: supported are 'gpt2' (byte-level BPE) and 'llama' "
            f"(SentencePiece); 'bert' (WordPiece) is gguf_sandbox.embed.tokenizer's"
        )
    return loader(gguf)
