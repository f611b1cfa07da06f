"""Pre-tokenizer patterns against a transcription of llama.cpp's state machines (src/unicode.cpp)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.charclass import LETTER, NUMBER, SPACE, classify
from gguf_sandbox.tokenizers.partition import Partitioner
from gguf_sandbox.tokenizers.pretokenize import BPE_CUTTER, PRE_TOKENIZERS, pre_tokenizer


def machine_words(text: str, family: str) -> list[str]:
    """Words as llama.cpp's custom splitters give them: GPT2, STARCODER (digits first), LLAMA3, QWEN2."""
    classes = classify(np.array([ord(c) for c in text], dtype=np.uint32)).tolist() if text else []
    if family == "STARCODER":
        # The \p{N} regex runs first: every digit is a piece, so is every run between digits.
        bounds = [0]
        for position, found in enumerate(classes):
            if found == NUMBER:
                bounds += [position, position + 1]
        bounds.append(len(text))
        pieces = [(a, b) for a, b in itertools.pairwise(bounds) if a < b]
        family = "GPT2"
    else:
        pieces = [(0, len(text))] if text else []
    words: list[str] = []
    for start, end in pieces:
        words += _machine(text, classes, start, end, family)
    return words


def _machine(text: str, classes: list[int], start: int, end: int, family: str) -> list[str]:
    out: list[str] = []
    last = start

    def cls(position: int) -> int | None:  # None: outside the piece (llama.cpp's OUT_OF_RANGE, flags 0)
        return classes[position] if start <= position < end else None

    def char(position: int) -> str | None:
        return text[position] if start <= position < end else None

    def emit(position: int) -> None:
        nonlocal last
        if position > last:
            out.append(text[last:position])
        last = position

    def lower(c: str | None) -> str | None:
        return c.lower() if c is not None and family != "GPT2" and "A" <= c <= "Z" else c

    other = (None, SPACE, LETTER, NUMBER)
    pos = start
    while pos < end:
        c, flags = text[pos], classes[pos]
        if c == "'" and pos + 1 < end:
            following = lower(char(pos + 1))
            if following in ("s", "t", "m", "d"):
                pos += 2
                emit(pos)
                continue
            if pos + 2 < end and (following, lower(char(pos + 2))) in (("r", "e"), ("v", "e"), ("l", "l")):
                pos += 3
                emit(pos)
                continue
        if family == "GPT2":
            flags2 = cls(pos + 1) if c == " " else flags
            matched = False
            for wanted in (LETTER, NUMBER):
                if flags2 == wanted:
                    pos += c == " "
                    while cls(pos) == wanted:
                        pos += 1
                    emit(pos)
                    matched = True
                    break
            if matched:
                continue
            if flags2 not in other:
                pos += c == " "
                while cls(pos) not in other:
                    pos += 1
                emit(pos)
                continue
        else:
            if not (c in "\r\n" or flags == NUMBER) and (flags == LETTER or cls(pos + 1) == LETTER):
                pos += 1
                while cls(pos) == LETTER:
                    pos += 1
                emit(pos)
                continue
            if flags == NUMBER:
                if family == "LLAMA3":
                    first = pos
                    while cls(pos) == NUMBER:
                        pos += 1
                        if pos - first >= 3:
                            emit(pos)
                            first = pos
                else:
                    pos += 1
                emit(pos)
                continue
            flags2 = cls(pos + 1) if c == " " else flags
            if flags2 not in (SPACE, LETTER, NUMBER):  # flags2 may be None (0) here: llama.cpp tests flags
                pos += c == " "
                while cls(pos) not in other:
                    pos += 1
                while char(pos) in ("\r", "\n"):
                    pos += 1
                emit(pos)
                continue
        count, after_newline = 0, 0
        while cls(pos + count) == SPACE:
            if family != "GPT2" and text[pos + count] in "\r\n":
                after_newline = pos + count + 1
            count += 1
        if after_newline:
            pos = after_newline
        elif count > 1 and pos + count < end:
            pos += count - 1
        elif count:
            pos += count
        else:
            pos += 1
        emit(pos)
    return out


FAMILIES = {"gpt-2": "GPT2", "smollm": "STARCODER", "llama-bpe": "LLAMA3", "qwen2": "QWEN2"}
ALPHABET = ("a", "Z", "s", "S", "t", "r", "e", "E", "v", "l", "L", "m", "d", "1", "٣", "é", " ", "\n", "\r",
            "\t", "\u3000", "'", ".", "\ue000", "\u0378", "中")  # fmt: skip


def random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 24))) for _ in range(count)]


@pytest.mark.parametrize("pre", sorted(FAMILIES))
def test_patterns_equal_the_state_machines(pre: str) -> None:
    tokenizer = pre_tokenizer(pre)
    texts = [
        "".join(chars) for length in range(4) for chars in itertools.product(ALPHABET[:14], repeat=length)
    ]
    texts += random_strings(3000, seed=len(pre))
    for text in texts:
        assert list(tokenizer.words(text)) == machine_words(text, FAMILIES[pre]), repr(text)


@pytest.mark.parametrize(
    ("pre", "text", "words"),
    [
        ("gpt-2", "Hello world's 123", ["Hello", " world", "'s", " 123"]),
        ("gpt-2", "a   b", ["a", "  ", " b"]),
        ("gpt-2", "end   ", ["end", "   "]),
        ("smollm", "x  12", ["x", "  ", "1", "2"]),  # the space run ends at the digit piece: kept whole
        ("llama-bpe", "12345 I'VE\r\n\n  x", ["123", "45", " I", "'VE", "\r\n\n", " ", " x"]),
        ("qwen2", "12345 .,\n\nok", ["1", "2", "3", "4", "5", " .,\n\n", "ok"]),
        ("qwen2", "\u00a0x\u3000\u3000y", ["\u00a0x", "\u3000", "\u3000y"]),
    ],
)
def test_known_splits(pre: str, text: str, words: list[str]) -> None:
    assert list(pre_tokenizer(pre).words(text)) == words


@pytest.mark.parametrize("pre", sorted(FAMILIES))
def test_word_cuts_do_not_change_the_words(pre: str) -> None:
    """Text cut where BPE_CUTTER allows splits into the words of the whole."""
    tokenizer = pre_tokenizer(pre)
    partitioner = Partitioner((), BPE_CUTTER, piece_chars=3, max_piece_chars=500)
    for text in random_strings(2000, seed=7):
        pieces = [piece.text for piece in partitioner.pieces(text)]
        assert "".join(pieces) == text
        assert [w for piece in pieces for w in tokenizer.words(piece)] == list(tokenizer.words(text)), repr(
            text
        )


def test_every_supported_name_has_a_family() -> None:
    assert {"llama-bpe", "llama3", "qwen2", "smollm", "gpt-2"} <= set(PRE_TOKENIZERS)
    assert pre_tokenizer("llama3").add_bos and pre_tokenizer("llama3").ignore_merges
    assert not pre_tokenizer("qwen2").add_bos


@pytest.mark.parametrize("pre", ["deepseek-llm", "default", None, 7])
def test_unsupported_pre_names_itself_and_the_supported_ones(pre: object) -> None:
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre is .*supported: .*qwen2.*smollm") as caught:
        pre_tokenizer(pre)
    assert (repr(pre) if pre is not None else "missing") in str(caught.value)
