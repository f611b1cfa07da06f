"""SentencePiece vocabularies (tokenizer.ggml.model = llama), merged as llama.cpp's llm_tokenizer_spm does.

llama.cpp does not run SentencePiece's algorithm: it splits the text (spaces escaped as "▁") into code
points and greedily merges the adjacent pair whose concatenation is the vocabulary token of highest
score (ties: leftmost), over the whole raw fragment; symbols no token covers become <0xNN> byte tokens.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from gguf.constants import GGUFValueType, Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.attributes import partition_tokens
from gguf_sandbox.tokenizers.base import PieceTokenizer
from gguf_sandbox.tokenizers.merge import candidate_key, merge_symbols
from gguf_sandbox.tokenizers.partition import MAX_PIECE_CHARS, PIECE_CHARS, Cutter, Partitioner
from gguf_sandbox.tokenizers.special import DEFAULTS, SpecialTokens, read_special_tokens
from gguf_sandbox.tokenizers.vocab import StringTable, Vocabulary, load_vocabulary, number_array

if TYPE_CHECKING:
    from gguf_sandbox.gguf.reader import GGUFFile

SPACE_MARK = "\u2581"
# Merge candidates are ranked by score (rank 0 = highest score), then leftmost: llama.cpp's order.
_NEVER = re.compile("(?!)")


class SPMTokenizer(PieceTokenizer):
    """Score-ordered bigram merges over each raw piece, byte fallback for what no token covers."""

    kind = "spm"

    def __init__(
        self,
        vocabulary: Vocabulary,
        special: SpecialTokens,
        partitioner: Partitioner,
        *,
        score_ranks: array[int],
        byte_tokens: tuple[int, ...],
        add_space_prefix: bool,
    ) -> None:
        super().__init__(vocabulary, special, partitioner)
        self._score_ranks = score_ranks
        self._byte_tokens = byte_tokens  # -1: the vocabulary cannot spell that byte
        self._add_space_prefix = add_space_prefix

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, *, piece_chars: int = PIECE_CHARS, max_piece_chars: int = MAX_PIECE_CHARS
    ) -> SPMTokenizer:
        """From a GGUF's tokenizer metadata; piece_chars/max_piece_chars size the raw pieces (partition)."""
        metadata = gguf.metadata
        vocabulary = load_vocabulary(metadata)
        scores = number_array(
            metadata, Keys.Tokenizer.SCORES, (GGUFValueType.FLOAT32, GGUFValueType.INT32), vocabulary.size
        )
        add_space_prefix = metadata.get(Keys.Tokenizer.ADD_PREFIX, True)
        if not isinstance(add_space_prefix, bool):
            raise GGUFError(
                f"{Keys.Tokenizer.ADD_PREFIX} is {add_space_prefix!r}, not a boolean; the file is corrupt"
            )
        special = read_special_tokens(metadata, DEFAULTS["llama"], vocabulary.size)
        cutter = Cutter(_space_cut(vocabulary.tokens), _same)
        specials = partition_tokens(metadata, vocabulary.tokens, vocabulary.user_defined)
        partitioner = Partitioner(specials, cutter, piece_chars=piece_chars, max_piece_chars=max_piece_chars)
        return cls(
            vocabulary,
            special,
            partitioner,
            score_ranks=_score_ranks(scores, vocabulary.size),
            byte_tokens=_byte_tokens(vocabulary.tokens),
            add_space_prefix=add_space_prefix,
        )

    @property
    def add_space_prefix(self) -> bool:
        return self._add_space_prefix

    def _piece_ids(self, text: str, after_special: bool) -> Iterator[int]:
        if self._add_space_prefix and after_special:
            text = " " + text
        data = text.replace(" ", SPACE_MARK).encode("utf-8", "surrogatepass")
        yield from self._merge(data, ascii_only=len(data) == len(text))

    def _merge(self, data: bytes, ascii_only: bool) -> list[int]:
        tokens = self._vocabulary.tokens
        starts = (
            list(range(len(data)))
            if ascii_only
            else [i for i, byte in enumerate(data) if byte & 0xC0 != 0x80]
        )
        ids: list[int] = []
        for text in merge_symbols(data, starts, self._candidate):
            token = tokens.find(text)
            if token >= 0:
                ids.append(token)
            else:
                ids.extend(self._byte_token(byte) for byte in text)
        return ids

    def _candidate(self, data: bytes, starts: list[int], length: list[int], left: int, right: int) -> int:
        """The heap key of merging two adjacent symbols, 0 when their concatenation is no token."""
        size = length[left] + length[right]
        token = self._vocabulary.tokens.find(data[starts[left] : starts[left] + size])
        if token < 0:
            return 0
        return candidate_key(int(self._score_ranks[token]), left, size)

    def _byte_token(self, byte: int) -> int:
        token = self._byte_tokens[byte]
        if token < 0:
            raise GGUFError(
                f"the vocabulary has neither <0x{byte:02X}> nor a one-byte token for byte 0x{byte:02X}, "
                f"which this text needs (llama.cpp fails on it too); its byte-fallback tokens are incomplete"
            )
        return token


def _score_ranks(scores: np.ndarray | None, count: int) -> array[int]:
    """Each token's place in descending score order (equal scores share a place); no scores: all 0."""
    if scores is None:
        return array("i", bytes(4 * count))
    values = scores.astype(np.float32)  # llama.cpp reads integer scores as float
    if np.isnan(values).any():
        raise GGUFError(
            f"{Keys.Tokenizer.SCORES} holds NaN; merges could not be ordered, the file is corrupt"
        )
    distinct, inverse = np.unique(values, return_inverse=True)
    return array("i", (len(distinct) - 1 - inverse).astype(np.int32).tobytes())


def _byte_tokens(tokens: StringTable) -> tuple[int, ...]:
    """llama.cpp's byte_to_token: the <0xNN> token, else the one-byte token, per byte."""
    found = []
    for byte in range(256):
        token = tokens.find(f"<0x{byte:02X}>".encode())
        found.append(token if token >= 0 else tokens.find(bytes((byte,))))
    return tuple(found)


def _space_cut(tokens: StringTable) -> re.Pattern[str]:
    """Where a raw piece can be cut: before a space (an escaped ▁) that no token joins to what precedes
    it. A token holding "x▁" after its start forbids cuts between x and a space; no merge ever spans a cut."""
    joined: set[str] = set()
    mark = SPACE_MARK.encode()
    for index in tokens.containing(mark):
        text = tokens[index].decode("utf-8", "replace")
        for position in range(1, len(text)):
            if text[position] == SPACE_MARK:
                joined.add(text[position - 1])
    if "\ufffd" in joined:  # a token we cannot read as text: cut nowhere rather than guess
        return _NEVER
    if SPACE_MARK in joined:
        joined.add(" ")
    before = f"[^{''.join(re.escape(char) for char in sorted(joined))}]" if joined else "(?s:.)"
    return re.compile(f"(?<={before})(?=[ {SPACE_MARK}])")


def _same(text: str) -> str:
    return text
