"""The merge loop both tokenizers share: adjacent symbols joined best-candidate first, as llama.cpp does."""

from __future__ import annotations

from collections.abc import Callable
from heapq import heapify, heappop, heappush

# A merge candidate on the heap is one int: rank, then left symbol, then the merged size in bytes
# (llama.cpp orders by rank, then left position). Sizes and positions fit 21 bits: pieces are at most
# partition.MAX_PIECE_CHARS code points, tokens at most vocab.MAX_TOKEN_BYTES.
FIELD = 21
MASK = (1 << FIELD) - 1

# (data, starts, length, left, right) → the heap key of merging symbols left and right, 0 for none.
Candidate = Callable[[bytes, list[int], list[int], int, int], int]


def candidate_key(rank: int, left: int, size: int) -> int:
    return (rank << (2 * FIELD)) | (left << FIELD) | size


def merge_symbols(data: bytes, starts: list[int], candidate: Candidate) -> list[bytes]:
    """The symbols of `data` (one per start offset) after every merge `candidate` allows, in order.

    A popped key is stale when either side changed since it was pushed; llama.cpp compares the texts,
    equal sizes say the same here because merges only grow symbols.
    """
    count = len(starts)
    length = [stop - start for start, stop in zip(starts, [*starts[1:], len(data)], strict=True)]
    following = [*range(1, count), -1]
    preceding = list(range(-1, count - 1))
    heap = [key for left in range(count - 1) if (key := candidate(data, starts, length, left, left + 1))]
    heapify(heap)
    while heap:
        key = heappop(heap)
        left, size = (key >> FIELD) & MASK, key & MASK
        right = following[left]
        if length[left] == 0 or right < 0 or length[left] + length[right] != size:
            continue
        length[left], length[right] = size, 0
        after = following[right]
        following[left] = after
        if after >= 0:
            preceding[after] = left
            if key := candidate(data, starts, length, left, after):
                heappush(heap, key)
        before = preceding[left]
        if before >= 0 and (key := candidate(data, starts, length, before, left)):
            heappush(heap, key)
    symbols: list[bytes] = []
    symbol = 0 if count else -1
    while symbol >= 0:
        symbols.append(data[starts[symbol] : starts[symbol] + length[symbol]])
        symbol = following[symbol]
    return symbols
