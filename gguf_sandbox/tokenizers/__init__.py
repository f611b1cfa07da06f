"""Decoder-family tokenizers from GGUF metadata, matching llama.cpp's ids: from_gguf picks one by model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.base import Tokenizer
from gguf_sandbox.tokenizers.bpe import BPETokenizer
from gguf_sandbox.tokenizers.spm import SPMTokenizer

if TYPE_CHECKING:
    from gguf_sandbox.gguf.reader import GGUFFile

__all__ = ["LOADERS", "BPETokenizer", "SPMTokenizer", "Tokenizer", "from_gguf"]

# tokenizer.ggml.model → loader. BERT's WordPiece ("bert") lives in gguf_sandbox.embed.tokenizer.
LOADERS: Mapping[str, Callable[[GGUFFile], Tokenizer]] = MappingProxyType(
    {"gpt2": BPETokenizer.from_gguf, "llama": SPMTokenizer.from_gguf}
)


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
