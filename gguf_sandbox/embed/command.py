"""`gguf-sandbox embed`: embed texts from the command line or a file and print the vectors as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gguf_sandbox.embed.weights import PlanName


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a BERT GGUF file")
    parser.add_argument(
        "--plan",
        default="auto",
        choices=["auto", *(p.value for p in PlanName)],
        help="where weights live while embedding (default: chosen from the detected memory limit)",
    )
    parser.add_argument("--input", type=Path, help="a file of texts, one per line ('-' for stdin)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--precision", type=int, default=7, help="decimals per vector component (default 7)")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (after those of --input)")


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts: list[str] = []
    if args.input is not None:
        stdin = str(args.input) == "-"
        content = sys.stdin.read() if stdin else args.input.read_text(encoding="utf-8")
        texts.extend(line for line in content.splitlines() if line.strip())
    texts.extend(args.texts)
    return texts


def run(args: argparse.Namespace) -> int:
    """Print one JSON object: the model, the plan, and [{"text", "embedding"}] in input order."""
    from gguf_sandbox.embed.engine import Embedder

    texts = _read_texts(args)
    if not texts:
        print("gguf-sandbox embed: error: no texts; pass TEXT arguments or --input FILE", file=sys.stderr)
        return 2
    with Embedder.open(args.model, plan=args.plan, batch_size=args.batch_size) as embedder:
        vectors = embedder.embed(texts)
        report = {
            "model": embedder.model_name,
            "plan": embedder.plan,
            "preferred_plan": embedder.preferred_plan,
            "dimension": embedder.dimension,
            "pooling": embedder.pooling,
            "data": [
                {"text": text, "embedding": [round(float(v), args.precision) for v in vector]}
                for text, vector in zip(texts, vectors, strict=True)
            ],
        }
    json.dump(report, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
