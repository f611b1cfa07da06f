"""WordPiece tokenizer built from GGUF tokenizer metadata, matching Hugging Face's BertTokenizer ids."""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from gguf.constants import Keys, TokenType

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile

# llama.cpp's WordPiece convention in GGUF: a word-initial piece is stored with this prefix, a
# continuation piece ("##ing" in vocab.txt) is stored bare; control tokens ([CLS], ...) as they are.
WORD_START = "\u2581"
CONTINUATION = "##"
# llama.cpp's BertNormalizer keys (absent: lower-case, and strip accents when lower-casing).
KEY_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
KEY_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"
# Our own key (llama.cpp ignores it): sentence-transformers' truncation length, below the context length.
KEY_MAX_SEQ_LENGTH = "gguf_sandbox.tokenizer.max_seq_length"
DEFAULT_MAX_LENGTH = 512
# What llama.cpp assumes for a "bert" vocabulary when a special-token key is absent.
LLAMA_CPP_BERT_DEFAULTS: Mapping[str, int] = MappingProxyType({"cls": 101, "sep": 102, "unk": 100})
MAX_CHARS_PER_WORD = 100
# Text is normalized and split in windows of at most this many characters, cut after whitespace or
# punctuation (where the ids of the parts are the ids of the whole): a 30 MB text never becomes a 30 MB
# intermediate, and reading stops once max_length ids are found.
WINDOW_CHARS = 1 << 14
# How far back from a window's end a cut after punctuation or a CJK character is looked for when the window
# holds no whitespace; a longer run of neither is cut where the window ends.
CUT_SEARCH_CHARS = 1 << 10
# Literal control tokens ("[MASK]") are matched with one regular expression: bounded, as real
# vocabularies have a handful of short ones and a hostile one could ask for millions.
MAX_ADDED_TOKENS = 1 << 12
MAX_ADDED_TOKEN_CHARS = 1 << 8
# What building the vocabulary costs, measured with tracemalloc on all-MiniLM-L6-v2 (30,522 tokens: 148
# bytes per token at the peak) and a 262,144-token vocabulary (141): per token, plus per byte of token
# text (4: a str of one non-Latin-1 character stores every character in 4 bytes).
VOCAB_BYTES_PER_TOKEN = 160
VOCAB_BYTES_PER_TEXT_BYTE = 4

# Unicode White_Space (what Rust's char::is_whitespace, and so HF tokenizers, splits on).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# Other (C*) categories HF tokenizers drops as control characters; unassigned code points (Cn) stay.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs"})
# Raw characters after which the text may be cut: those the normalizer turns into a space.
_CUT_WHITESPACE = tuple(sorted(_WHITESPACE | {"\t", "\n", "\r"}))
# _clean_char's answer for every ASCII character, as a str.translate table (the common fast path).
_ASCII_CLEAN = {code: (" " if chr(code) in "\t\n\r" else None) for code in (*range(32), 127)}
# Code point ranges BERT treats as CJK ideographs (HF tokenizers' table, its 0x2B920 start included).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _in_ranges(code: int, ranges: Sequence[tuple[int, int]]) -> bool:
    index = bisect_right(ranges, (code, 0x10FFFF)) - 1
    return index >= 0 and ranges[index][0] <= code <= ranges[index][1]


@lru_cache(maxsize=1 << 14)
def _clean_char(char: str, isolate_cjk: bool) -> str:
    """BertNormalizer's text cleaning (and CJK isolation) of one character: what replaces it."""
    if char in "\t\n\r":
        return " "
    control = unicodedata.category(char) in _CONTROL_CATEGORIES and not _in_ranges(ord(char), _HF_NOT_CONTROL)
    if char in ("\x00", "\ufffd") or control:
        return ""
    if char in _WHITESPACE:
        return " "
    if isolate_cjk and _is_cjk(char):
        return f" {char} "
    return char


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


@lru_cache(maxsize=1 << 14)
def _is_punctuation(char: str) -> bool:
    """BertPreTokenizer's split points: ASCII punctuation (symbols like $ + < included) or Unicode P*."""
    if char.isascii():
        return not char.isalnum() and char.isprintable() and char != " "
    code = ord(char)
    if code in _HF_EXTRA_PUNCTUATION:
        return True
    return unicodedata.category(char).startswith("P") and not _in_ranges(code, _HF_NOT_PUNCTUATION)


@lru_cache(maxsize=1 << 14)
def _is_stripped_mark(char: str) -> bool:
    """A nonspacing mark (Mn) that accent stripping drops."""
    code = ord(char)
    if code in _HF_EXTRA_MARKS:
        return True
    return unicodedata.category(char) == "Mn" and not _in_ranges(code, _HF_NOT_MARKS)


@dataclass(frozen=True)
class TokenizerOptions:
    """How text is normalized and cut; defaults are BERT-uncased's."""

    lowercase: bool = True
    strip_accents: bool | None = None  # None: strip when lower-casing, as BERT does
    handle_cjk: bool = True
    max_length: int = DEFAULT_MAX_LENGTH  # ids per text including [CLS] and [SEP]
    max_chars_per_word: int = MAX_CHARS_PER_WORD

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP] (>= 2), got {self.max_length}")
        if self.max_chars_per_word < 1:
            raise ValueError(f"max_chars_per_word must be positive, got {self.max_chars_per_word}")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the tokenizer itself emits or needs."""

    cls: int
    sep: int
    unk: int
    pad: int | None = None
    mask: int | None = None


class WordPieceTokenizer:
    """BERT's BasicTokenizer followed by greedy longest-match-first WordPiece, as HF tokenizers does it."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        special: SpecialIds,
        added_tokens: Iterable[str] = (),
        options: TokenizerOptions | None = None,
    ) -> None:
        self._vocab = dict(vocab)
        self._special = special
        self._options = options or TokenizerOptions()
        self._max_piece_chars = max((len(piece) for piece in self._vocab), default=1)
        added = sorted({token for token in added_tokens if token}, key=len, reverse=True)
        if len(added) > MAX_ADDED_TOKENS or (added and len(added[0]) > MAX_ADDED_TOKEN_CHARS):
            raise GGUFError(
                f"the vocabulary has {len(added):,} control tokens, the longest {len(added[0]):,} "
                f"characters; the tokenizer matches at most {MAX_ADDED_TOKENS:,} of at most "
                f"{MAX_ADDED_TOKEN_CHARS} characters (BERT has 5 of at most 6); the file is hostile"
            )
        # Special tokens written literally in the text are matched first on the raw text, longest first.
        self._added_ids = {token: self._vocab[token] for token in added if token in self._vocab}
        self._added_pattern = (
            re.compile("|".join(re.escape(token) for token in self._added_ids)) if self._added_ids else None
        )
        self._longest_added = max(map(len, self._added_ids), default=0)
        strip = self._options.strip_accents
        self._strip_accents = self._options.lowercase if strip is None else strip

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_vocab(
        cls,
        tokens: Iterable[str],
        *,
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        unk_token: str = "[UNK]",
        pad_token: str | None = "[PAD]",
        mask_token: str | None = "[MASK]",
        options: TokenizerOptions | None = None,
    ) -> WordPieceTokenizer:
        """From a vocab.txt-style token list (continuations spelled "##x"), ids by position."""
        vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            vocab[token] = index  # a duplicate keeps its last id, as HF's vocab loader does
        required = {"cls_token": cls_token, "sep_token": sep_token, "unk_token": unk_token}
        missing = [f"{role}={token!r}" for role, token in required.items() if token not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks {', '.join(missing)}; pass the names this vocabulary uses")
        optional = [token for token in (pad_token, mask_token) if token is not None and token in vocab]
        special = SpecialIds(
            cls=vocab[cls_token],
            sep=vocab[sep_token],
            unk=vocab[unk_token],
            pad=vocab.get(pad_token) if pad_token is not None else None,
            mask=vocab.get(mask_token) if mask_token is not None else None,
        )
        return cls(vocab, special, [*required.values(), *optional], options)

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile, *, max_length: int | None = None) -> WordPieceTokenizer:
        """From a GGUF's tokenizer metadata (llama.cpp's "bert" convention), undoing the ▁ / ## mapping.

        `max_length` defaults to the sentence-transformers max_seq_length the converter recorded, else
        to the context length (never above it).
        """
        metadata = gguf_file.metadata
        model = metadata.get(Keys.Tokenizer.MODEL)
        if model != "bert":
            raise GGUFError(
                f"{Keys.Tokenizer.MODEL} is {model!r}, not 'bert': only WordPiece (BERT-family) vocabularies "
                f"are supported; convert a BERT checkpoint with `gguf-sandbox convert`"
            )
        tokens = _array(metadata, Keys.Tokenizer.LIST)
        if tokens is None or len(tokens) == 0:
            raise GGUFError(f"{Keys.Tokenizer.LIST} is missing or empty; the file has no vocabulary")
        types = _array(metadata, Keys.Tokenizer.TOKEN_TYPE)
        if types is not None and len(types) != len(tokens):
            raise GGUFError(
                f"{Keys.Tokenizer.TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens; "
                f"the file is inconsistent, re-convert it"
            )
        special = _special_ids_from_metadata(metadata, len(tokens))
        # Without token types, the special ids stand in for llama.cpp's CONTROL marking.
        special_ids = {special.cls, special.sep, special.unk, special.pad, special.mask}
        is_control: Iterable[bool] = (
            (token_type == TokenType.CONTROL for token_type in types)
            if types is not None
            else (index in special_ids for index in range(len(tokens)))
        )
        vocab: dict[str, int] = {}
        added: list[str] = []
        for index, (token, control) in enumerate(zip(tokens, is_control, strict=True)):
            if not isinstance(token, str):
                raise GGUFError(f"{Keys.Tokenizer.LIST}[{index}] is {type(token).__name__}, not a string")
            if control:
                added.append(token)
                vocab[token] = index
            elif token.startswith(WORD_START):
                vocab[token[len(WORD_START) :]] = index
            else:
                vocab[CONTINUATION + token] = index
        context_length = _context_length(metadata)
        if max_length is None:
            recorded = metadata.get(KEY_MAX_SEQ_LENGTH)
            usable = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 2
            max_length = min(int(recorded) if usable else context_length, context_length)  # type: ignore[arg-type]
        strip = metadata.get(KEY_STRIP_ACCENTS)
        options = TokenizerOptions(
            lowercase=bool(metadata.get(KEY_LOWERCASE, True)),
            strip_accents=None if strip is None else bool(strip),
            max_length=max_length,
        )
        return cls(vocab, special, added, options)

    # -- properties -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def max_length(self) -> int:
        return self._options.max_length

    @property
    def options(self) -> TokenizerOptions:
        return self._options

    @property
    def special_ids(self) -> SpecialIds:
        return self._special

    def token_id(self, piece: str) -> int | None:
        """The id of a WordPiece piece ("##" for continuations), None when not in the vocabulary."""
        return self._vocab.get(piece)

    # -- tokenization ---------------------------------------------------------------------------------
    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """[CLS] + WordPiece ids of `text` + [SEP], the content cut so the total is <= max_length."""
        limit = self._options.max_length if max_length is None else max_length
        if limit < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP] (>= 2), got {limit}")
        ids = self._content_ids(text, limit - 2)
        return [self._special.cls, *ids, self._special.sep]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """encode() for each text, in order."""
        if isinstance(texts, str):
            raise TypeError("encode_batch() takes a sequence of texts; use encode() for one text")
        return [self.encode(text, max_length) for text in texts]

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece pieces of `text` (no [CLS]/[SEP], no truncation), for inspection."""
        inverse = {index: piece for piece, index in self._vocab.items()}
        return [inverse[index] for index in self._content_ids(text, None)]

    def _content_ids(self, text: str, budget: int | None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for start, end, special_id in self._windows(text):
            if special_id is not None:
                ids.append(special_id)
            else:
                for word in self._pre_tokenize(self._normalize(text[start:end])):
                    ids.extend(self._wordpiece(word))
                    if budget is not None and len(ids) >= budget:
                        return ids[:budget]
            if budget is not None and len(ids) >= budget:
                return ids[:budget]
        return ids

    def _windows(self, text: str) -> Iterator[tuple[int, int, int | None]]:
        """Raw text as (start, end, None) windows of at most WINDOW_CHARS, cut where tokenization splits
        anyway, and literal special tokens ("[MASK]") as (start, end, id) — lazily, so a caller that has
        enough ids stops reading."""
        pattern, position, size = self._added_pattern, 0, len(text)
        while position < size:
            end = min(position + WINDOW_CHARS, size)
            # A special token starting inside the window may end past it.
            match = pattern.search(text, position, min(end + self._longest_added, size)) if pattern else None
            if match is not None and match.start() < end:
                if match.start() > position:
                    yield position, match.start(), None
                yield match.start(), match.end(), self._added_ids[match.group()]
                position = match.end()
                continue
            if end < size:
                end = _cut(text, position, end)
            yield position, end, None
            position = end

    def _normalize(self, text: str) -> str:
        """BertNormalizer: clean, isolate CJK, strip accents (NFD, drop Mn), lower-case per character."""
        if text.isascii():
            text = text.translate(_ASCII_CLEAN)
        else:
            isolate_cjk = self._options.handle_cjk
            text = "".join([_clean_char(char, isolate_cjk) for char in text])
        if self._strip_accents and not text.isascii():
            text = "".join([c for c in unicodedata.normalize("NFD", text) if not _is_stripped_mark(c)])
        if self._options.lowercase:
            # Per character like HF tokenizers: no final-sigma context rule (str.lower() has one).
            text = text.replace("\u03a3", "\u03c3").lower()
        return text

    @staticmethod
    def _pre_tokenize(text: str) -> Iterator[str]:
        """BertPreTokenizer: split on whitespace, isolate every punctuation character."""
        for chunk in text.split():
            if chunk.isalnum():
                yield chunk
                continue
            start = 0
            for index, char in enumerate(chunk):
                if _is_punctuation(char):
                    if index > start:
                        yield chunk[start:index]
                    yield char
                    start = index + 1
            if start < len(chunk):
                yield chunk[start:]

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one word; [UNK] for the whole word if any part fails."""
        if len(word) > self._options.max_chars_per_word:
            return [self._special.unk]
        whole = self._vocab.get(word)
        if whole is not None:
            return [whole]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = min(len(word), start + self._max_piece_chars)
            found = None
            while end > start:
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                found = self._vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self._special.unk]
            ids.append(found)
            start = end
        return ids


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the window text[start:end]: after its last whitespace, else after punctuation or a CJK
    character near its end (the ids of both parts are then the ids of the whole), else at `end`."""
    last_space = max(text.rfind(char, start, end) for char in _CUT_WHITESPACE)
    if last_space >= start:
        return last_space + 1
    for index in range(end - 1, max(start, end - CUT_SEARCH_CHARS) - 1, -1):
        if _is_punctuation(text[index]) or _is_cjk(text[index]):
            return index + 1
    return end


def vocabulary_bytes(gguf_file: GGUFFile) -> int:
    """Memory from_gguf() will need for the file's vocabulary at its peak (an upper estimate)."""
    tokens = gguf_file.metadata.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, LazyArray):
        return 0
    return len(tokens) * VOCAB_BYTES_PER_TOKEN + tokens.nbytes * VOCAB_BYTES_PER_TEXT_BYTE


def _array(metadata: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    """A metadata array (LazyArray or list), None when absent; a scalar or string there is an error."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GGUFError(f"{key} should be an array, found {type(value).__name__}; re-convert the file")
    return value


def _context_length(metadata: Mapping[str, Any]) -> int:
    arch = metadata.get(Keys.General.ARCHITECTURE)
    value = metadata.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) if isinstance(arch, str) else None
    usable = isinstance(value, int) and not isinstance(value, bool) and value >= 2
    return int(value) if usable else DEFAULT_MAX_LENGTH  # type: ignore[arg-type]


def _special_ids_from_metadata(metadata: Mapping[str, Any], n_tokens: int) -> SpecialIds:
    """[CLS]/[SEP]/[UNK]/... ids as llama.cpp reads them: bos is [CLS], seperator (or eos) is [SEP]."""

    def read(*keys: str) -> int | None:
        for key in keys:
            value = metadata.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
                raise GGUFError(f"{key} is {value!r}, not a token id below the vocabulary size {n_tokens}")
            return value
        return None

    cls = read("tokenizer.ggml.cls_token_id", Keys.Tokenizer.BOS_ID)
    sep = read(Keys.Tokenizer.SEP_ID, Keys.Tokenizer.EOS_ID)
    unk = read(Keys.Tokenizer.UNK_ID)
    special = SpecialIds(
        cls=LLAMA_CPP_BERT_DEFAULTS["cls"] if cls is None else cls,
        sep=LLAMA_CPP_BERT_DEFAULTS["sep"] if sep is None else sep,
        unk=LLAMA_CPP_BERT_DEFAULTS["unk"] if unk is None else unk,
        pad=read(Keys.Tokenizer.PAD_ID),
        mask=read(Keys.Tokenizer.MASK_ID),
    )
    if max(special.cls, special.sep, special.unk) >= n_tokens:
        raise GGUFError(
            f"the file names no [CLS]/[SEP]/[UNK] ids and llama.cpp's defaults (101/102/100) do not fit its "
            f"{n_tokens}-token vocabulary; set {Keys.Tokenizer.BOS_ID}, {Keys.Tokenizer.SEP_ID} and "
            f"{Keys.Tokenizer.UNK_ID}"
        )
    return special


# HF tokenizers classifies characters with an old Unicode table (the Rust unicode_categories crate), so
# characters assigned or re-categorized since then are treated differently from Python's unicodedata.
# These overrides were measured by probing every code point through tokenizers 0.23 against Python
# 3.10-3.13 (Unicode 13.0-15.1): tests/embed/make_reference.py --unicode-overrides regenerates them.
_HF_NOT_CONTROL: tuple[tuple[int, int], ...] = (
    (0x0890, 0x0891), (0x08E2, 0x08E2), (0x110CD, 0x110CD), (0x13430, 0x1343F),
)  # fmt: skip
_HF_NOT_PUNCTUATION: tuple[tuple[int, int], ...] = (
    (0x061D, 0x061D), (0x09FD, 0x09FD), (0x0A76, 0x0A76), (0x0C77, 0x0C77), (0x0C84, 0x0C84),
    (0x1B7D, 0x1B7E), (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), (0x10EAD, 0x10EAD), (0x10F55, 0x10F59),
    (0x10F86, 0x10F89), (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145D), (0x11660, 0x1166C),
    (0x116B9, 0x116B9), (0x1183B, 0x1183B), (0x11944, 0x11946), (0x119E2, 0x119E2), (0x11A3F, 0x11A46),
    (0x11A9A, 0x11A9C), (0x11A9E, 0x11AA2), (0x11B00, 0x11B09), (0x11C41, 0x11C45), (0x11C70, 0x11C71),
    (0x11EF7, 0x11EF8), (0x11F43, 0x11F4F), (0x11FFF, 0x11FFF), (0x12FF1, 0x12FF2), (0x16E97, 0x16E9A),
    (0x16FE2, 0x16FE2), (0x1E95E, 0x1E95F),
)  # fmt: skip
_HF_EXTRA_PUNCTUATION = frozenset({0x166D, 0x111C9})
_HF_NOT_MARKS: tuple[tuple[int, int], ...] = (
    (0x07FD, 0x07FD), (0x0898, 0x089F), (0x08CA, 0x08E1), (0x09FE, 0x09FE), (0x0AFA, 0x0AFF),
    (0x0B55, 0x0B55), (0x0C04, 0x0C04), (0x0C3C, 0x0C3C), (0x0D00, 0x0D00), (0x0D3B, 0x0D3C),
    (0x0D81, 0x0D81), (0x0EBA, 0x0EBA), (0x0ECE, 0x0ECE), (0x180F, 0x180F), (0x1885, 0x1886),
    (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFB), (0xA82C, 0xA82C), (0xA8C5, 0xA8C5), (0xA8FF, 0xA8FF),
    (0xA9BD, 0xA9BD), (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10EFD, 0x10EFF), (0x10F46, 0x10F50),
    (0x10F82, 0x10F85), (0x11070, 0x11070), (0x11073, 0x11074), (0x110C2, 0x110C2), (0x111C9, 0x111C9),
    (0x111CF, 0x111CF), (0x1123E, 0x1123E), (0x11241, 0x11241), (0x1133B, 0x1133B), (0x11438, 0x1143F),
    (0x11442, 0x11444), (0x11446, 0x11446), (0x1145E, 0x1145E), (0x1182F, 0x11837), (0x11839, 0x1183A),
    (0x1193B, 0x1193C), (0x1193E, 0x1193E), (0x11943, 0x11943), (0x119D4, 0x119D7), (0x119DA, 0x119DB),
    (0x119E0, 0x119E0), (0x11A01, 0x11A0A), (0x11A33, 0x11A38), (0x11A3B, 0x11A3E), (0x11A47, 0x11A47),
    (0x11A51, 0x11A56), (0x11A59, 0x11A5B), (0x11A8A, 0x11A96), (0x11A98, 0x11A99), (0x11C30, 0x11C36),
    (0x11C38, 0x11C3D), (0x11C3F, 0x11C3F), (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3),
    (0x11CB5, 0x11CB6), (0x11D31, 0x11D36), (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D), (0x11D3F, 0x11D45),
    (0x11D47, 0x11D47), (0x11D90, 0x11D91), (0x11D95, 0x11D95), (0x11D97, 0x11D97), (0x11EF3, 0x11EF4),
    (0x11F00, 0x11F01), (0x11F36, 0x11F3A), (0x11F40, 0x11F40), (0x11F42, 0x11F42), (0x13440, 0x13440),
    (0x13447, 0x13455), (0x16F4F, 0x16F4F), (0x16FE4, 0x16FE4), (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46),
    (0x1E000, 0x1E006), (0x1E008, 0x1E018), (0x1E01B, 0x1E021), (0x1E023, 0x1E024), (0x1E026, 0x1E02A),
    (0x1E08F, 0x1E08F), (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1E4EC, 0x1E4EF),
    (0x1E944, 0x1E94A),
)  # fmt: skip
_HF_EXTRA_MARKS = frozenset({0x1734})
