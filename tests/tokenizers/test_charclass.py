"""Character classes: the generated Unicode 15.1 table, whitespace, and the collapsed view of text."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox.tokenizers.charclass import LETTER, NUMBER, OTHER, SPACE, STAND_IN, classify, collapse

GENERATOR = Path(__file__).parent / "make_unicode_table.py"


@pytest.mark.skipif(
    unicodedata.unidata_version != "15.1.0", reason="needs Python's Unicode 15.1 (Python 3.13)"
)
def test_the_committed_table_is_what_the_generator_makes() -> None:
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, (
        done.stderr or "the table differs: rerun make_unicode_table.py with python3.13"
    )


@pytest.mark.parametrize(
    ("char", "expected"),
    [
        ("a", LETTER),
        ("Z", LETTER),
        ("é", LETTER),
        ("中", LETTER),
        ("ㅎ", LETTER),
        ("7", NUMBER),
        ("٣", NUMBER),
        ("²", NUMBER),
        ("Ⅻ", NUMBER),
        (" ", SPACE),
        ("\n", SPACE),
        ("\x0b", SPACE),
        ("\x85", SPACE),
        ("\u3000", SPACE),
        ("\u2028", SPACE),
        ("\x1c", OTHER),  # str.isspace() says yes; Unicode's White_Space (and llama.cpp) say no
        ("\u200b", OTHER),
        ("'", OTHER),
        ("😀", OTHER),
        ("\u0378", OTHER),  # unassigned
        ("\ud800", OTHER),  # a lone surrogate (Cs)
        ("\u0cf3", OTHER),  # assigned in Unicode 15 as a mark
        ("\U0002ebf0", LETTER),  # CJK extension I, Unicode 15.1: a letter even where Python's data is older
        ("\U00031350", LETTER),  # CJK extension H
        ("\U0001fae9", OTHER),  # assigned in Unicode 16 (a symbol): still unassigned in llama.cpp's 15.1
    ],
    ids=repr,
)
def test_classify(char: str, expected: int) -> None:
    assert classify(np.array([ord(char)], dtype=np.uint32)).tolist() == [expected]


def test_collapse_keeps_ascii_and_offsets() -> None:
    assert collapse("plain ASCII, 123!") == "plain ASCII, 123!"
    text = "é2 中\u3000٣😀\ud800x"
    collapsed = collapse(text)
    assert len(collapsed) == len(text)
    assert collapsed == (
        f"{STAND_IN[LETTER]}2 {STAND_IN[LETTER]}{STAND_IN[SPACE]}{STAND_IN[NUMBER]}{STAND_IN[OTHER]}"
        f"{STAND_IN[OTHER]}x"
    )


def test_stand_ins_collapse_to_other() -> None:
    # Text may itself hold the private-use stand-ins: they must not pass for letters or digits.
    text = "".join(STAND_IN.values())
    assert collapse(text) == STAND_IN[OTHER] * len(text)
