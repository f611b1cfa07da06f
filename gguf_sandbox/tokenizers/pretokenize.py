"""Byte-level BPE pre-tokenizers: llama.cpp's split of text into words, per tokenizer.ggml.pre value.

llama.cpp does not run the Hugging Face regexes for these families: it runs hand-written state
machines (src/unicode.cpp) over its own Unicode 15.1 classes, which differ from the regexes at the
edges (a space run before a digit, U+0085, unassigned code points). Each pattern below reproduces
its state machine over text collapsed to those classes (charclass.collapse), so offsets are code
point offsets into the text. tests/tokenizers/test_pretokenize.py checks every pattern against a
transcription of the state machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.tokenizers.charclass import DIGITS, LETTERS, SPACES, collapse
from gguf_sandbox.tokenizers.partition import Cutter

_L = f"[{LETTERS}]"
_N = f"[{DIGITS}]"
_W = f"[{SPACES}]"
_NOT_W = f"[^{SPACES}]"
_O = f"[^{LETTERS}{DIGITS}{SPACES}]"  # neither letter, number nor whitespace
_ANY = "(?s:.)"  # the state machines' "no match": one code point on its own

# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)  (and \s+ at the end)
GPT2 = rf"'(?:[stmd]|re|ve|ll)| ?{_L}+| ?{_N}+| ?{_O}+|{_W}+(?={_W}{_NOT_W})|{_W}+|{_ANY}"
# \p{N} isolated first, then GPT2 within the pieces between digits: a space run before a digit ends a piece.
_W_BEFORE_NON_DIGIT = rf"{_W}+(?={_W}[^{SPACES}{DIGITS}])"
DIGITS_THEN_GPT2 = rf"{_N}|'(?:[stmd]|re|ve|ll)| ?{_L}+| ?{_O}+|{_W_BEFORE_NON_DIGIT}|{_W}+|{_ANY}"
_CONTRACTIONS = "'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])"
# (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
_SPACES_NEWLINES = rf"{_W}*[\r\n]|{_W}+(?={_W}{_NOT_W})|{_W}+"
LLAMA3 = rf"{_CONTRACTIONS}|[^\r\n{DIGITS}]?{_L}+|{_N}{{1,3}}| ?{_O}+[\r\n]*|{_SPACES_NEWLINES}|{_ANY}"
# As LLAMA3 with single digits (\p{N}).
QWEN2 = rf"{_CONTRACTIONS}|[^\r\n{DIGITS}]?{_L}+|{_N}| ?{_O}+[\r\n]*|{_SPACES_NEWLINES}|{_ANY}"
# Every pattern above ends a word where a letter meets a non-letter, or a digit meets neither letter nor
# digit, whatever follows: text cut there pre-tokenizes into the same words.
WORD_CUT = re.compile(rf"(?<={_L})(?=[^{LETTERS}])|(?<={_N})(?=[^{LETTERS}{DIGITS}])")
BPE_CUTTER = Cutter(WORD_CUT, collapse)


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer family: its word pattern and the flags it sets."""

    family: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_<family>
    pattern: re.Pattern[str]
    ignore_merges: bool = False  # a word that is a token is taken whole, before any merge
    add_bos: bool = False  # llama.cpp's add_bos default for this family

    def words(self, text: str) -> Iterator[str]:
        """The words of `text` (a raw piece: partition.Partitioner bounds its length)."""
        for match in self.pattern.finditer(collapse(text)):
            yield text[match.start() : match.end()]


_GPT2 = PreTokenizer("GPT2", re.compile(GPT2))
_STARCODER = PreTokenizer("STARCODER", re.compile(DIGITS_THEN_GPT2))
_LLAMA3 = PreTokenizer("LLAMA3", re.compile(LLAMA3), ignore_merges=True, add_bos=True)
_LLAMA3_REGEX_ONLY = PreTokenizer("DBRX", re.compile(LLAMA3))
_QWEN2 = PreTokenizer("QWEN2", re.compile(QWEN2))

# tokenizer.ggml.pre values whose tokenization llama.cpp (src/llama-vocab.cpp) defines by these families
# alone: names that also change other behaviour (chatglm's missing BOS, laguna's extra split, jina-v2's
# stripped <mask>, solar-open's <|end|>) are left out.
PRE_TOKENIZERS: Mapping[str, PreTokenizer] = MappingProxyType(
    {
        **dict.fromkeys(
            ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
            _LLAMA3,
        ),
        "jina-v5-nano": _LLAMA3,
        "dbrx": _LLAMA3_REGEX_ONLY,
        "smaug-bpe": _LLAMA3_REGEX_ONLY,
        **dict.fromkeys(
            ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "grok-2"),
            _QWEN2,
        ),
        **dict.fromkeys(
            ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
            _STARCODER,
        ),
        **dict.fromkeys(
            (
                "gpt-2",
                "phi-2",
                "jina-es",
                "jina-de",
                "gigachat",
                "a.x-4.0",
                "mellum",
                "modern-bert",
                "jina-v1-en",
                "roberta-bpe",
                "mpt",
                "olmo",
                "jais",
                "trillion",
                "granite-docling",
                "exaone4",
            ),
            _GPT2,
        ),
    }
)


def pre_tokenizer(pre: object) -> PreTokenizer:
    """The family of a tokenizer.ggml.pre value; a clear error for one we do not implement."""
    found = PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if found is None:
        what = "missing (llama.cpp then uses 'default')" if pre is None else repr(pre)
        raise GGUFError(
            f"tokenizer.ggml.pre is {what}: gguf-sandbox does not implement that pre-tokenizer; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return found
