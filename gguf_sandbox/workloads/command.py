"""`gguf-sandbox workload NAME`: the registry of named workloads (resolved lazily) and its command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from gguf_sandbox import budget
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError
from gguf_sandbox.workloads.report import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_REFUSED,
    MAX_BATCH,
    MAX_COUNT,
    MAX_THREADS,
    MAX_VECTORS,
    SAMPLE_TEXTS,
    Report,
)

Workload = Callable[[Path, argparse.Namespace], Report]
# Resolved only when run: a parse cell imports no engine, an embed cell no MCP client.
WORKLOADS: Mapping[str, str] = MappingProxyType(
    {
        "parse": "gguf_sandbox.workloads.reader:parse",
        "stream": "gguf_sandbox.workloads.reader:stream",
        "embed": "gguf_sandbox.workloads.embed:embed",
        "embed-concurrent": "gguf_sandbox.workloads.embed:embed_concurrent",
        "mcp": "gguf_sandbox.workloads.mcp:local_workload",
        # Peers: what people use today, embedding the same corpus (workloads/peers.py).
        "llama-cpp": "gguf_sandbox.workloads.peers:llama_cpp",
        "sentence-transformers": "gguf_sandbox.workloads.peers:sentence_transformers",
        "gguf-py": "gguf_sandbox.workloads.peers:gguf_py",
    }
)


def resolve(name: str) -> Workload:
    """The function of workload `name` (imported now)."""
    module, _, function = WORKLOADS[name].partition(":")
    found: Workload = getattr(importlib.import_module(module), function)
    return found


# The workloads that open an Embedder with --pooling (the mcp workload's server runs the model's pooling).
POOLING_WORKLOADS = ("embed", "embed-concurrent", "llama-cpp", "gguf-py")
PEER_WORKLOADS = ("llama-cpp", "sentence-transformers", "gguf-py")
# The workloads that can carry whole vectors of some texts (--vectors): embed and the peers.
VECTOR_WORKLOADS = ("embed", *PEER_WORKLOADS)
DEFAULT_COUNTS = {
    "parse": 20,
    "stream": 1,
    "embed": 1000,
    "embed-concurrent": 400,
    "mcp": 1000,
    **dict.fromkeys(PEER_WORKLOADS, 1000),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(WORKLOADS), help="the workload")
    parser.add_argument("--model", required=True, type=Path, help="the GGUF file")
    parser.add_argument("--count", type=int, help="repetitions / embeddings (default per workload)")
    parser.add_argument("--threads", type=int, default=8, help="callers for embed-concurrent")
    parser.add_argument("--batch", type=int, default=1, help="texts per embed call")
    parser.add_argument("--plan", default="auto", help="weight plan for embedding workloads")
    # Checked by the engine (mean, last, cls): choices here would import it into every cell.
    parser.add_argument("--pooling", help="pooling instead of the model's (mean, last, cls)")
    parser.add_argument(
        "--vectors",
        type=int,
        help=f"texts whose whole vectors the report carries (default: {SAMPLE_TEXTS} for peers, else 0)",
    )


def run(args: argparse.Namespace) -> int:
    if args.count is None:
        args.count = DEFAULT_COUNTS[args.name]
    if args.vectors is None:
        args.vectors = SAMPLE_TEXTS if args.name in PEER_WORKLOADS else 0
    if not (
        1 <= args.count <= MAX_COUNT and 1 <= args.batch <= MAX_BATCH and 1 <= args.threads <= MAX_THREADS
    ):
        return _fail(
            EXIT_BAD_INPUT,
            "ValueError",
            f"--count takes 1 to {MAX_COUNT:,}, --batch 1 to {MAX_BATCH:,} and --threads 1 to {MAX_THREADS}",
        )
    if not 0 <= args.vectors <= MAX_VECTORS or (args.vectors and args.name not in VECTOR_WORKLOADS):
        return _fail(
            EXIT_BAD_INPUT,
            "ValueError",
            f"--vectors takes 0 to {MAX_VECTORS} and applies to the {_listed(VECTOR_WORKLOADS)} workloads "
            "only",
        )
    if args.pooling is not None and args.name not in POOLING_WORKLOADS:
        return _fail(
            EXIT_BAD_INPUT,
            "ValueError",
            f"--pooling applies to the {_listed(POOLING_WORKLOADS)} workloads only, not {args.name}",
        )
    if not args.model.is_file():
        return _fail(
            EXIT_BAD_INPUT, "FileNotFoundError", f"model {args.model} does not exist; pass --model PATH"
        )
    try:
        report = resolve(args.name)(args.model, args)
    except BudgetExceeded as error:
        return _fail(EXIT_REFUSED, "BudgetExceeded", str(error))
    except GGUFSandboxError as error:
        return _fail(EXIT_BAD_INPUT, type(error).__name__, str(error))
    print(json.dumps(report.as_json()), flush=True)
    return EXIT_OK


def _listed(names: tuple[str, ...]) -> str:
    """`a, b and c`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _fail(code: int, kind: str, message: str) -> int:
    limit = budget.detect_limit()
    print(
        json.dumps(
            {
                "error": message,
                "kind": kind,
                "limit": limit.limit_bytes,
                "limit_source": limit.source,
                "peak_rss": budget.peak_rss(),
            }
        ),
        flush=True,
    )
    print(f"gguf-sandbox workload: {kind}: {message}", file=sys.stderr)
    return code
