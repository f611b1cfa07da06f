"""Raw text split around user-defined tokens (llama.cpp's special=false partition), in bounded pieces.

llama.cpp first splits the text around every user-defined token (control tokens are left as plain
text when special=false), longest token first, each over the fragments the previous ones left; then
tokenizes each raw fragment on its own. We do the same through windows of the text, so a 30 MB line
costs a window's memory, and cut long raw fragments where the tokenizer gives the same ids for the
parts as for the whole (its Cutter), so the pieces handed to it stay small.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# A raw piece is cut at the last safe place within PIECE_CHARS, else at the first within MAX_PIECE_CHARS,
# else (a run with no safe place at all, e.g. 64k letters without a space) at MAX_PIECE_CHARS: the one
# place where our ids can differ from llama.cpp's, which tokenizes such a run whole.
PIECE_CHARS = 1 << 13
MAX_PIECE_CHARS = 1 << 16


@dataclass(frozen=True)
class Piece:
    """Raw text to tokenize, or a user-defined token found in the text."""

    text: str
    token: int | None = None


@dataclass(frozen=True)
class Cutter:
    """Where a tokenizer may cut raw text and get, for the parts, the ids it gives the whole: the
    zero-width matches of `pattern` over `prepare(text)` (a string of the same length)."""

    pattern: re.Pattern[str]
    prepare: Callable[[str], str]


class Partitioner:
    """Splits text into Pieces: user-defined tokens and raw text of at most MAX_PIECE_CHARS each."""

    def __init__(
        self,
        user_defined: Sequence[tuple[str, int]],
        cutter: Cutter,
        *,
        piece_chars: int = PIECE_CHARS,
        max_piece_chars: int = MAX_PIECE_CHARS,
    ) -> None:
        # llama.cpp's order: longest (in bytes) first; equal lengths by id (its sort leaves them unordered).
        self._specials = tuple(sorted(user_defined, key=lambda entry: (-len(entry[0].encode()), entry[1])))
        self._cutter = cutter
        self._piece_chars = piece_chars
        self._max_piece_chars = max(max_piece_chars, piece_chars, *(len(text) for text, _ in user_defined))
        # A window's partition equals the whole text's for every position this far before the window's end:
        # each pass (one token) can move the first difference back by at most its length - 1.
        self._margin = sum(len(text) - 1 for text, _ in self._specials)

    def pieces(self, text: str) -> Iterator[Piece]:
        position = 0
        while position < len(text):
            end = min(len(text), position + self._max_piece_chars + self._margin)
            window = text[position:end]
            final = end == len(text)
            limit = len(window) if final else len(window) - self._margin
            advance = len(window)
            prepared: list[str] = []  # the cutter's view of the window, made on first need
            for start, stop, token in self._partition(window):
                if token is not None:
                    if stop > limit:  # not sure the whole text has this token here: redo from it
                        advance = start
                        break
                    yield Piece("", token)
                    continue
                complete = final or stop < limit
                if not complete and start > 0:  # this raw fragment may go on past the window: redo from it
                    advance = start
                    break
                cut = start
                parts = self._cuts(window, prepared, start, stop if complete else limit, complete)
                for cut_start, cut_stop in parts:
                    yield Piece(window[cut_start:cut_stop])
                    cut = cut_stop
                if not complete:
                    advance = cut
                    break
            position += advance

    def _partition(self, window: str) -> list[tuple[int, int, int | None]]:
        """(start, stop, token id or None for raw text) over `window`, as llama.cpp partitions it."""
        fragments: list[tuple[int, int, int | None]] = [(0, len(window), None)]
        for special, token in self._specials:
            if special not in window:
                continue
            split: list[tuple[int, int, int | None]] = []
            for start, stop, found in fragments:
                if found is not None:
                    split.append((start, stop, found))
                    continue
                cursor = start
                while (match := window.find(special, cursor, stop)) >= 0:
                    if match > cursor:
                        split.append((cursor, match, None))
                    cursor = match + len(special)
                    split.append((match, cursor, token))
                if cursor < stop:
                    split.append((cursor, stop, None))
            fragments = split
        return fragments

    def _cuts(
        self, window: str, prepared: list[str], start: int, stop: int, complete: bool
    ) -> Iterator[tuple[int, int]]:
        """Parts of raw window[start:stop] cut at safe places. Of a fragment that goes on past `stop`
        (incomplete), only parts whose cut could be judged are given: the rest waits for the next window."""
        while start < stop:
            if complete and stop - start <= self._piece_chars:
                yield start, stop
                return
            if not prepared:
                prepared.append(self._cutter.prepare(window))
            cut = self._safe_cut(prepared[0], start, stop)
            if cut is None:
                reach = start + self._max_piece_chars
                if reach < stop or (reach == stop and not complete):
                    cut = reach  # no safe place within reach: the documented deviation
                elif complete:
                    cut = stop
                else:
                    return  # the search was cut short by the window: judge it in the next one
            yield start, cut
            start = cut

    def _safe_cut(self, prepared: str, start: int, stop: int) -> int | None:
        """The last safe cut within piece_chars of `start`, else the first within max_piece_chars."""
        pattern = self._cutter.pattern
        # A cut at p needs prepared[p] to be seen, so p < len(prepared).
        near = min(start + self._piece_chars, stop, len(prepared) - 1)
        last = None
        for match in pattern.finditer(prepared, start + 1, near + 1):
            last = match.start()
        if last is not None:
            return last
        far = min(start + self._max_piece_chars, stop, len(prepared) - 1)
        first = pattern.search(prepared, near + 1, far + 1) if far > near else None
        return first.start() if first is not None else None
