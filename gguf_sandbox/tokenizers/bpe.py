"""Byte-level BPE (tokenizer.ggml.model = gpt2), merged as llama.cpp's llm_tokenizer_bpe merges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.attributes import partition_tokens
from gguf_sandbox.tokenizers.base import PieceTokenizer
from gguf_sandbox.tokenizers.merge import candidate_key, merge_symbols
from gguf_sandbox.tokenizers.partition import MAX_PIECE_CHARS, PIECE_CHARS, Partitioner
from gguf_sandbox.tokenizers.pretokenize import BPE_CUTTER, PreTokenizer, pre_tokenizer
from gguf_sandbox.tokenizers.special import DEFAULTS, SpecialTokens, read_special_tokens
from gguf_sandbox.tokenizers.vocab import StringTable, Vocabulary, load_vocabulary, string_array

if TYPE_CHECKING:
    from gguf_sandbox.gguf.reader import GGUFFile


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte-to-character map: printable Latin-1 bytes stand for themselves, the other
    68 for U+0100 onwards in byte order (so a space is "Ġ" and a newline "Ċ")."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    mapping: dict[int, str] = {}
    stand_ins = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(0x100 + stand_ins)
            stand_ins += 1
    return mapping


# str.translate table for a word decoded as Latin-1 (one character per byte).
BYTE_TO_CHAR = _byte_chars()
WORD_CACHE_ENTRIES = 1 << 12


class BPETokenizer(PieceTokenizer):
    """Words from the pre-tokenizer, byte-encoded, merged by rank; unknown symbols fall back to bytes."""

    kind = "bpe"

    def __init__(
        self,
        vocabulary: Vocabulary,
        merges: StringTable,
        pre: PreTokenizer,
        special: SpecialTokens,
        partitioner: Partitioner,
    ) -> None:
        super().__init__(vocabulary, special, partitioner)
        self._merges = merges
        self._pre = pre
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, *, piece_chars: int = PIECE_CHARS, max_piece_chars: int = MAX_PIECE_CHARS
    ) -> BPETokenizer:
        """From a GGUF's tokenizer metadata; piece_chars/max_piece_chars size the raw pieces (partition)."""
        metadata = gguf.metadata
        pre = pre_tokenizer(metadata.get(Keys.Tokenizer.PRE))
        vocabulary = load_vocabulary(metadata)
        merges = string_array(metadata, Keys.Tokenizer.MERGES)
        if merges is None:
            raise GGUFError(f"{Keys.Tokenizer.MERGES} is missing; a gpt2 (BPE) vocabulary needs its merges")
        table = StringTable.build(merges.iter_bytes(), keep_last=False, what=Keys.Tokenizer.MERGES)
        special = read_special_tokens(metadata, DEFAULTS["gpt2"], vocabulary.size, add_bos=pre.add_bos)
        specials = partition_tokens(metadata, vocabulary.tokens, vocabulary.user_defined)
        partitioner = Partitioner(
            specials, BPE_CUTTER, piece_chars=piece_chars, max_piece_chars=max_piece_chars
        )
        return cls(vocabulary, table, pre, special, partitioner)

    @property
    def pre(self) -> PreTokenizer:
        return self._pre

    def _piece_ids(self, text: str, after_special: bool) -> Iterator[int]:
        for word in self._pre.words(text):
            ids = self._cache.get(word)
            if ids is None:
                encoded = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_TO_CHAR)
                ids = tuple(self._merge(encoded.encode()))
                if len(self._cache) >= WORD_CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[word] = ids
            yield from ids

    def _merge(self, word: bytes) -> list[int]:
        """Ids of one byte-encoded word (UTF-8 of GPT-2 characters)."""
        tokens = self._vocabulary.tokens
        if self._pre.ignore_merges and (whole := tokens.find(word)) >= 0:
            return [whole]
        starts = [index for index, byte in enumerate(word) if byte & 0xC0 != 0x80]
        ids: list[int] = []
        for text in merge_symbols(word, starts, self._candidate):
            token = tokens.find(text)
            if token >= 0:
                ids.append(token)
            else:  # llama.cpp then looks each byte up on its own; only ASCII ones can be found
                ids.extend(found for byte in text if (found := tokens.find(bytes((byte,)))) >= 0)
        return ids

    def _candidate(self, word: bytes, starts: list[int], length: list[int], left: int, right: int) -> int:
        """The heap key of merging two adjacent symbols, 0 when no merge joins them."""
        first = word[starts[left] : starts[left] + length[left]]
        second = word[starts[right] : starts[right] + length[right]]
        if b" " in first[1:]:  # llama.cpp splits a merge at its first space after position 0
            return 0
        rank = self._merges.find(first + b" " + second)
        if rank < 0:
            return 0
        return candidate_key(rank, left, len(first) + len(second))
