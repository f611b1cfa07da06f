"""`gguf-sandbox tokenize`: token ids of texts as llama.cpp gives them, one JSON line per text."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from gguf.constants import Keys

from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import from_gguf

PROG = "gguf-sandbox tokenize"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="a GGUF file with a gpt2 or llama vocabulary"
    )
    parser.add_argument(
        "--input",
        type=Path,
        help="a file of texts, one per line ('-' for stdin), read and printed as it streams",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="ids per text at most, BOS/EOS included (default: the model's context length; 0: no limit)",
    )
    parser.add_argument(
        "--no-special", action="store_true", help="add no BOS/EOS (llama.cpp's add_special=false)"
    )
    parser.add_argument(
        "texts", nargs="*", metavar="TEXT", help="texts to tokenize (before those of --input)"
    )


def _lines(stream: TextIO) -> Iterator[str]:
    """Each line without its end ("\\n" or "\\r\\n"), one at a time."""
    for line in stream:
        yield line.removesuffix("\n").removesuffix("\r") if line.endswith("\n") else line


def _open_input(path: Path) -> io.TextIOWrapper:
    """The --input stream; undecodable bytes become U+FFFD, as the TEXT arguments' do."""
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="")
    return path.open(encoding="utf-8", errors="replace", newline="")


def _max_tokens(args: argparse.Namespace, gguf: GGUFFile) -> int | None:
    if args.max_tokens is not None:
        return args.max_tokens or None
    arch = gguf.architecture
    context = gguf.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) if arch else None
    usable = isinstance(context, int) and not isinstance(context, bool) and context > 0
    return int(context) if usable else None  # type: ignore[arg-type]


def _json_line(text: str, ids: list[int]) -> str:
    line = json.dumps({"text": text, "ids": ids}, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escaped form can be written
        line = json.dumps({"text": text, "ids": ids})
    return line + "\n"


def run(args: argparse.Namespace) -> int:
    """Print {"text", "ids"} per text: the TEXT arguments, then each line of --input as it is read."""
    if args.max_tokens is not None and args.max_tokens < 0:
        print(f"{PROG}: error: --max-tokens must be 0 (no limit) or positive", file=sys.stderr)
        return 2
    if not args.texts and args.input is None:
        print(f"{PROG}: error: no texts; pass TEXT arguments or --input FILE", file=sys.stderr)
        return 2
    add_special = not args.no_special
    with GGUFFile.open(args.model) as gguf:
        tokenizer = from_gguf(gguf)
        limit = _max_tokens(args, gguf)
        special = tokenizer.special
        needed = len(special.prefix) + len(special.suffix) if add_special else 0
        if limit is not None and limit < needed:
            print(
                f"{PROG}: error: --max-tokens {limit} leaves no room for the {needed} BOS/EOS ids",
                file=sys.stderr,
            )
            return 2
        try:
            stream = _open_input(args.input) if args.input is not None else None
        except OSError as error:
            print(f"{PROG}: error: cannot read {args.input}: {error.strerror or error}", file=sys.stderr)
            return 2
        texts = (os.fsencode(text).decode("utf-8", "replace") for text in args.texts)
        try:
            for text in itertools.chain(texts, _lines(stream) if stream is not None else ()):
                ids = tokenizer.encode(text, add_special=add_special, max_tokens=limit)
                sys.stdout.write(_json_line(text, ids))
                sys.stdout.flush()
        finally:
            if stream is not None and str(args.input) == "-":
                stream.detach()  # leave the process's stdin open
            elif stream is not None:
                stream.close()
    return 0
