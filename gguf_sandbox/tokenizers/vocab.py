"""A GGUF vocabulary held compactly: one byte blob, offsets and sorted hashes, no Python object per token."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType, Keys, TokenType

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.window import CHUNK_BYTES

# Far above any real vocabulary (the longest gemma-3 token is 48 bytes; 262,144 tokens take 2.3 MB).
MAX_TOKEN_BYTES = 1 << 16
MAX_TABLE_BYTES = 1 << 28
MAX_TABLE_ENTRIES = 1 << 22
_HASH_MASK = 0xFFFFFFFF


class StringTable:
    """Byte strings by index, and the index of a byte string, from one blob sorted by hash.

    A lookup hashes the query, bisects the sorted hashes and compares the candidates' bytes in the
    blob: about a microsecond, for 12 bytes per entry plus the text (3 + 2.3 MB for gemma-3's
    vocabulary). Hashes are Python's hash() cut to 32 bits: equal ones are told apart by their bytes.
    """

    def __init__(self, blob: bytes, offsets: array[int], hashes: array[int], ids: array[int]) -> None:
        self._blob = blob
        self._offsets = offsets  # entry i is blob[offsets[i]:offsets[i + 1]]
        self._hashes = hashes  # sorted
        self._ids = ids  # entry index of each sorted hash; among equal strings the one that wins first

    @classmethod
    def build(cls, strings: Iterable[bytes], *, keep_last: bool, what: str) -> StringTable:
        """A table of `strings` in order; when a string repeats, find() answers its last index if
        `keep_last` (llama.cpp's token map) else its first (llama.cpp's merge ranks)."""
        blob = bytearray()
        offsets = array("I", [0])
        hashes = array("I")
        for index, string in enumerate(strings):
            if len(string) > MAX_TOKEN_BYTES:
                raise GGUFError(
                    f"{what}[{index}] is {len(string):,} bytes, over the {MAX_TOKEN_BYTES:,}-byte limit for "
                    f"one entry; the file is corrupt or hostile"
                )
            if len(blob) + len(string) > MAX_TABLE_BYTES or index >= MAX_TABLE_ENTRIES:
                raise GGUFError(
                    f"{what} holds over {MAX_TABLE_BYTES:,} bytes or {MAX_TABLE_ENTRIES:,} entries; "
                    f"far beyond any real vocabulary, the file is hostile"
                )
            blob += string
            offsets.append(len(blob))
            hashes.append(hash(string) & _HASH_MASK)
        values = np.frombuffer(hashes, dtype=np.uint32) if hashes else np.zeros(0, np.uint32)
        # A stable sort keeps equal hashes in index order; sorting the reversed array puts the last first.
        if keep_last:
            order = len(values) - 1 - np.argsort(values[::-1], kind="stable")
        else:
            order = np.argsort(values, kind="stable")
        sorted_hashes = array("I", values[order].tobytes())
        return cls(bytes(blob), offsets, sorted_hashes, array("i", order.astype(np.int32).tobytes()))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        return self._blob[self._offsets[index] : self._offsets[index + 1]]

    @property
    def nbytes(self) -> int:
        """Bytes held: the blob and the three arrays."""
        arrays = (self._offsets, self._hashes, self._ids)
        return len(self._blob) + sum(a.itemsize * len(a) for a in arrays)

    def containing(self, needle: bytes) -> list[int]:
        """Indices of the entries that contain `needle` after their first byte (scanned in chunks)."""
        if not needle:
            raise ValueError("needle must not be empty")
        blob = np.frombuffer(self._blob, dtype=np.uint8)
        offsets = np.frombuffer(self._offsets, dtype=np.uint32)
        found: set[int] = set()
        for chunk in range(0, len(blob), CHUNK_BYTES):
            positions = np.flatnonzero(blob[chunk : chunk + CHUNK_BYTES] == needle[0]) + chunk
            positions = positions[positions + len(needle) <= len(blob)]
            for shift, byte in enumerate(needle[1:], start=1):
                positions = positions[blob[positions + shift] == byte]
            entries = np.searchsorted(offsets, positions, side="right") - 1
            inside = (offsets[entries] < positions) & (positions + len(needle) <= offsets[entries + 1])
            found.update(entries[inside].tolist())
        return sorted(found)

    def find(self, string: bytes) -> int:
        """The index of `string`, -1 when absent."""
        key = hash(string) & _HASH_MASK
        hashes = self._hashes
        position = bisect_left(hashes, key)
        size = len(string)
        while position < len(hashes) and hashes[position] == key:
            index = self._ids[position]
            start = self._offsets[index]
            if self._offsets[index + 1] - start == size and self._blob.startswith(string, start):
                return index
            position += 1
        return -1


def string_array(metadata: Mapping[str, Any], key: str) -> LazyArray | None:
    """A STRING metadata array, None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, LazyArray) or value.element_type is not GGUFValueType.STRING:
        raise GGUFError(f"{key} should be an array of strings, found {_describe(value)}; the file is corrupt")
    return value


def number_array(
    metadata: Mapping[str, Any], key: str, element_types: tuple[GGUFValueType, ...], count: int
) -> np.ndarray | None:
    """The first `count` elements of a numeric metadata array as numpy, None when absent.

    llama.cpp requires at least one element per token and these element types; so do we.
    """
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, LazyArray) or value.element_type not in element_types:
        names = " or ".join(t.name for t in element_types)
        raise GGUFError(f"{key} should be an array of {names}, found {_describe(value)}; the file is corrupt")
    if len(value) < count:
        raise GGUFError(f"{key} has {len(value):,} entries for {count:,} tokens; the file is inconsistent")
    first = value.to_numpy(0, 0)
    result = np.empty(count, dtype=first.dtype)
    step = max(1, CHUNK_BYTES // first.dtype.itemsize)
    for start in range(0, count, step):
        stop = min(count, start + step)
        result[start:stop] = value.to_numpy(start, stop)
    return result


def _describe(value: Any) -> str:
    if isinstance(value, LazyArray):
        return f"an array of {value.element_type.name}"
    return type(value).__name__


@dataclass(frozen=True)
class Vocabulary:
    """The tokens of a GGUF, as llama.cpp keys them, and those of type USER_DEFINED."""

    tokens: StringTable
    user_defined: tuple[tuple[str, int], ...]  # (text, id); attributes.partition_tokens refines them

    @property
    def size(self) -> int:
        return len(self.tokens)


def load_vocabulary(metadata: Mapping[str, Any]) -> Vocabulary:
    """tokenizer.ggml.tokens and token_type, with llama.cpp's renaming of empty tokens."""
    tokens = string_array(metadata, Keys.Tokenizer.LIST)
    if tokens is None or len(tokens) == 0:
        raise GGUFError(f"{Keys.Tokenizer.LIST} is missing or empty; the file has no vocabulary")
    table = StringTable.build(_renamed_empty(tokens), keep_last=True, what=Keys.Tokenizer.LIST)
    types = number_array(metadata, Keys.Tokenizer.TOKEN_TYPE, (GGUFValueType.INT32,), len(table))
    user_defined: list[tuple[str, int]] = []
    if types is not None:
        for index in np.flatnonzero(types == TokenType.USER_DEFINED).tolist():
            raw = table[index]
            try:
                user_defined.append((raw.decode("utf-8"), index))
            except UnicodeDecodeError:
                raise GGUFError(
                    f"{Keys.Tokenizer.LIST}[{index}] is a user-defined token but not valid UTF-8; the file "
                    f"is corrupt"
                ) from None
    return Vocabulary(table, tuple(user_defined))


def _renamed_empty(tokens: LazyArray) -> Iterable[bytes]:
    # llama.cpp names an empty token "[EMPTY_<id>]" so that every token has a distinct, findable text.
    for index, raw in enumerate(tokens.iter_bytes()):
        yield raw if raw else f"[EMPTY_{index}]".encode()
