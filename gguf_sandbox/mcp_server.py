"""`gguf-sandbox serve`: the embedding engine as a stdio MCP server that stays inside its memory limit.

Start-up, each step refusing gracefully (exit 3 + a JSON error on stderr) rather than risking an OOM kill:
the detected limit is checked against the server's measured floor *before* the MCP SDK is imported (the
SDK alone costs ~25–35 MiB of a cell); the SDK and the engine are imported and the page cache their files
left is given back; then the Embedder opens (its budget counts the imports as spent) and a reservation
for serving itself is taken from its budget. Embedding runs in worker threads under the engine's admission
control while the event loop keeps answering other requests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any

from gguf_sandbox import __version__, budget
from gguf_sandbox.errors import BudgetExceeded, GGUFSandboxError

if TYPE_CHECKING:
    from gguf_sandbox.budget import Reservation
    from gguf_sandbox.embed.engine import Embedder

SERVER_NAME = "gguf-sandbox"
# The SDK line this server is written and measured against (the `mcp` extra pins it); 2.x also works.
SDK_REQUIREMENT = "mcp>=1.21.1,<2"

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_BAD_INPUT = 4

MAX_TEXTS = 64
MAX_CHARS = 8192
# embed calls computing at once; more wait here, and each forward pass also queues for the engine's budget.
EMBED_WORKERS = 2
# What one vector component costs until the response is written: a Python float in a list, its JSON text
# in the TextContent and again in the serialized structuredContent.
RESPONSE_BYTES_PER_VALUE = 96
RESERVE_TIMEOUT_S = 120.0

MiB = 1 << 20
# Held in the engine's budget for the server's lifetime, before the plan is chosen: what serving needs
# beyond the forward passes and the per-call response reservations. Measured in a cold 256 MiB cell:
# resident memory grows ~10 MiB past the Embedder's baseline once serving (SDK session, worker threads,
# JSON), and ~11 MiB of file pages (code, the streamed model) stay active.
SERVING_RESERVE = 8 * MiB
# The smallest limit at which `serve` starts and answers 1000 embed calls of all-MiniLM-L6-v2 Q8_0 with a
# cold page cache (the interpreter's, the packages' and the model's pages evicted first: the worst case),
# bisected over real cgroup limits (see the README): mcp 1.30 at 88 MiB, mcp 2.3 at 94–96 MiB. A few MiB
# above it the engine may still refuse, gracefully, when more of the imports' file pages are charged to the
# cell. Below the floor `serve` refuses before importing the SDK.
MEMORY_FLOOR: Mapping[int, int] = MappingProxyType({1: 88 * MiB, 2: 96 * MiB})


# -- tools ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    """A tool as tools/list announces it; the SDK adapters turn it into the SDK's Tool type."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any]


@dataclass(frozen=True)
class ToolReply:
    """A tool call's outcome: structured content and its JSON text, or an error message (isError)."""

    text: str
    structured: Mapping[str, Any] | None = None
    is_error: bool = False

    @classmethod
    def error(cls, message: str) -> ToolReply:
        return cls(message, None, True)

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> ToolReply:
        return cls(json.dumps(payload, separators=(",", ":"), ensure_ascii=False), payload)


@dataclass(frozen=True)
class ServeLimits:
    """Per-call input limits, announced in the tool descriptions and enforced before any work."""

    max_texts: int = MAX_TEXTS
    max_chars: int = MAX_CHARS


class ToolInputError(ValueError):
    """A tool call's arguments are malformed; the message goes back to the client as a tool error."""


def _embed_arguments(arguments: Mapping[str, Any] | None, limits: ServeLimits) -> tuple[list[str], bool]:
    """(texts, normalize) from embed's arguments, or ToolInputError naming what is wrong and the limit."""
    if not isinstance(arguments, Mapping):
        raise ToolInputError(f"arguments must be an object, got {type(arguments).__name__}")
    unknown = sorted(set(arguments) - {"texts", "normalize"})
    if unknown:
        raise ToolInputError(f"unknown argument(s) {', '.join(unknown)}; embed takes texts and normalize")
    if "texts" not in arguments:
        raise ToolInputError(f"texts is required: a list of 1–{limits.max_texts} strings")
    texts = arguments["texts"]
    if not isinstance(texts, list):
        raise ToolInputError(
            f"texts must be a list of strings, got {type(texts).__name__}; wrap a single text in a list"
        )
    if not texts:
        raise ToolInputError(f"texts is empty; send 1–{limits.max_texts} texts per call")
    if len(texts) > limits.max_texts:
        raise ToolInputError(
            f"texts has {len(texts)} items, at most {limits.max_texts} per call; split it into several calls"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ToolInputError(f"texts[{index}] is {type(text).__name__}, not a string")
        if len(text) > limits.max_chars:
            raise ToolInputError(
                f"texts[{index}] has {len(text):,} characters, at most {limits.max_chars:,} per text; "
                "shorten or split it"
            )
    normalize = arguments.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ToolInputError(f"normalize must be true or false, got {normalize!r}")
    return texts, normalize


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class EmbeddingService:
    """The server's tools over one Embedder, independent of the SDK version that carries them."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        architecture: str,
        limit: budget.MemoryLimit,
        floor: int,
        sdk: str,
        limits: ServeLimits = ServeLimits(),
        workers: int = EMBED_WORKERS,
        serving: Reservation | None = None,
    ) -> None:
        import anyio

        self._embedder = embedder
        self._serving = serving
        self._architecture = architecture
        self._limit = limit
        self._floor = floor
        self._sdk = sdk
        self.limits = limits
        self._workers = anyio.CapacityLimiter(workers)
        self._handlers: Mapping[str, Callable[[Mapping[str, Any] | None], Any]] = {
            "embed": self._embed,
            "model_info": self._model_info,
        }
        self.tools = (self._embed_spec(), self._model_info_spec())

    # -- descriptions ---------------------------------------------------------------------------------
    def _embed_spec(self) -> ToolSpec:
        embedder, limits = self._embedder, self.limits
        return ToolSpec(
            name="embed",
            description=(
                f"Embed texts with {embedder.model_name} ({embedder.pooling} pooling, dimension "
                f"{embedder.dimension}). Limits: 1–{limits.max_texts} texts per call, at most "
                f"{limits.max_chars:,} characters per text (longer requests are refused; tokens beyond the "
                f"model's context of {embedder.context_length} are cut). Returns vectors (one per text, "
                "in order), dimension and model. Calls that do not fit the server's memory budget return "
                "an error; retry with fewer texts."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "texts": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": limits.max_chars},
                        "minItems": 1,
                        "maxItems": limits.max_texts,
                        "description": f"1–{limits.max_texts} texts of at most {limits.max_chars} characters",
                    },
                    "normalize": {
                        "type": "boolean",
                        "default": True,
                        "description": "return unit-length vectors (cosine similarity = dot product)",
                    },
                },
                "required": ["texts"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    # Items left undescribed on purpose: SDK clients validate results against this
                    # schema, and checking 64 × 384 numbers costs them ~0.5 s per call.
                    "vectors": {
                        "type": "array",
                        "description": "one vector (a list of `dimension` numbers) per text, in order",
                    },
                    "dimension": {"type": "integer"},
                    "model": {"type": "string"},
                    "count": {"type": "integer"},
                    "normalized": {"type": "boolean"},
                    "plan": {"type": "string"},
                },
                "required": ["vectors", "dimension", "model"],
            },
        )

    def _model_info_spec(self) -> ToolSpec:
        return ToolSpec(
            name="model_info",
            description=(
                "The served model (architecture, dimension, context length, pooling), the weight plan it "
                "runs on, the per-call limits, and the server's memory: limit, current use and peak."
            ),
            input_schema={"type": "object", "properties": {}, "additionalProperties": False},
            output_schema={
                "type": "object",
                "properties": {
                    "model": {"type": "string"},
                    "architecture": {"type": "string"},
                    "dimension": {"type": "integer"},
                    "context_length": {"type": "integer"},
                    "plan": {"type": "string"},
                    "memory": {"type": "object"},
                },
                "required": ["model", "architecture", "dimension", "context_length", "plan", "memory"],
            },
        )

    def close(self) -> None:
        """Wait for running embeddings, then release the Embedder and the serving reservation."""
        self._embedder.close()
        if self._serving is not None:
            self._serving.release()

    # -- calls ----------------------------------------------------------------------------------------
    async def call(self, name: str, arguments: Mapping[str, Any] | None) -> ToolReply:
        """Run tool `name`; every failure becomes an error reply, so the server keeps serving."""
        handler = self._handlers.get(name)
        if handler is None:
            return ToolReply.error(f"unknown tool {name!r}; this server has {', '.join(self._handlers)}")
        try:
            reply: ToolReply = await handler(arguments)
        except ToolInputError as error:
            return ToolReply.error(f"{name}: {error}")
        except BudgetExceeded as error:
            return ToolReply.error(f"{name}: refused by the memory budget: {error}")
        except Exception as error:  # a bug must cost one call, not the server
            return ToolReply.error(f"{name}: internal error: {type(error).__name__}: {error}")
        return reply

    async def _embed(self, arguments: Mapping[str, Any] | None) -> ToolReply:
        import anyio.to_thread

        texts, normalize = _embed_arguments(arguments, self.limits)
        if not normalize:
            raise ToolInputError(
                "normalize=false is not available: the engine returns unit-length vectors only"
            )
        reply: ToolReply = await anyio.to_thread.run_sync(self._embed_sync, texts, limiter=self._workers)
        return reply

    def _embed_sync(self, texts: Sequence[str]) -> ToolReply:
        """Worker thread: embed, then hold room for the response while building both of its forms.

        The room is taken after the forward passes, never while they wait for theirs: holding one
        reservation while waiting for another deadlocked two workers.
        """
        embedder = self._embedder
        vectors = embedder.embed(texts)  # [n, dim] float32, unit length
        nbytes = len(texts) * embedder.dimension * RESPONSE_BYTES_PER_VALUE
        memory = embedder.budget
        with memory.reserve_blocking(
            f"embed response for {len(texts)} texts", nbytes, RESERVE_TIMEOUT_S, cap=max(nbytes, memory.cap)
        ):
            head = {
                "model": embedder.model_name,
                "dimension": embedder.dimension,
                "count": len(texts),
                "normalized": True,
                "plan": embedder.plan,
            }
            # float32 → Python float is exact, and JSON keeps every digit: clients get the same bits.
            rows = vectors.tolist()
            # One row at a time: a single json.dumps of 64 × 384 floats holds the GIL for ~45 ms, which
            # the event loop (and every other request) would wait for.
            text = json.dumps(head, ensure_ascii=False)[:-1] + ',"vectors":['
            text += ",".join(json.dumps(row) for row in rows) + "]}"
            return ToolReply(text, {**head, "vectors": rows})

    async def _model_info(self, arguments: Mapping[str, Any] | None) -> ToolReply:
        if arguments:
            raise ToolInputError(f"model_info takes no arguments, got {', '.join(sorted(arguments))}")
        return ToolReply.of(self.model_info())

    def model_info(self) -> dict[str, Any]:
        embedder, memory = self._embedder, self._embedder.budget
        return {
            "model": embedder.model_name,
            "architecture": self._architecture,
            "dimension": embedder.dimension,
            "context_length": embedder.context_length,
            "pooling": embedder.pooling,
            "plan": embedder.plan,
            "preferred_plan": embedder.preferred_plan,
            "degraded": embedder.degraded,
            "limits": {"max_texts": self.limits.max_texts, "max_chars": self.limits.max_chars},
            "memory": {
                "limit_bytes": self._limit.limit_bytes,
                "limit_source": self._limit.source,
                "floor_bytes": self._floor,
                "current_bytes": budget.current_usage(),
                "peak_bytes": budget.peak_usage(),
                "peak_rss_bytes": _peak_rss(),
                "budget_bytes": memory.limit,
                "budget_baseline_bytes": memory.baseline,
                "budget_in_use_bytes": memory.in_use,
                "budget_peak_bytes": memory.peak,
            },
            "server": {
                "name": SERVER_NAME,
                "version": __version__,
                "sdk": self._sdk,
                "python": platform.python_version(),
            },
        }


# -- SDK adapters ----------------------------------------------------------------------------------------
def _sdk(module: str) -> Any:
    """An SDK module, typed Any: the code below runs against both SDK majors, whose types differ."""
    return importlib.import_module(module)


def _tool(types: Any, spec: ToolSpec) -> Any:
    # Both majors accept the protocol's camelCase names (2.x validates by alias as well as by name).
    return types.Tool(
        name=spec.name,
        description=spec.description,
        inputSchema=dict(spec.input_schema),
        outputSchema=dict(spec.output_schema),
    )


def _result(types: Any, reply: ToolReply) -> Any:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=reply.text)],
        structuredContent=None if reply.structured is None else dict(reply.structured),
        isError=reply.is_error,
    )


def _instructions(service: EmbeddingService) -> str:
    return (
        f"Text embeddings from a GGUF model served inside a memory limit. Call `embed` with up to "
        f"{service.limits.max_texts} texts; `model_info` shows the model, the plan and memory use."
    )


async def _serve_v1(service: EmbeddingService) -> None:
    """mcp 1.x: the low-level Server with decorator registration (stable since 1.0)."""
    types = _sdk("mcp.types")
    server = _sdk("mcp.server.lowlevel").Server(
        SERVER_NAME, version=__version__, instructions=_instructions(service)
    )

    async def list_tools() -> list[Any]:
        return [_tool(types, spec) for spec in service.tools]

    async def call_tool(name: str, arguments: dict[str, Any] | None) -> Any:
        return _result(types, await service.call(name, arguments))

    server.list_tools()(list_tools)
    # Our own validation gives clearer messages than the schema validator and skips its cost.
    server.call_tool(validate_input=False)(call_tool)
    async with _sdk("mcp.server.stdio").stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def _serve_v2(service: EmbeddingService) -> None:
    """mcp 2.x: the low-level Server with constructor-registered handlers."""
    types = _sdk("mcp.types")

    async def list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=[_tool(types, spec) for spec in service.tools])

    async def call_tool(ctx: Any, params: Any) -> Any:
        return _result(types, await service.call(params.name, params.arguments))

    server = _sdk("mcp.server.lowlevel").Server(
        SERVER_NAME,
        version=__version__,
        instructions=_instructions(service),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    async with _sdk("mcp.server.stdio").stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


_ADAPTERS: Mapping[int, Callable[[EmbeddingService], Any]] = MappingProxyType({1: _serve_v1, 2: _serve_v2})


# -- command -------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`72m`, `1g`, `65536` → bytes (binary units); argparse type for --memory-floor."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 72m, 1g or bytes") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return int(size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a BERT GGUF file")
    parser.add_argument(
        "--plan", default="auto", help="weight plan (default: chosen from the detected memory limit)"
    )
    parser.add_argument(
        "--memory-floor",
        type=parse_size,
        metavar="SIZE",
        help="refuse to start below this limit (default: the measured floor for the installed SDK; 0 = off)",
    )
    parser.add_argument(
        "--max-texts", type=int, default=MAX_TEXTS, help=f"texts per embed call (default {MAX_TEXTS})"
    )
    parser.add_argument(
        "--max-chars", type=int, default=MAX_CHARS, help=f"characters per text (default {MAX_CHARS})"
    )


def sdk_version() -> str | None:
    """The installed `mcp` distribution's version, read from its metadata (the SDK is not imported)."""
    try:
        return importlib.metadata.version("mcp")
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _emit_failure(code: int, kind: str, message: str, **details: Any) -> int:
    """Explain on stderr, then the JSON error as a line of its own: a stdio MCP server must not write
    anything but protocol messages to stdout, so refusals never go there."""
    limit = budget.detect_limit()
    error = {
        "error": message,
        "kind": kind,
        "limit": limit.limit_bytes,
        "limit_source": limit.source,
        "peak_rss": _peak_rss(),
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

    Importing the SDK reads ~700 modules. On a cold page cache those clean pages are charged to the cell,
    and the engine's budget counts them as spent: at 96 MiB they filled the limit and left no room at all
    for a forward pass, although the kernel reclaims them first. Pages still mapped stay.
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


def _open_embedder(model: Path, plan: str) -> tuple[Embedder, Reservation]:
    """The Embedder, opened on a budget that already holds the serving reservation, so that its plan and
    its largest pass leave that room (a pass that can never fit would otherwise wait forever)."""
    from gguf_sandbox.budget import MemoryBudget
    from gguf_sandbox.embed.engine import Embedder
    from gguf_sandbox.embed.weights import PlanName

    # The smallest plan opens fast and detects the budget the way Embedder.open does: after the tokenizer
    # is built, so that its vocabulary counts as spent.
    with Embedder.open(model, plan=PlanName.STREAMING.value) as probe:
        detected = probe.budget
    memory = MemoryBudget(
        detected.limit, cap=detected.cap, baseline=detected.baseline, origin=detected.origin
    )
    serving = memory.reserve(
        "serving MCP (protocol objects, worker threads, active file pages)",
        SERVING_RESERVE,
        cap=max(SERVING_RESERVE, memory.cap),
    )
    try:
        return Embedder.open(model, plan=plan, budget=memory), serving
    except BaseException:
        serving.release()
        raise


def _open_service(
    args: argparse.Namespace, *, limit: budget.MemoryLimit, floor: int, sdk: str, limits: ServeLimits
) -> EmbeddingService:
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(args.model) as gguf:
        architecture = gguf.architecture or "unknown"
    embedder, serving = _open_embedder(args.model, args.plan)
    try:
        return EmbeddingService(
            embedder,
            architecture=architecture,
            limit=limit,
            floor=floor,
            sdk=sdk,
            limits=limits,
            serving=serving,
        )
    except BaseException:
        serving.release()
        embedder.close()
        raise


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_OK)


def run(args: argparse.Namespace) -> int:
    limits = ServeLimits(max_texts=args.max_texts, max_chars=args.max_chars)
    if limits.max_texts < 1 or limits.max_chars < 1:
        return _emit_failure(EXIT_BAD_INPUT, "ValueError", "--max-texts and --max-chars must be at least 1")
    version = sdk_version() or ""
    major = _major(version)
    if major is None or major not in _ADAPTERS:
        found = f"mcp {version} is installed" if version else "not installed"
        return _emit_failure(
            EXIT_BAD_INPUT,
            "MissingDependency",
            f"the MCP SDK is needed ({found}); hint: pip install 'gguf-sandbox[mcp]' ({SDK_REQUIREMENT})",
        )
    if not args.model.is_file():
        return _emit_failure(
            EXIT_BAD_INPUT, "FileNotFoundError", f"model {args.model} does not exist; pass --model PATH"
        )
    floor = MEMORY_FLOOR[major] if args.memory_floor is None else args.memory_floor
    limit = budget.detect_limit()
    if limit.limit_bytes < floor:
        return _emit_failure(
            EXIT_REFUSED,
            "BudgetExceeded",
            f"the MCP server needs at least {floor / MiB:.0f} MiB (its measured floor with mcp {version}), "
            f"the {limit.source} limit is {limit.limit_bytes / MiB:.0f} MiB; hint: raise the memory limit, "
            "or use the engine without MCP (`gguf-sandbox embed`), which needs less",
            floor=floor,
            sdk=f"mcp {version}",
        )
    serve = _ADAPTERS[major]
    # Everything is imported before the Embedder opens, so that its budget counts it as spent; then the
    # page cache those imports left behind is given back.
    _sdk("mcp")
    _sdk("gguf_sandbox.embed.engine")
    release_import_cache()
    try:
        service = _open_service(args, limit=limit, floor=floor, sdk=f"mcp {version}", limits=limits)
    except BudgetExceeded as error:
        return _emit_failure(EXIT_REFUSED, "BudgetExceeded", str(error), floor=floor, sdk=f"mcp {version}")
    except (GGUFSandboxError, ValueError, OSError) as error:
        return _emit_failure(EXIT_BAD_INPUT, type(error).__name__, str(error))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    anyio = _sdk("anyio")
    try:
        anyio.run(serve, service)
    except Exception as error:
        if not _client_gone(error, (anyio.ClosedResourceError, anyio.BrokenResourceError)):
            raise
        # The client went away mid-request (older 1.x SDKs then fail the response's send): nothing is left
        # to answer, and nothing may be flushed into the closed pipe.
        print("gguf-sandbox serve: the client disconnected during a request; exiting", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        service.close()
    return EXIT_OK


def _client_gone(error: BaseException, closed: tuple[type[BaseException], ...]) -> bool:
    """True when `error`, or every leaf of an exception group, says the client's stream is closed."""
    nested = getattr(error, "exceptions", None)
    if isinstance(nested, (list, tuple)) and nested:
        return all(_client_gone(inner, closed) for inner in nested)
    return isinstance(error, (*closed, BrokenPipeError, ConnectionResetError))
