"""`gguf-sandbox embed`: embed texts from the command line or a file and print the vectors as JSON."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from gguf_sandbox.embed.bert import POOLING_NAMES
from gguf_sandbox.embed.plan import PlanName
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError

if TYPE_CHECKING:
    from gguf_sandbox.embed.engine import Embedder

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3
EXIT_BAD_INPUT: Final = 4
# A line longer than this is cut here (the rest is skipped unread into memory): the model reads at most its
# context length in tokens (512 for BERT), which real text reaches within a few thousand characters.
MAX_LINE_BYTES: Final = 1 << 16
# A batch also ends once its texts hold this many characters, so long lines never pile up in memory.
MAX_BATCH_CHARS: Final = 1 << 18
# Decimals a component may be rounded to: 0 or fewer round a unit vector's components to 0 (or ±1), and
# 17 digits already hold every float exactly.
MIN_PRECISION: Final = 1
MAX_PRECISION: Final = 17
# A long line's rest is skipped in reads of this many bytes.
SKIP_BYTES: Final = 1 << 16

EPILOG = f"""\
Texts from --input (one per line, blank lines skipped) come first, then the TEXT arguments. The input is
read, embedded and printed incrementally in batches, so memory stays constant for any number of lines; the
output is still one JSON document: {{"model", "plan", "preferred_plan", "dimension", "pooling", "data":
[{{"text", "embedding"}}, ...]}}, written as it goes (after an error it is incomplete). Input is UTF-8; a
line longer than {MAX_LINE_BYTES:,} bytes is cut there (a note on stderr); every text is truncated to the
model's maximum number of tokens.

exit codes: 0 every text embedded; 2 bad arguments; 3 refused by the memory budget; 4 bad input (the model
is not a usable BERT GGUF, it produced NaN or infinite values, or the input cannot be read as UTF-8).
Errors are one line on stderr."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model", required=True, type=Path, help="a GGUF file (BERT, llama, qwen2, qwen3, gemma3)"
    )
    parser.add_argument(
        "--plan",
        default="auto",
        choices=["auto", *(p.value for p in PlanName)],
        help="where weights live while embedding (default: chosen from the detected memory limit)",
    )
    parser.add_argument(
        "--pooling", choices=POOLING_NAMES, help="pooling instead of the model's (default: the file's)"
    )
    parser.add_argument("--input", type=Path, help="a file of texts, one per line ('-' for stdin)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument(
        "--precision",
        type=int,
        default=7,
        help=f"decimals per vector component, {MIN_PRECISION}–{MAX_PRECISION} (default 7)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads per forward pass (default: the CPUs the process may use — affinity and cgroup CPU "
        "quota; more than that are not started)",
    )
    parser.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="drop the model's file pages once read (POSIX_FADV_DONTNEED): the process's peak is its own "
        "working set, at the cost of re-reading streamed weights from disk every pass",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (after those of --input)")


class InputError(GGUFSandboxError):
    """The texts to embed cannot be read."""


@contextmanager
def _opened(source: Path) -> Iterator[IO[bytes]]:
    """The --input file (or stdin for '-') as bytes; unreadable files are InputError."""
    if str(source) == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = source.open("rb")
    except OSError as error:
        raise InputError(f"cannot read --input {source}: {error.strerror or error}") from None
    with stream:
        yield stream


def _lines(stream: IO[bytes], name: str) -> Iterator[str]:
    """Non-blank lines as text without their newline, each at most MAX_LINE_BYTES of UTF-8 (the rest
    skipped unread into memory, with a note on stderr)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    number = 0
    while True:
        number += 1
        try:
            raw = stream.readline(MAX_LINE_BYTES)
            if not raw:
                return
            whole = raw.endswith(b"\n")
            # A cut line may end inside a character: the decoder keeps those bytes, reset() drops them.
            text = decoder.decode(raw, final=whole)
            if not whole:
                decoder.reset()
                if _skip_rest_of_line(stream):
                    print(
                        f"gguf-sandbox embed: note: {name} line {number} is longer than {MAX_LINE_BYTES:,} "
                        f"bytes; only its first {MAX_LINE_BYTES:,} are embedded",
                        file=sys.stderr,
                    )
        except UnicodeDecodeError as error:
            raise InputError(
                f"{name} line {number} is not valid UTF-8 ({error.reason} at byte {error.start}); convert "
                f"the input to UTF-8"
            ) from None
        except OSError as error:
            raise InputError(f"cannot read {name} line {number}: {error.strerror or error}") from None
        text = text.rstrip("\r\n")
        if text.strip():
            yield text


def _check_argument_texts(texts: list[str]) -> None:
    """Refuse TEXT arguments that are not UTF-8, as --input lines are (before any output: the document
    must not stop half-written). Python hands such bytes over as lone surrogates."""
    for number, text in enumerate(texts, 1):
        try:
            os.fsencode(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(
                f"TEXT argument {number} is not valid UTF-8 ({error.reason} at byte {error.start}); convert "
                f"it to UTF-8"
            ) from None


def _skip_rest_of_line(stream: IO[bytes]) -> int:
    """Read and drop the rest of the current line, a bounded piece at a time; the bytes dropped."""
    skipped = 0
    while True:
        piece = stream.readline(SKIP_BYTES)
        if not piece or piece.endswith(b"\n"):
            return skipped + len(piece.rstrip(b"\r\n"))
        skipped += len(piece)


def _texts(args: argparse.Namespace) -> Generator[str, None, None]:
    if args.input is not None:
        name = "stdin" if str(args.input) == "-" else str(args.input)
        with _opened(args.input) as stream:
            yield from _lines(stream, name)
    yield from args.texts


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    """Consecutive texts, at most `size` and about MAX_BATCH_CHARS characters per batch."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= size or chars >= MAX_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_document(embedder: Embedder, batches: Iterator[list[str]], precision: int) -> None:
    """The JSON document, one data row per text, written batch by batch once the first batch embedded."""
    head = {
        "model": embedder.model_name,
        "plan": embedder.plan,
        "preferred_plan": embedder.preferred_plan,
        "dimension": embedder.dimension,
        "pooling": embedder.pooling,
    }
    out = sys.stdout
    separator = json.dumps(head, ensure_ascii=False)[:-1] + ', "data": ['
    for batch in batches:
        vectors = embedder.embed(batch)
        for text, vector in zip(batch, vectors, strict=True):
            row = {"text": text, "embedding": [round(float(v), precision) for v in vector]}
            # allow_nan=False: a non-finite value must never leave as invalid JSON (encode refuses them).
            out.write(separator + json.dumps(row, ensure_ascii=False, allow_nan=False))
            separator = ", "
        out.flush()
    out.write("]}\n")


def run(args: argparse.Namespace) -> int:
    """Print one JSON object: the model, the plan, and [{"text", "embedding"}] in input order."""
    from gguf_sandbox.embed.engine import Embedder

    if args.batch_size < 1:
        print("gguf-sandbox embed: error: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.threads is not None and args.threads < 1:
        print("gguf-sandbox embed: error: --threads must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not MIN_PRECISION <= args.precision <= MAX_PRECISION:
        print(
            f"gguf-sandbox embed: error: --precision must be {MIN_PRECISION}–{MAX_PRECISION} decimals",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.input is None and not args.texts:
        print("gguf-sandbox embed: error: no texts; pass TEXT arguments or --input FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        _check_argument_texts(args.texts)
    except InputError as error:
        print(f"gguf-sandbox embed: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    texts = _texts(args)
    try:
        first = next(texts, None)
        if first is None:
            print(f"gguf-sandbox embed: error: no texts in {args.input}", file=sys.stderr)
            return EXIT_USAGE
        with Embedder.open(
            args.model,
            plan=args.plan,
            batch_size=args.batch_size,
            drop_cache=args.drop_page_cache,
            pooling=args.pooling,
            threads=args.threads,
        ) as embedder:
            _write_document(embedder, _batches(_chain(first, texts), args.batch_size), args.precision)
    except BudgetExceeded as error:
        print(f"gguf-sandbox embed: refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except GGUFSandboxError as error:
        print(f"gguf-sandbox embed: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        texts.close()
    return EXIT_OK


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
