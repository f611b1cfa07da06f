"""The Tokenizer protocol of decoder-family vocabularies, and the encode loop BPE and SPM share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from gguf_sandbox.tokenizers.partition import Partitioner
from gguf_sandbox.tokenizers.special import SpecialTokens
from gguf_sandbox.tokenizers.vocab import Vocabulary


class Tokenizer(Protocol):
    """Text to token ids as llama.cpp's tokenize(text.encode(), add_special, parse_special=false) gives."""

    @property
    def kind(self) -> str:
        """ "bpe" or "spm"."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special(self) -> SpecialTokens: ...

    def encode(self, text: str, *, add_special: bool = True, max_tokens: int | None = None) -> list[int]:
        """Ids of `text`, BOS/EOS added per the file when `add_special`; at most `max_tokens` ids in all
        (the text's are cut, BOS/EOS kept), and the work stops there."""
        ...


class PieceTokenizer:
    """Shared encode(): user-defined tokens split out, raw pieces tokenized by the subclass, BOS/EOS."""

    kind = "?"

    def __init__(self, vocabulary: Vocabulary, special: SpecialTokens, partitioner: Partitioner) -> None:
        self._vocabulary = vocabulary
        self._special = special
        self._partitioner = partitioner

    @property
    def vocab_size(self) -> int:
        return self._vocabulary.size

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def piece(self, token: int) -> bytes:
        """The vocabulary text of a token id, as stored."""
        if not 0 <= token < self._vocabulary.size:
            raise IndexError(f"token id {token} is outside the {self._vocabulary.size:,}-token vocabulary")
        return self._vocabulary.tokens[token]

    def encode(self, text: str, *, add_special: bool = True, max_tokens: int | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        prefix = self._special.prefix if add_special else ()
        suffix = self._special.suffix if add_special else ()
        if max_tokens is not None and max_tokens < len(prefix) + len(suffix):
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for the {len(prefix) + len(suffix)} BOS/EOS ids"
            )
        budget = None if max_tokens is None else max_tokens - len(prefix) - len(suffix)
        ids = list(prefix)
        after_special = True  # llama.cpp's SPM adds its space prefix to text that starts or follows a token
        for piece in self._partitioner.pieces(text):
            if budget is not None and len(ids) - len(prefix) >= budget:
                break
            if piece.token is not None:
                ids.append(piece.token)
                after_special = True
                continue
            for token in self._piece_ids(piece.text, after_special):
                ids.append(token)
                if budget is not None and len(ids) - len(prefix) >= budget:
                    break
            after_special = False
        if budget is not None:
            del ids[len(prefix) + budget :]
        ids.extend(suffix)
        return ids

    def _piece_ids(self, text: str, after_special: bool) -> Iterator[int]:
        raise NotImplementedError
