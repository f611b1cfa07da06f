"""SentencePiece (llama.cpp's greedy merge by score): synthetic vocabularies, byte fallback, bad files."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFWriter
from gguf.constants import GGUFValueType, Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import SPMTokenizer, from_gguf
from tests.tokenizers.references import naive_spm
from tests.tokenizers.vocabularies import spm_tokens, write_spm


def load(path: Path, **options: int) -> SPMTokenizer:
    with GGUFFile.open(path) as gguf:
        return SPMTokenizer.from_gguf(gguf, **options)


@pytest.fixture
def spm(tmp_path: Path) -> SPMTokenizer:
    return load(write_spm(tmp_path / "spm.gguf"))


def ids_of(*pieces: str) -> list[int]:
    tokens, _, _ = spm_tokens()
    return [tokens.index(piece) for piece in pieces]


def test_space_prefix_bos_and_merges_by_score(spm: SPMTokenizer) -> None:
    # add_space_prefix and add_bos default on for "llama": "▁hello▁world" merges the best pairs first.
    assert spm.add_space_prefix and spm.special.add_bos
    assert spm.encode("hello world") == ids_of("<s>", "▁hello", "▁world")
    assert spm.encode("the", add_special=False) == ids_of("▁the")
    assert spm.encode("") == ids_of("<s>")


def test_equal_scores_merge_leftmost_first(spm: SPMTokenizer) -> None:
    # "ab" and "bc" score the same: "▁cabc" becomes ▁ c ab c, not ▁ c a bc.
    assert spm.encode("cabc", add_special=False) == ids_of("▁", "c", "ab", "c")


def test_unknown_characters_fall_back_to_bytes(spm: SPMTokenizer) -> None:
    assert spm.encode("é", add_special=False) == ids_of("▁", "<0xC3>", "<0xA9>")
    assert spm.encode("中", add_special=False) == ids_of("▁", "中")


def test_user_defined_tokens_split_and_control_tokens_stay_text(spm: SPMTokenizer) -> None:
    # After a user-defined token, the next text gets the space prefix again (llama.cpp's is_prev_special).
    assert spm.encode("a\nb", add_special=False) == ids_of("▁a", "\n", "▁", "b")
    assert spm.encode("<start_of_image>", add_special=False) == ids_of("<start_of_image>")
    assert ids_of("<s>")[0] not in spm.encode("<s>", add_special=False)


def test_same_ids_as_a_naive_merge_loop(spm: SPMTokenizer) -> None:
    tokens, scores, _ = spm_tokens()
    token_ids = {token: index for index, token in enumerate(tokens)}
    byte_ids = [token_ids[f"<0x{byte:02X}>"] for byte in range(256)]
    rng = random.Random(3)
    for _ in range(2000):
        text = "".join(rng.choice("helowrdabct 中é>▁<") for _ in range(rng.randrange(0, 30)))
        expected = naive_spm(" " + text, token_ids, scores, byte_ids) if text else []
        assert spm.encode(text, add_special=False) == expected, repr(text)


def test_small_pieces_give_the_same_ids(tmp_path: Path) -> None:
    path = write_spm(tmp_path / "spm.gguf")
    whole, small = load(path), load(path, piece_chars=3, max_piece_chars=300)
    rng = random.Random(4)
    for _ in range(500):
        words = ("".join(rng.choice("helowrdabc>") for _ in range(rng.randrange(1, 9))) for _ in range(25))
        text = rng.choice(("", " ", "  ")).join(words)
        assert small.encode(text) == whole.encode(text), repr(text)


def test_no_cut_between_a_mark_and_what_a_token_joins_it_to(spm: SPMTokenizer) -> None:
    # ">▁<" is a token: a cut before the space of "> <" would lose it.
    cut = spm._partitioner._cutter.pattern
    assert cut.search("a b") is not None
    assert cut.search("> <") is None
    assert [match.start() for match in cut.finditer("x  y")] == [1]  # "▁▁" is a token too


def test_no_add_space_prefix_key(tmp_path: Path) -> None:
    def edit(writer: GGUFWriter) -> None:
        writer.add_add_space_prefix(False)
        writer.add_add_bos_token(False)

    tokenizer = load(write_spm(tmp_path / "p.gguf", edit=edit))
    assert tokenizer.encode("hello") == ids_of("he", "llo")


def replace(
    key: str, value: object, value_type: GGUFValueType, sub_type: GGUFValueType | None = None
) -> Callable[[GGUFWriter], None]:
    def edit(writer: GGUFWriter) -> None:
        writer.kv_data[0].pop(key, None)
        writer.add_key_value(key, value, value_type, sub_type=sub_type)

    return edit


def nan_score(writer: GGUFWriter) -> None:
    _, scores, _ = spm_tokens()
    scores[270] = float("nan")
    replace(Keys.Tokenizer.SCORES, scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)(writer)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (nan_score, "NaN"),
        (replace(Keys.Tokenizer.SCORES, [1.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32), "1 entries for"),
        (
            replace(Keys.Tokenizer.SCORES, ["a"], GGUFValueType.ARRAY, GGUFValueType.STRING),
            "FLOAT32 or INT32",
        ),
        (
            replace(Keys.Tokenizer.LIST, [1, 2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32),
            "array of strings",
        ),
        (replace(Keys.Tokenizer.LIST, "abc", GGUFValueType.STRING), "array of strings, found str"),
        (replace(Keys.Tokenizer.ADD_PREFIX, 1, GGUFValueType.INT32), "not a boolean"),
        (
            replace(Keys.Tokenizer.TOKEN_TYPE, [4] * 200, GGUFValueType.ARRAY, GGUFValueType.INT32),
            "200 entries",
        ),
    ],
    ids=[
        "nan-score",
        "short-scores",
        "string-scores",
        "int-tokens",
        "scalar-tokens",
        "int-prefix",
        "short-types",
    ],
)
def test_bad_files_end_in_one_clear_error(
    tmp_path: Path, edit: Callable[[GGUFWriter], None], message: str
) -> None:
    with (
        GGUFFile.open(write_spm(tmp_path / "bad.gguf", edit=edit)) as gguf,
        pytest.raises(GGUFError, match=message),
    ):
        from_gguf(gguf)


def test_a_missing_byte_token_is_a_clear_error_when_needed(tmp_path: Path) -> None:
    tokens, _, _ = spm_tokens()
    tokens[3 + 0xA9] = "not-a-byte"  # <0xA9> gone: "é" (C3 A9) cannot be spelled
    tokenizer = load(
        write_spm(
            tmp_path / "b.gguf",
            edit=replace(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        )
    )
    assert tokenizer.encode("hello") == ids_of("<s>", "▁hello")
    with pytest.raises(GGUFError, match="byte 0xA9"):
        tokenizer.encode("é")


def test_duplicate_token_texts_resolve_to_the_last_id(tmp_path: Path) -> None:
    tokens, _, _ = spm_tokens()
    tokens[-1] = "▁hello"  # llama.cpp's token_to_id keeps the last id of a repeated text
    tokenizer = load(
        write_spm(
            tmp_path / "d.gguf",
            edit=replace(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        )
    )
    assert tokenizer.encode("hello", add_special=False) == [len(tokens) - 1]
