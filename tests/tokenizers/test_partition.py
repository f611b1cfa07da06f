"""The special-token partition in windows equals llama.cpp's partition of the whole text."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from gguf_sandbox.tokenizers.partition import Cutter, Partitioner

# Overlapping on purpose: "bcd" beats "ab" in "abcd" because longer tokens go first.
SPECIALS = (("ab", 1), ("bcd", 2), ("\n\n", 3), ("\n", 4), ("  ", 5), ("<t>", 6), ("aaa", 7))
BEFORE_SPACE = Cutter(re.compile("(?<=.)(?= )", re.DOTALL), lambda text: text)


def reference(text: str, specials: tuple[tuple[str, int], ...]) -> list[tuple[str, int | None]]:
    """llama.cpp's tokenizer_st_partition over the whole text: (raw text, None) or ("", token id)."""
    fragments: list[tuple[str, int | None]] = [(text, None)] if text else []
    for special, token in sorted(specials, key=lambda entry: (-len(entry[0].encode()), entry[1])):
        split: list[tuple[str, int | None]] = []
        for raw, found in fragments:
            if found is not None:
                split.append((raw, found))
                continue
            parts = raw.split(special)
            for index, part in enumerate(parts):
                if part:
                    split.append((part, None))
                if index < len(parts) - 1:
                    split.append(("", token))
        fragments = split
    return fragments


def merged(partitioner: Partitioner, text: str) -> list[tuple[str, int | None]]:
    """Pieces with consecutive raw pieces joined back into the fragment they were cut from."""
    out: list[tuple[str, int | None]] = []
    for piece in partitioner.pieces(text):
        if piece.token is None and out and out[-1][1] is None:
            out[-1] = (out[-1][0] + piece.text, None)
        else:
            out.append((piece.text, piece.token))
    return out


def random_texts(count: int, seed: int, alphabet: str = "abcd\n <t>x", longest: int = 80) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, longest))) for _ in range(count)]


@pytest.mark.parametrize(("piece_chars", "max_piece_chars"), [(4, 8), (1, 3), (8192, 65536)])
def test_windows_equal_the_whole_text_partition(piece_chars: int, max_piece_chars: int) -> None:
    partitioner = Partitioner(
        SPECIALS, BEFORE_SPACE, piece_chars=piece_chars, max_piece_chars=max_piece_chars
    )
    for text in random_texts(3000, seed=piece_chars):
        assert merged(partitioner, text) == reference(text, SPECIALS), repr(text)


def test_pieces_are_bounded_and_cut_at_safe_places_first() -> None:
    partitioner = Partitioner(SPECIALS, BEFORE_SPACE, piece_chars=4, max_piece_chars=8)
    for text in random_texts(2000, seed=3, alphabet="xy z", longest=200):
        pieces = list(partitioner.pieces(text))
        assert "".join(piece.text for piece in pieces) == text.replace("  ", "")  # "  " is a token
        for piece, following in itertools.pairwise(pieces):
            assert len(piece.text) <= 8
            if piece.token is not None or following.token is not None:
                continue
            if following.text.startswith(" "):  # a safe cut: the last one within 4 characters if any
                assert len(piece.text) <= 4 or " " not in piece.text[1:5], (text, piece, following)
            else:  # a forced cut: only where no safe place was within reach
                assert len(piece.text) == 8 and " " not in piece.text[1:], (text, piece, following)


def test_no_specials_cuts_long_text_only() -> None:
    partitioner = Partitioner((), BEFORE_SPACE, piece_chars=4, max_piece_chars=8)
    assert [p.text for p in partitioner.pieces("abc")] == ["abc"]
    assert [p.text for p in partitioner.pieces("ab cd ef gh")] == ["ab", " cd", " ef", " gh"]
    assert [p.text for p in partitioner.pieces("x" * 20)] == ["x" * 8, "x" * 8, "x" * 4]
    assert list(partitioner.pieces("")) == []


def test_a_token_is_never_split_by_the_window() -> None:
    specials = (("<start_of_image>", 9),)
    partitioner = Partitioner(specials, BEFORE_SPACE, piece_chars=2, max_piece_chars=16)
    for offset in range(40):
        text = "y" * offset + "<start_of_image>" + "z" * 5
        assert merged(partitioner, text) == reference(text, specials)


def test_a_long_text_is_processed_lazily() -> None:
    """The first pieces of a 30 MB text come without partitioning the rest of it."""
    partitioner = Partitioner(SPECIALS, BEFORE_SPACE)
    text = "word " * (6 << 20)
    pieces = partitioner.pieces(text)
    first = next(pieces)
    assert first.text.startswith("word") and len(first.text) <= 1 << 13
