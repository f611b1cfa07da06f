"""WordPiece tokenizer: HF BertTokenizer's ids on the reference sentences, BERT rules, GGUF loading."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFWriter
from gguf.constants import TokenType
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gguf_sandbox.embed import tokenizer as tokenizer_module
from gguf_sandbox.embed.tokenizer import (
    KEY_LOWERCASE,
    KEY_MAX_SEQ_LENGTH,
    KEY_STRIP_ACCENTS,
    TokenizerOptions,
    WordPieceTokenizer,
)
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.conftest import load_reference

REFERENCE = load_reference()
CASES = REFERENCE["sentences"]
LABELS = [case["label"] for case in CASES]

# -- the reference: HF BertTokenizer (as sentence-transformers runs it) on every fixture sentence ----------


@pytest.fixture(scope="module")
def minilm_vocab(minilm_dir: Path) -> list[str]:
    words = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return words[:-1] if words and words[-1] == "" else words


@pytest.fixture(scope="module")
def from_vocab_txt(minilm_vocab: list[str]) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab(
        minilm_vocab, options=TokenizerOptions(max_length=REFERENCE["max_seq_length"])
    )


@pytest.fixture(scope="module")
def from_converted_gguf(minilm_gguf: Callable[[str], Path]) -> WordPieceTokenizer:
    with GGUFFile.open(minilm_gguf("q8_0")) as gguf_file:
        return WordPieceTokenizer.from_gguf(gguf_file)


@pytest.mark.parametrize("case", CASES, ids=LABELS)
def test_ids_from_gguf_equal_hf(from_converted_gguf: WordPieceTokenizer, case: dict[str, Any]) -> None:
    assert from_converted_gguf.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=LABELS)
def test_ids_from_vocab_txt_equal_hf(from_vocab_txt: WordPieceTokenizer, case: dict[str, Any]) -> None:
    assert from_vocab_txt.encode(case["text"]) == case["ids"]


def test_untruncated_lengths_equal_hf(from_vocab_txt: WordPieceTokenizer) -> None:
    lengths = {case["label"]: len(from_vocab_txt.encode(case["text"], max_length=1 << 20)) for case in CASES}
    assert lengths == {case["label"]: case["n_tokens_untruncated"] for case in CASES}


def test_reference_covers_what_the_issue_asks_for() -> None:
    assert len(CASES) >= 30
    assert len(set(LABELS)) == len(LABELS)
    assert any(case["n_tokens_untruncated"] > 512 for case in CASES)
    assert {"", "   "} <= {case["text"] for case in CASES}
    assert all(len(case["embedding"]) == REFERENCE["dimension"] for case in CASES)


def test_converted_file_records_sentence_transformers_truncation(
    from_converted_gguf: WordPieceTokenizer, minilm_gguf: Callable[[str], Path]
) -> None:
    assert from_converted_gguf.max_length == REFERENCE["max_seq_length"] == 256
    with GGUFFile.open(minilm_gguf("q8_0")) as gguf_file:
        assert WordPieceTokenizer.from_gguf(gguf_file, max_length=512).max_length == 512


def test_gguf_vocabulary_round_trips_to_vocab_txt(
    from_converted_gguf: WordPieceTokenizer, minilm_vocab: list[str]
) -> None:
    """Undoing llama.cpp's ▁/## convention gives back every vocab.txt entry at its id."""
    wrong = [(i, w) for i, w in enumerate(minilm_vocab) if from_converted_gguf.token_id(w) != i]
    assert wrong == []
    assert from_converted_gguf.vocab_size == len(minilm_vocab)


# -- BERT normalization and WordPiece rules on a small vocabulary --------------------------------------------
SMALL_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "hello", "world", "cafe", "café", "un", "##aff", "##able", "a", "b", "$", ",", "!", "日", "本",
    "οδος", "οδοσ", "ο", "##δ", "##ο", "##σ", "##ς", "x", "##y", "is", "Hello",
]  # fmt: skip


def small(**options: Any) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab(SMALL_VOCAB, options=TokenizerOptions(**options))


def pieces(tokenizer: WordPieceTokenizer, text: str) -> list[str]:
    return tokenizer.tokenize(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("CAFÉ", ["cafe"]),
        ("unaffable", ["un", "##aff", "##able"]),
        ("a$b", ["a", "$", "b"]),
        ("日本", ["日", "本"]),
        ("a\x00b\ufffd", ["[UNK]"]),  # dropped, not split: "ab" is one unknown word
        ("x\u200dy", ["x", "##y"]),  # format characters vanish inside a word
        ("hello\u3000world\u2028", ["hello", "world"]),
        ("ΟΔΟΣ", ["οδοσ"]),  # per-character lower-casing: no final-sigma "ς" (the vocab has both)
        ("unaffablez", ["[UNK]"]),  # one failing piece makes the whole word unknown
        ("hello [MASK] world [mask]", ["hello", "[MASK]", "world", "[UNK]", "[UNK]", "[UNK]"]),
        ("", []),
        (" \t\n ", []),
    ],
    ids=[
        "lower-and-punct",
        "accent-stripped",
        "greedy-longest-match",
        "ascii-symbol-split",
        "cjk-isolated",
        "control-dropped",
        "format-char-dropped",
        "unicode-whitespace",
        "no-final-sigma",
        "whole-word-unk",
        "literal-special",
        "empty",
        "blank",
    ],
)
def test_bert_rules(text: str, expected: list[str]) -> None:
    assert pieces(small(), text) == expected


def test_accents_kept_when_strip_accents_is_false() -> None:
    assert pieces(small(strip_accents=False), "Café") == ["café"]


def test_case_kept_without_lowercasing() -> None:
    assert pieces(small(lowercase=False), "Hello hello") == ["Hello", "hello"]


def test_words_longer_than_the_limit_are_unknown() -> None:
    assert pieces(small(max_chars_per_word=4), "hello cafe") == ["[UNK]", "cafe"]
    assert pieces(small(), "a" * 101) == ["[UNK]"]


def test_truncation_keeps_cls_and_sep() -> None:
    tokenizer = small(max_length=5)
    ids = tokenizer.encode("hello world hello world")
    assert len(ids) == 5
    assert ids[0] == tokenizer.special_ids.cls
    assert ids[-1] == tokenizer.special_ids.sep
    assert tokenizer.encode("hello world hello world", max_length=3) == [2, 5, 3]


def test_encode_batch_matches_encode() -> None:
    tokenizer = small()
    texts = ["hello world", "", "unaffable!"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: small().encode_batch("hello"), TypeError),
        (lambda: small().encode(b"hello"), TypeError),  # type: ignore[arg-type]
        (lambda: small().encode("hello", max_length=1), ValueError),
        (lambda: TokenizerOptions(max_length=1), ValueError),
        (lambda: WordPieceTokenizer.from_vocab(["hello", "[CLS]"]), ValueError),
    ],
    ids=["batch-of-str", "bytes", "max-length-1", "options-max-length-1", "vocab-without-specials"],
)
def test_bad_calls(call: Callable[[], object], error: type[Exception]) -> None:
    with pytest.raises(error):
        call()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.integers(min_value=2, max_value=12))
def test_any_text_gives_bounded_framed_ids(text: str, max_length: int) -> None:
    tokenizer = small(max_length=max_length)
    ids = tokenizer.encode(text)
    assert 2 <= len(ids) <= max_length
    assert ids[0] == tokenizer.special_ids.cls
    assert ids[-1] == tokenizer.special_ids.sep
    assert all(0 <= i < len(SMALL_VOCAB) for i in ids)


# -- loading from GGUF metadata (llama.cpp's "bert" tokenizer convention) ------------------------------------
def write_vocab_gguf(
    path: Path,
    tokens: Sequence[str],
    token_types: Sequence[int] | None,
    *,
    model: str = "bert",
    extra: Callable[[GGUFWriter], None] | None = None,
    special_ids: dict[str, int] | None = None,
) -> Path:
    writer = GGUFWriter(str(path), "bert")
    writer.add_context_length(8)
    writer.add_tokenizer_model(model)
    writer.add_token_list(list(tokens))
    if token_types is not None:
        writer.add_token_types(list(token_types))
    ids = {"bos": 2, "sep": 3, "unk": 1, "pad": 0} if special_ids is None else special_ids
    for role, token_id in ids.items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "▁hello", "▁world", "▁un", "aff", "able", "▁!"]
GGUF_TYPES = [TokenType.CONTROL] * 4 + [TokenType.NORMAL] * 6


def test_from_gguf_undoes_the_phantom_space_convention(tmp_path: Path) -> None:
    path = write_vocab_gguf(tmp_path / "v.gguf", GGUF_TOKENS, GGUF_TYPES)
    with GGUFFile.open(path) as gguf_file:
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
    assert tokenizer.tokenize("Hello unaffable world!") == ["hello", "un", "##aff", "##able", "world", "!"]
    assert tokenizer.encode("hello") == [2, 4, 3]
    assert tokenizer.max_length == 8  # the context length when no max_seq_length was recorded


def test_from_gguf_without_token_types_uses_the_special_ids(tmp_path: Path) -> None:
    path = write_vocab_gguf(tmp_path / "v.gguf", GGUF_TOKENS, None)
    with GGUFFile.open(path) as gguf_file:
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
    assert tokenizer.encode("[SEP] hello") == [2, 3, 4, 3]


def test_from_gguf_reads_our_normalization_keys(tmp_path: Path) -> None:
    tokens = [*GGUF_TOKENS, "▁Hello"]
    types = [*GGUF_TYPES, TokenType.NORMAL]

    def extra(writer: GGUFWriter) -> None:
        writer.add_bool(KEY_LOWERCASE, False)
        writer.add_bool(KEY_STRIP_ACCENTS, True)
        writer.add_uint32(KEY_MAX_SEQ_LENGTH, 4)

    path = write_vocab_gguf(tmp_path / "v.gguf", tokens, types, extra=extra)
    with GGUFFile.open(path) as gguf_file:
        tokenizer = WordPieceTokenizer.from_gguf(gguf_file)
    assert tokenizer.options.lowercase is False
    assert tokenizer.max_length == 4
    assert tokenizer.encode("Hello hello world") == [2, 10, 4, 3]


@pytest.mark.parametrize(
    ("tokens", "types", "kwargs", "message"),
    [
        (GGUF_TOKENS, GGUF_TYPES, {"model": "gpt2"}, "only WordPiece"),
        (GGUF_TOKENS, GGUF_TYPES[:3], {}, "entries for 10 tokens"),
        (GGUF_TOKENS, GGUF_TYPES, {"special_ids": {"bos": 2, "sep": 30, "unk": 1}}, "not a token id"),
        (GGUF_TOKENS[:4], GGUF_TYPES[:4], {"special_ids": {}}, "llama.cpp's defaults"),
    ],
    ids=["not-bert", "short-token-types", "special-id-out-of-range", "no-special-ids-small-vocab"],
)
def test_from_gguf_rejects_bad_metadata(
    tmp_path: Path, tokens: list[str], types: list[int], kwargs: dict[str, Any], message: str
) -> None:
    path = write_vocab_gguf(tmp_path / "bad.gguf", tokens, types, **kwargs)
    with GGUFFile.open(path) as gguf_file, pytest.raises(GGUFError, match=message):
        WordPieceTokenizer.from_gguf(gguf_file)


def test_ascii_fast_path_agrees_with_the_general_rules() -> None:
    from gguf_sandbox.embed.tokenizer import _ASCII_CLEAN, _clean_char

    for code in range(128):
        assert (_ASCII_CLEAN.get(code, chr(code)) or "") == _clean_char(chr(code), True), hex(code)


# -- huge texts: windows, bounded memory, early stop -------------------------------------------------------
def whole_text_pieces(tokenizer: WordPieceTokenizer, text: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The pieces without windows: the whole text normalized and split at once."""
    with monkeypatch.context() as patched:
        patched.setattr(tokenizer_module, "WINDOW_CHARS", len(text) + 1)
        return tokenizer.tokenize(text)


WINDOW_PARTS = ["ab", "cd", " ", ",", "é", "\u0301", "日", "[MASK]", "\u3000", ".", "!", "xyz", "\t"]
# Where a window may be cut: whitespace, punctuation, CJK (the parts above that are one of them).
CUT_POINTS = re.compile(r"[ ,日\u3000.!\t\[\]]")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(WINDOW_PARTS), min_size=1, max_size=400), st.integers(1, 40))
def test_windows_give_the_pieces_of_the_whole_text(parts: list[str], window: int) -> None:
    text = "".join(parts)
    # A run longer than a window with no cut point in it is cut where the window ends (documented).
    assume(max(map(len, CUT_POINTS.split(text))) < window)
    tokenizer = small()
    expected = tokenizer.tokenize(text)
    original = tokenizer_module.WINDOW_CHARS
    tokenizer_module.WINDOW_CHARS = window
    try:
        assert tokenizer.tokenize(text) == expected
    finally:
        tokenizer_module.WINDOW_CHARS = original


@pytest.mark.parametrize(
    "text",
    [
        "hello world, " * 10_000,
        ("unaffable!" * 3000 + " ") * 5,
        "日本" * 40_000,
        "[MASK]hello" * 8000,
        " " * 50_000 + "hello",
    ],
    ids=["words", "punctuation-only-splits", "cjk", "specials", "spaces-then-a-word"],
)
def test_long_texts_tokenize_as_a_whole(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = small()
    assert tokenizer.tokenize(text) == whole_text_pieces(tokenizer, text, monkeypatch)


def test_a_30mb_text_costs_no_copy_of_itself_and_stops_at_max_length() -> None:
    tokenizer = small()
    for text in ("hello world " * 2_600_000, "é" * 100 + " " + "日本 " * 10_000_000, " " * 31_000_000 + "x"):
        tracemalloc.start()
        try:
            ids = tokenizer.encode(text)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert 2 <= len(ids) <= tokenizer.max_length
        # A window of 16,384 characters and its normalized copies (1.3 MB for CJK), never the 30 MB text.
        assert peak < 2 << 20, f"encoding a {len(text):,}-character text peaked at {peak:,} bytes"


def test_control_tokens_are_bounded() -> None:
    many = [*SMALL_VOCAB, *(f"[unused{i}]" for i in range(5000))]
    with pytest.raises(GGUFError, match="5,030 control tokens"):
        WordPieceTokenizer(dict(zip(many, range(len(many)), strict=True)), small().special_ids, many)
    long = ["[" + "x" * 300 + "]"]
    with pytest.raises(GGUFError, match="longest 302 characters"):
        WordPieceTokenizer({long[0]: 0}, small().special_ids, long)
