"""Slow, obviously-correct merge loops (dicts, rescans) to check the heap-based tokenizers against."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from gguf_sandbox.tokenizers.bpe import BYTE_TO_CHAR


def naive_bpe(word: str, token_ids: Mapping[str, int], ranks: Mapping[tuple[str, str], int]) -> list[int]:
    """Merge the leftmost lowest-rank adjacent pair until none is left; unknown symbols spelled by byte."""
    symbols = list(word.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_TO_CHAR))
    while len(symbols) > 1:
        best = min(
            ((ranks[pair], index) for index, pair in enumerate(itertools.pairwise(symbols)) if pair in ranks),
            default=None,
        )
        if best is None:
            break
        index = best[1]
        symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
    ids: list[int] = []
    for symbol in symbols:
        if symbol in token_ids:
            ids.append(token_ids[symbol])
        else:
            ids += [token_ids[chr(c)] for c in symbol.encode() if c < 0x80 and chr(c) in token_ids]
    return ids


def naive_spm(
    text: str, token_ids: Mapping[str, int], scores: Sequence[float], byte_ids: Sequence[int]
) -> list[int]:
    """Merge the leftmost adjacent pair whose concatenation is the best-scoring token; bytes for the rest."""
    symbols = list(text.replace(" ", "\u2581"))
    while len(symbols) > 1:
        best = None
        for index, (left, right) in enumerate(itertools.pairwise(symbols)):
            token = token_ids.get(left + right)
            if token is not None and (best is None or scores[token] > best[0]):
                best = (scores[token], index)
        if best is None:
            break
        index = best[1]
        symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
    ids: list[int] = []
    for symbol in symbols:
        if symbol in token_ids:
            ids.append(token_ids[symbol])
        else:
            ids += [byte_ids[byte] for byte in symbol.encode("utf-8", "surrogatepass")]
    return ids
