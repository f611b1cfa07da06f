"""The fixed sentence set of the llama.cpp token-id reference, and the random strings of the live comparison.

Standard library only: make_reference.py imports it inside the llama-cpp-python environment.
"""

from __future__ import annotations

import random

_PROSE = (
    "Memory limits are enforced by the kernel: when a container exceeds its cgroup limit, the OOM killer "
    "terminates the largest process, often the Python interpreter that was embedding text with a model "
    "it had read into memory all at once. Streaming the weights layer by layer keeps the working set "
    "small, at the price of reading the file again for every batch.\n\n"
)
_CODE = (
    "def tokenize(text: str, *, add_special: bool = True) -> list[int]:\n"
    "    ids = [BOS] if add_special else []\n"
    "    for word in PATTERN.findall(text):\n"
    "        ids.extend(merge(word))  # 'merge' ranks pairs\n"
    "    return ids\n\n"
    "if __name__ == '__main__':\n"
    '\tprint(tokenize("Hello,   world!\\n"))\r\n'
)
_CJK = (
    "我想在apple工作，这是一个测试。日本語のテキストとカタカナ、ひらがな。한국어 문장도 토큰화해야 합니다。"
)

# (label, text): labels are the pytest ids, so keep them short and unique.
SENTENCES: tuple[tuple[str, str], ...] = (
    ("plain", "The quick brown fox jumps over the lazy dog."),
    ("question", "How do I limit the memory of a Docker container?"),
    ("casing", "HELLO World hElLo WORLD"),
    ("accents", "Crème brûlée, naïve café, résumé and São Paulo."),
    ("accents-nfd", "Cre\u0300me bru\u0302le\u0301e, nai\u0308ve cafe\u0301"),
    ("german", "Straße, Größe und übermäßig: ÄÖÜ äöü ß."),
    ("greek", "ΟΔΟΣ and Σίσυφος: final sigma."),
    ("chinese", "我想在apple工作，这是一个测试。"),
    ("japanese", "日本語のテキストとカタカナ、ひらがな。"),
    ("korean", "한국어 문장도 토큰화해야 합니다."),
    ("cyrillic", "Привет, мир! Это тест."),
    ("arabic", "مرحبا بالعالم، هذا اختبار."),
    ("hindi", "नमस्ते दुनिया, यह एक परीक्षण है।"),
    ("thai", "สวัสดีชาวโลก"),
    ("mixed-scripts", "English, français, русский, 中文, العربية, हिन्दी in one line"),
    ("emoji", "I love 🦙 llamas 😀👍🏽 and 🚀 rockets! 👨\u200d👩\u200d👧"),
    ("code-python", "def f(x: int) -> int:\n    return x ** 2  # square it"),
    ("code-js", "const add = (a, b) => { return a + b; }; console.log(add(1, 2));"),
    ("code-block", _CODE),
    ("sql", "SELECT u.id, COUNT(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total > 100;"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("html", "<html><body><table><tr><td>cell</td></tr></table><b>bold</b> <i>it</i></body></html>"),
    ("shell", "docker run -m 64m --memory-swap 64m python:3.11-slim python -c 'print(1)'"),
    ("url-email", "Visit https://example.com/path?q=gguf&lang=en#top or mail jane.doe@example.org"),
    ("numbers", "3.14159, 1,000,000, $5.99, €10, ¥20, 50% off, 2024-06-01 12:30:45"),
    ("long-number", "1234567890123456789 and 0.000001 and 42"),
    ("unicode-digits", "Arabic-Indic ٠١٢٣٤٥ Devanagari १२३ fullwidth １２３ superscript ²³ fractions ½¼"),
    ("math", "∑ x² ≤ ∞ ± √2 ≈ 1.414 → ∀ε>0 ∃δ"),
    ("apostrophes", "I've been 'told he's there, 'RE you sure? We'Ve a'lL don't can't I'M"),
    ("contractions-edge", "'s 't 're 've 'm 'll 'd ' '' '''s x's"),
    ("punct-only", "!!! ??? ... --- *** ,,, ;;; :::"),
    ("empty", ""),
    ("one-space", " "),
    ("spaces", "   "),
    ("space-run-40", "a" + " " * 40 + "b"),
    ("space-run-end", "trailing" + " " * 7),
    ("space-before-digit", "x  1  22   333"),
    ("newlines", "\n\n"),
    ("newline-run-40", "a" + "\n" * 40 + "b"),
    ("crlf", "line one\r\nline two\r\n\r\nline four\r"),
    ("tabs", "\tone\t\ttwo\t\t\tthree" + "\t" * 35),
    (
        "mixed-whitespace",
        "\t\n  tabs\tand\nnewlines\r\n\u00a0nbsp\u3000ideographic space\u2028end \x0b\x0c\x85",
    ),
    ("control", "zero\u200bwidth\u200djoiner soft\u00adhyphen bell\x07 nul\x00 bad\ufffd end"),
    ("special-chatml", "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"),
    ("special-gemma", "<bos><start_of_turn>user\nhi<end_of_turn><eos><pad><unk><mask>"),
    ("special-image", "<start_of_image> and <end_of_image> and [multimodal]"),
    ("special-llama", "<s>[INST] hi [/INST]</s> <unk> <0x41><0x0A>"),
    ("special-bert", "Literal [CLS] and [SEP] and [MASK] tokens"),
    ("special-glued", "x<eos>y<|im_end|>z</s>w<start_of_image>v"),
    ("compat-forms", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ, ﬁ ligature, Ⅻ ①, ǅ title-case"),
    ("rare-cjk", "𫠠𫠡 rare ideographs 𠀀 and U+061D ؝ mark"),
    ("unassigned", "unassigned \u0378\u0379 and private \ue000\U000f0000 and noncharacter \ufffe"),
    ("newer-unicode", "Unicode 15: \U0001faf7\U0001fa75 \u0cf3 and 16: \U0001fae9 \u1c89"),
    ("long-word", "Antidisestablishmentarianism and " + "supercalifragilisticexpialidocious" * 3),
    ("repeated-chars", "a" * 100 + " " + "zz" * 50 + " " + "!" * 30),
    ("sentencepiece-mark", "literal \u2581 mark and \u2581\u2581double and x\u2581y"),
    ("single-char", "a"),
    ("single-emoji", "🦙"),
    ("long-prose", _PROSE * 60),
    ("long-code", _CODE * 40),
    ("long-cjk", _CJK * 150),
)

# Scripts and symbols the random strings mix (ranges of code points, inclusive).
_RANGES = (
    (0x20, 0x7E),  # ASCII
    (0x30, 0x39),  # digits, again, so numbers are frequent
    (0xA0, 0x24F),  # Latin-1 and Latin Extended
    (0x300, 0x36F),  # combining marks
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2000, 0x206F),  # General Punctuation (spaces, joiners)
    (0x2100, 0x23FF),  # letterlike, arrows, math
    (0x2580, 0x25FF),  # blocks (▁)
    (0x3000, 0x30FF),  # CJK symbols, Hiragana, Katakana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFF00, 0xFFEF),  # fullwidth forms
    (0x1F300, 0x1FAFF),  # emoji
    (0x20000, 0x2A6DF),  # CJK extension B
    (0x0, 0x10FFFF),  # anything (no surrogates: see random_text)
)
_WHITESPACE = (" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\x0b", "\x85", " " * 5)
_LOOKALIKES = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<eos>",
    "<bos>",
    "<s>",
    "</s>",
    "<start_of_image>",
    "<table>",
    "</td>",
    "[multimodal]",
    "<0x41>",
    "'s",
    "'RE",
    "\u2581",
)


def random_text(rng: random.Random) -> str:
    """One random string: mixed scripts, whitespace, punctuation, token lookalikes or decoded random bytes."""
    if rng.random() < 0.1:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        return raw.decode("utf-8", errors="replace")
    parts: list[str] = []
    for _ in range(rng.randrange(0, 40)):
        roll = rng.random()
        if roll < 0.2:
            parts.append(rng.choice(_WHITESPACE))
        elif roll < 0.27:
            parts.append(rng.choice(_LOOKALIKES))
        else:
            low, high = rng.choice(_RANGES)
            chars = (chr(rng.randint(low, high)) for _ in range(rng.randrange(1, 12)))
            parts.append("".join(char for char in chars if not 0xD800 <= ord(char) <= 0xDFFF))
    return "".join(parts)
