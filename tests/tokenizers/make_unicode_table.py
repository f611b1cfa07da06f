"""Regenerate the character-class table of gguf_sandbox/tokenizers/charclass.py from Unicode data.

llama.cpp's pre-tokenizers classify code points with tables generated from Unicode 15.1 (its
src/unicode-data.cpp). This script derives the same letter/number classes from Python's unicodedata,
so it must run on an interpreter whose Unicode database is that version (Python 3.13), e.g.:

    python3.13 tests/tokenizers/make_unicode_table.py          # rewrite the table in place
    python3.13 tests/tokenizers/make_unicode_table.py --check  # exit 1 when the committed table differs
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

TARGET = Path(__file__).resolve().parents[2] / "gguf_sandbox" / "tokenizers" / "charclass.py"
UNICODE_VERSION = "15.1.0"
BEGIN = "# BEGIN GENERATED TABLE"
END = "# END GENERATED TABLE"
PER_LINE = 10


def class_of(code: int) -> int:
    """0 other, 1 letter (L*), 2 number (N*): the classes the pre-tokenizers distinguish."""
    major = unicodedata.category(chr(code))[0]
    return {"L": 1, "N": 2}.get(major, 0)


def table() -> list[int]:
    """(first code point << 2 | class) for every run of code points of one class."""
    entries: list[int] = []
    previous = -1
    for code in range(0x110000):
        current = class_of(code)
        if current != previous:
            entries.append(code << 2 | current)
            previous = current
    return entries


def render(entries: list[int]) -> str:
    lines = [
        BEGIN,
        f"# Unicode {UNICODE_VERSION}: (first code point << 2 | class), one entry per run.",
        "RUNS = (",
    ]
    for start in range(0, len(entries), PER_LINE):
        lines.append("    " + " ".join(f"{entry:#x}," for entry in entries[start : start + PER_LINE]))
    lines += [")  # fmt: skip", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = parser.parse_args()
    if unicodedata.unidata_version != UNICODE_VERSION:
        print(
            f"this Python has Unicode {unicodedata.unidata_version}, llama.cpp's tables are "
            f"{UNICODE_VERSION}: run it with python3.13",
            file=sys.stderr,
        )
        return 2
    source = TARGET.read_text()
    head, rest = source.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = head + render(table()) + tail
    if args.check:
        return 0 if updated == source else 1
    TARGET.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
