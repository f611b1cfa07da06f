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

# What building a tokenizer holds at its peak, per token and per byte of token and merge text (kept once):
# tracemalloc's peak is 17.43 MB for gemma-3 (262,144 tokens, 4.4 MB of text; this estimate 20.1 MB) and
# 3.26 MB for SmolLM2 (49,152 tokens, 1.6 MB of text and merges; 4.55 MB), the same on Python 3.10–3.13.
# tests/tokenizers/test_real_models.py keeps the estimate above the peak and within 1.25x + 1 MiB: 64 and 2
# (25.6 MB for gemma-3) refused gemma-3's server in 64 MiB for 3.6 MB it did not need.
VOCAB_BYTES_PER_TOKEN = 60
VOCAB_BYTES_PER_TEXT_BYTE = 1

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
    return count * VOCAB_BYTES_PER_TOKEN + text * VOCAB_BYTES_PER_TEXT_BYTE


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
