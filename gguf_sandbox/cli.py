"""Command line: one argparse subcommand per module, imported only when that subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gguf_sandbox import __version__
from gguf_sandbox.errors import GGUFSandboxError


@dataclass(frozen=True)
class Subcommand:
    """A subcommand lives in `module`, which defines add_arguments(parser) and run(args) -> int."""

    name: str
    module: str
    help: str


# Lazy on purpose: a workload inside a 64 MB cell must not pay for docker, yaml or mcp imports.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("inspect", "gguf_sandbox.gguf.inspect", "summarize a GGUF file without reading tensor data"),
    Subcommand("convert", "gguf_sandbox.embed.convert", "convert a Hugging Face BERT checkpoint to GGUF"),
    Subcommand("embed", "gguf_sandbox.embed.command", "embed texts and print JSON vectors"),
    Subcommand(
        "tokenize", "gguf_sandbox.tokenizers.command", "print llama.cpp's token ids of texts as JSON lines"
    ),
    Subcommand(
        "workload", "gguf_sandbox.workloads.command", "run one named workload and print its JSON report"
    ),
    Subcommand("run", "gguf_sandbox.matrix.runner", "run the resource-limit matrix from matrix.yaml"),
    Subcommand(
        "merge", "gguf_sandbox.matrix.merge", "join the results files of matrix shards into one results file"
    ),
    Subcommand(
        "report", "gguf_sandbox.matrix.report", "write an HTML/PNG/Markdown report of matrix results files"
    ),
    Subcommand(
        "repro", "gguf_sandbox.matrix.repro", "run one cell (a workload or any command) under a memory limit"
    ),
    Subcommand(
        "floor",
        "gguf_sandbox.matrix.floor",
        "bisect the smallest memory limit a workload or command finishes in",
    ),
    Subcommand(
        "images", "gguf_sandbox.sandbox.docker.images", "build the per-Python Docker images for the matrix"
    ),
    Subcommand("serve", "gguf_sandbox.mcp.serve", "serve the embedding engine over MCP (stdio)"),
)


def _parser_for(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    parser = argparse.ArgumentParser(prog="gguf-sandbox", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gguf-sandbox {__version__}")
    # Not "command": a subcommand's own arguments share the namespace (repro's `-- CMD …` is `command`).
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen_parser = None
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        if sub.name == chosen:
            importlib.import_module(sub.module).add_arguments(sub_parser)
            sub_parser.set_defaults(handler_module=sub.module)
            chosen_parser = sub_parser
    return parser, chosen_parser


# Small matmuls dominate embedding; a BLAS thread pool costs more than it gains there, and much more on a
# shared host (measured 2–5x slower with 2 threads on 2 cores). Users can still set their own values.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _utf8_output() -> None:
    """Our JSON (embed, tokenize, inspect --json) is UTF-8 whatever the locale or PYTHONIOENCODING says: a
    latin-1 stdout made a text with a euro sign a traceback. What UTF-8 cannot hold is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _utf8_output()
    for variable in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(variable, "1")  # before any subcommand imports numpy
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = _parser_for(args_list)
    args, unknown = parser.parse_known_args(args_list)
    if unknown:
        # The subcommand's parser says it, so the message reads `gguf-sandbox SUBCOMMAND: error: …`.
        (chosen or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    module_name = getattr(args, "handler_module", None)
    if module_name is None:
        parser.print_help()
        return 2
    try:
        result: int = importlib.import_module(module_name).run(args)
    except GGUFSandboxError as error:
        print(f"gguf-sandbox {args.subcommand}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError as error:
        # A limit the budget cannot see (an address-space rlimit, say) refused an allocation.
        detail = str(error) or "an allocation failed"
        print(f"gguf-sandbox {args.subcommand}: error: out of memory: {detail}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"gguf-sandbox {args.subcommand}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return result
