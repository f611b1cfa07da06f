"""`gguf-sandbox serve`: the embedding engine as a stdio MCP server that stays inside its memory limit.

Start-up, each step refusing gracefully (exit 3 + a JSON error on stderr) rather than risking an OOM kill:
the detected limit is checked against the server's floor (serve_floor) before numpy or the engine is
imported; the engine is imported and the page cache its files left is given back; then the Embedder opens
on a budget that already holds the serving reservation (serving_reserve: a request line of up to
FREE_LINE_BYTES being parsed, plus the texts of admitted calls; longer lines reserve room as they grow, up
to line_cap). The protocol is mcp/session.py's, over mcp/jsonrpc.py's bounded lines: no MCP SDK in
this process.
Embedding runs in worker threads under the engine's admission control while the reading thread keeps
answering other requests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gguf_sandbox import __version__, budget, units
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError
from gguf_sandbox.mcp.server import (
    EMBED_WORKERS,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_REFUSED,
    FREE_LINE_BYTES,
    MAX_CHARS,
    MAX_TEXTS,
    SERVER_NAME,
    EmbeddingService,
    MiB,
    ServeLimits,
    line_cap,
    serve_floor,
    serving_reserve,
)
from gguf_sandbox.mcp.session import (
    ServerInfo,
    Session,
)

if TYPE_CHECKING:
    from gguf_sandbox.budget import Reservation
    from gguf_sandbox.embed.engine import Embedder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="a GGUF file (BERT, llama, qwen2, qwen3, gemma3)"
    )
    parser.add_argument(
        "--plan", default="auto", help="weight plan (default: chosen from the detected memory limit)"
    )
    # Checked by the engine (mean, last, cls), which is imported only after the floor check.
    parser.add_argument("--pooling", help="pooling instead of the model's (mean, last, cls)")
    parser.add_argument(
        "--memory-floor",
        type=units.size_arg(minimum=0),
        metavar="SIZE",
        help="refuse to start below this limit (default: the server's measured floor; 0 = off)",
    )
    parser.add_argument(
        "--max-texts", type=int, default=MAX_TEXTS, help=f"texts per embed call (default {MAX_TEXTS})"
    )
    parser.add_argument(
        "--max-chars", type=int, default=MAX_CHARS, help=f"characters per text (default {MAX_CHARS})"
    )


def _emit_failure(code: int, kind: str, message: str, **details: Any) -> int:
    """Explain on stderr, then the JSON error as a line of its own: a stdio MCP server must not write
    anything but protocol messages to stdout, so refusals never go there."""
    limit = budget.detect_limit()
    error = {
        "error": message,
        "kind": kind,
        "limit": limit.limit_bytes,
        "limit_source": limit.source,
        "peak_rss": budget.peak_rss(),
        **details,
    }
    word = "refused" if code == EXIT_REFUSED else kind
    print(f"gguf-sandbox serve: {word}: {message}", file=sys.stderr)
    print(json.dumps(error), file=sys.stderr, flush=True)
    return code


def _module_files() -> set[str]:
    """Source, bytecode and extension files of every imported module, and every file mapped into us."""
    files: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(parts[5])
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not isinstance(source, str):
            continue
        files.add(source)
        if source.endswith(".py"):
            with contextlib.suppress(ValueError, NotImplementedError):
                files.add(importlib.util.cache_from_source(source))
    return files


def release_import_cache() -> int:
    """Drop the page cache of every imported module's files; returns how many files were advised.

    Importing numpy and the engine reads ~200 modules. On a cold page cache those clean pages are charged
    to the cell until the kernel reclaims them, and a budget that counts them as spent leaves less room
    for forward passes than there is. Pages still mapped stay.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    count = 0
    for path in _module_files():
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        except OSError:
            pass
        finally:
            os.close(descriptor)
    return count


def _open_embedder(model: Path, plan: str, reserve: int, pooling: str | None) -> tuple[Embedder, Reservation]:
    """The Embedder, opened on a budget that already holds the serving reservation, so that its plan and
    its largest pass leave that room (a pass that can never fit would otherwise wait forever)."""
    from gguf_sandbox.embed.engine import Embedder
    from gguf_sandbox.embed.plan import PlanName

    # The smallest plan opens fast and detects the budget the way Embedder.open does: after the tokenizer
    # is built, so that its vocabulary counts as spent.
    with Embedder.open(model, plan=PlanName.STREAMING.value, pooling=pooling) as probe:
        memory = probe.budget.emptied()
    serving = memory.reserve(
        "serving MCP (the largest request line being parsed, texts of admitted calls)",
        reserve,
        cap=max(reserve, memory.cap),
    )
    try:
        # The server's process runs nothing else on onnxruntime: its kernels (resident-int8, resident-f32
        # packed) may share one pool across their matrices (ort_kernel.share_process_pool; one text on 2
        # threads, resident-int8 5.6-6.7 -> 4.6-5.6 ms).
        embedder = Embedder.open(model, plan=plan, budget=memory, pooling=pooling, own_process=True)
        return embedder, serving
    except BaseException:
        serving.release()
        raise


def _open_service(
    args: argparse.Namespace, *, limit: budget.MemoryLimit, floor: int, limits: ServeLimits
) -> EmbeddingService:
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(args.model) as gguf:
        architecture = gguf.architecture or "unknown"
    embedder, serving = _open_embedder(args.model, args.plan, serving_reserve(limits), args.pooling)
    try:
        return EmbeddingService(
            embedder, architecture=architecture, limit=limit, floor=floor, limits=limits, serving=serving
        )
    except BaseException:
        serving.release()
        embedder.close()
        raise


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_OK)


def _claim_stdout() -> Any:
    """The protocol's own handle on stdout; fd 1 then points at stderr, so a stray print from anywhere
    in the process lands there instead of corrupting the JSON-RPC stream."""
    wire = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return wire


def run(args: argparse.Namespace) -> int:
    limits = ServeLimits(max_texts=args.max_texts, max_chars=args.max_chars)
    if limits.max_texts < 1 or limits.max_chars < 1:
        return _emit_failure(EXIT_BAD_INPUT, "ValueError", "--max-texts and --max-chars must be at least 1")
    if not args.model.is_file():
        return _emit_failure(
            EXIT_BAD_INPUT, "FileNotFoundError", f"model {args.model} does not exist; pass --model PATH"
        )
    try:
        floor = serve_floor() if args.memory_floor is None else args.memory_floor
    except GGUFSandboxError as error:  # a damaged floors.json
        return _emit_failure(EXIT_BAD_INPUT, type(error).__name__, str(error))
    limit = budget.detect_limit()
    if limit.limit_bytes < floor:
        return _emit_failure(
            EXIT_REFUSED,
            "BudgetExceeded",
            f"the MCP server needs at least {floor / MiB:.0f} MiB (its measured floor), the {limit.source} "
            f"limit is {limit.limit_bytes / MiB:.0f} MiB; hint: raise the memory limit",
            floor=floor,
        )
    # The engine is imported before the Embedder opens, so that its budget counts it as spent; then the
    # page cache those imports left behind is given back.
    importlib.import_module("gguf_sandbox.embed.engine")
    release_import_cache()
    try:
        service = _open_service(args, limit=limit, floor=floor, limits=limits)
    except BudgetExceeded as error:
        return _emit_failure(EXIT_REFUSED, "BudgetExceeded", str(error), floor=floor)
    except (GGUFSandboxError, ValueError, OSError) as error:
        return _emit_failure(EXIT_BAD_INPUT, type(error).__name__, str(error))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    session = Session(service, ServerInfo(SERVER_NAME, __version__), _claim_stdout(), workers=EMBED_WORKERS)
    stdin = sys.stdin.fileno()
    try:
        session.serve(lambda size: os.read(stdin, size), line_cap(limits), FREE_LINE_BYTES)
    finally:
        service.close()
    return EXIT_OK
