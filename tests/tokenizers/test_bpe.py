"""Byte-level BPE: synthetic qwen2/qwen3-style vocabularies, merge order, BOS/EOS, truncation, bad files."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFWriter
from gguf.constants import GGUFValueType, Keys

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import BPETokenizer, from_gguf
from gguf_sandbox.tokenizers.special import DEFAULTS, read_special_tokens
from tests.tokenizers.references import naive_bpe
from tests.tokenizers.vocabularies import QWEN_MERGES, qwen_tokens, write_bpe


def load(path: Path, **options: int) -> BPETokenizer:
    with GGUFFile.open(path) as gguf:
        return BPETokenizer.from_gguf(gguf, **options)


@pytest.fixture
def qwen2(tmp_path: Path) -> BPETokenizer:
    return load(write_bpe(tmp_path / "qwen2.gguf"))


@pytest.fixture
def qwen3(tmp_path: Path) -> BPETokenizer:
    return load(write_bpe(tmp_path / "qwen3.gguf", qwen3=True))


def ids_of(*pieces: str) -> list[int]:
    tokens, _ = qwen_tokens(("<think>", "</think>"))
    return [tokens.index(piece) for piece in pieces]


def test_merges_by_rank(qwen2: BPETokenizer) -> None:
    # "the": "h e" merges, "t he" is no merge; " world": Ġw, or, ld, then Ġwor, then Ġworld.
    assert qwen2.encode("the world") == ids_of("t", "he", "Ġworld")
    assert qwen2.encode("Hello") == ids_of("Hello")
    assert qwen2.encode("hello") == ids_of("he", "ll", "o")  # "h e" outranks "l l": "hell" never forms
    assert qwen2.encode("你好") == ids_of("ä½ł", "å¥½")
    assert qwen2.encode("") == []


def test_control_tokens_are_plain_text(qwen2: BPETokenizer) -> None:
    # special=False: "<|im_start|>" is spelled out of byte tokens, not its id.
    assert qwen2.encode("<|im_start|>") == ids_of("<", "|", "i", "m", "_", "s", "t", "a", "r", "t", "|", ">")


def test_user_defined_tokens_are_split_out(qwen3: BPETokenizer) -> None:
    assert qwen3.encode("<think>this</think>") == ids_of("<think>", "t", "h", "is", "</think>")
    assert qwen3.encode("a<think>") == ids_of("a", "<think>")


def test_same_ids_as_a_naive_merge_loop(qwen2: BPETokenizer) -> None:
    tokens, _ = qwen_tokens()
    token_ids = {token: index for index, token in enumerate(tokens)}
    ranks = {(merge.split(" ")[0], merge.split(" ")[1]): rank for rank, merge in enumerate(QWEN_MERGES)}
    rng = random.Random(5)
    alphabet = "thewordlisHa  \n'你好é1"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        expected = [i for word in qwen2.pre.words(text) for i in naive_bpe(word, token_ids, ranks)]
        assert qwen2.encode(text) == expected, repr(text)


def test_small_pieces_give_the_same_ids(tmp_path: Path) -> None:
    path = write_bpe(tmp_path / "qwen2.gguf")
    whole, small = load(path), load(path, piece_chars=3, max_piece_chars=200)
    rng = random.Random(9)
    for _ in range(500):
        text = " ".join(
            "".join(rng.choice("thelloiswr") for _ in range(rng.randrange(1, 8))) for _ in range(20)
        )
        assert small.encode(text) == whole.encode(text)


def test_bos_eos_defaults_and_flags(tmp_path: Path) -> None:
    eot = ids_of("<|endoftext|>")[0]
    assert load(write_bpe(tmp_path / "a.gguf")).encode("a") == ids_of("a")  # qwen2: no BOS by default
    assert load(write_bpe(tmp_path / "b.gguf", pre="llama-bpe")).encode("a") == [eot, *ids_of("a")]

    def both(writer: GGUFWriter) -> None:
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)

    tokenizer = load(write_bpe(tmp_path / "c.gguf", edit=both))
    assert tokenizer.encode("a") == [eot, *ids_of("a"), eot]
    assert tokenizer.encode("a", add_special=False) == ids_of("a")
    assert tokenizer.encode("", add_special=True) == [eot, eot]


def test_max_tokens_keeps_bos_and_eos(tmp_path: Path) -> None:
    def both(writer: GGUFWriter) -> None:
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)

    tokenizer = load(write_bpe(tmp_path / "c.gguf", edit=both))
    full = tokenizer.encode("the world is hello")
    assert tokenizer.encode("the world is hello", max_tokens=4) == [*full[:3], full[-1]]
    assert tokenizer.encode("the world is hello", max_tokens=2) == [full[0], full[-1]]
    with pytest.raises(ValueError, match="no room"):
        tokenizer.encode("x", max_tokens=1)
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_a_long_line_is_cut_short_by_max_tokens(qwen2: BPETokenizer) -> None:
    text = "the world " * (3 << 20)  # 30 MB
    assert qwen2.encode(text, max_tokens=5) == qwen2.encode("the world the world the")[:5]


def test_from_gguf_picks_bpe_by_model(tmp_path: Path) -> None:
    with GGUFFile.open(write_bpe(tmp_path / "q.gguf")) as gguf:
        tokenizer = from_gguf(gguf)
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == 256 + len(QWEN_MERGES) + 3


def drop(key: str) -> Callable[[GGUFWriter], None]:
    def edit(writer: GGUFWriter) -> None:
        del writer.kv_data[0][key]

    return edit


def replace(
    key: str, value: object, value_type: GGUFValueType, sub_type: GGUFValueType | None = None
) -> Callable[[GGUFWriter], None]:
    def edit(writer: GGUFWriter) -> None:
        writer.kv_data[0].pop(key, None)
        writer.add_key_value(key, value, value_type, sub_type=sub_type)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop(Keys.Tokenizer.MERGES), "merges is missing"),
        (drop(Keys.Tokenizer.LIST), "tokens is missing or empty"),
        (drop(Keys.Tokenizer.PRE), "pre is missing"),
        (replace(Keys.Tokenizer.PRE, "deepseek-coder", GGUFValueType.STRING), "'deepseek-coder'.*supported"),
        (
            replace(Keys.Tokenizer.MERGES, [1, 2], GGUFValueType.ARRAY, GGUFValueType.INT32),
            "array of strings",
        ),
        (
            replace(Keys.Tokenizer.TOKEN_TYPE, [1, 1], GGUFValueType.ARRAY, GGUFValueType.INT32),
            "2 entries for",
        ),
        (
            replace(Keys.Tokenizer.TOKEN_TYPE, ["x"], GGUFValueType.ARRAY, GGUFValueType.STRING),
            "array of INT32",
        ),
        (replace(Keys.Tokenizer.BOS_ID, "one", GGUFValueType.STRING), "not a token id"),
        (replace(Keys.Tokenizer.ADD_BOS, 1, GGUFValueType.UINT8), "not a boolean"),
    ],
    ids=[
        "no-merges",
        "no-tokens",
        "no-pre",
        "unsupported-pre",
        "merges-ints",
        "short-types",
        "types-strings",
        "bos-string",
        "add-bos-int",
    ],
)
def test_bad_files_end_in_one_clear_error(
    tmp_path: Path, edit: Callable[[GGUFWriter], None], message: str
) -> None:
    with (
        GGUFFile.open(write_bpe(tmp_path / "bad.gguf", edit=edit)) as gguf,
        pytest.raises(GGUFError, match=message),
    ):
        from_gguf(gguf)


def test_out_of_range_ids_fall_back_like_llama_cpp(tmp_path: Path) -> None:
    def edit(writer: GGUFWriter) -> None:
        del writer.kv_data[0][Keys.Tokenizer.EOS_ID]
        writer.add_eos_token_id(10**6)  # out of range: llama.cpp falls back to its default, 11 for gpt2
        writer.add_add_eos_token(True)

    tokenizer = load(write_bpe(tmp_path / "e.gguf", edit=edit))
    assert tokenizer.special.eos == 11
    assert tokenizer.encode("a")[-1] == 11


def test_adding_a_token_the_vocabulary_lacks_is_refused() -> None:
    with pytest.raises(GGUFError, match="add_bos_token is on but the file has no usable"):
        read_special_tokens({Keys.Tokenizer.ADD_BOS: True}, DEFAULTS["gpt2"], 5)


def test_unknown_tokenizer_model_is_named(tmp_path: Path) -> None:
    def edit(writer: GGUFWriter) -> None:
        del writer.kv_data[0][Keys.Tokenizer.MODEL]
        writer.add_tokenizer_model("t5")

    with (
        GGUFFile.open(write_bpe(tmp_path / "t5.gguf", edit=edit)) as gguf,
        pytest.raises(GGUFError, match="'t5'"),
    ):
        from_gguf(gguf)
