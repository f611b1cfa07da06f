"""The MCP server's tools (`embed`, `model_info`) over one Embedder, and the sizes bounding its lines."""

from __future__ import annotations

import json
import platform
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gguf_sandbox import __version__, budget
from gguf_sandbox.errors import BudgetExceeded, GGUFError, GGUFSandboxError
from gguf_sandbox.floors import load_floors
from gguf_sandbox.mcp.jsonrpc import READ_CHUNK
from gguf_sandbox.mcp.session import (
    PROTOCOL_VERSIONS,
    Prepared,
    Respond,
    ToolReply,
    ToolSpec,
)

if TYPE_CHECKING:
    from gguf_sandbox.budget import Reservation
    from gguf_sandbox.embed.engine import Embedder

SERVER_NAME = "gguf-sandbox"

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_BAD_INPUT = 4

MAX_TEXTS = 64
MAX_CHARS = 8192
# embed calls computing at once; more wait in the pool's queue, and each forward pass also queues for the
# engine's budget.
EMBED_WORKERS = 2
RESERVE_TIMEOUT_S = 120.0
# How long the reading thread waits for room to read a long line before refusing it.
LINE_ROOM_TIMEOUT_S = 30.0
MiB = 1 << 20

# -- sizes of requests and responses ------------------------------------------------------------------
# The most JSON text one character of a text can take: a character outside the BMP written by an
# ASCII-only encoder (json.dumps' default) as a surrogate pair, "\ud83d\ude00".
JSON_BYTES_PER_CHAR = len(json.dumps(chr(0x10FFFF))) - len('""')
# Everything of a tools/call line besides its texts: jsonrpc, id, method, tool name, normalize, and what
# clients add under _meta (progress tokens). An allowance, not a measurement: a line needing more is refused.
ENVELOPE_BYTES = 64 << 10
# A line is decoded piece by piece as it arrives, then the pieces are joined: its text is held twice (in
# every encoding the text takes at most as many bytes as the line); the parsed objects that follow are
# never larger than the text. tests/test_mcp_server.py measures the peak.
PARSE_COPIES = 2
# Lines up to this size are read under the serving reservation; a 64-text call of 8,192 ASCII characters
# each takes 0.5 MiB.
FREE_LINE_BYTES = 1 << 20
# The JSON of one float32 component as Python writes it, at its longest: a sign, 17 significant digits, a
# point and a two-digit negative exponent, then a comma ("-1.0000000180025095e-35,"); checked on extreme
# values in tests/test_mcp_server.py.
MAX_NUMBER_CHARS = 24
# An embed response is held as the vectors' JSON, which is both the structured content and the text
# content (mcp_session escapes and encodes it slice by slice as it writes); building it holds the rows'
# JSON and their join at once: two copies. tests/test_mcp_server.py measures the peak of building and
# writing one.
RESPONSE_COPIES = 2
# Bytes per character of a str holding any character beyond U+FFFF (PEP 393's widest form).
UCS4_BYTES = 4
RESPONSE_BYTES_PER_VALUE = RESPONSE_COPIES * MAX_NUMBER_CHARS


def serve_floor() -> int:
    """The limit below which `serve` refuses to start (bytes): the lowest `mcp` workload floor `gguf-sandbox
    floor --record` measured (floors.json: 1000 embed calls with a cold page cache; on this Python when
    measured there, over backends), 0 when none is recorded. The one place the floor is read from."""
    recorded = load_floors().lowest_floor("mcp", f"{sys.version_info.major}.{sys.version_info.minor}")
    return recorded.floor if recorded is not None else 0


@dataclass(frozen=True)
class ServeLimits:
    """Per-call input limits, announced in the tool descriptions and enforced before any work."""

    max_texts: int = MAX_TEXTS
    max_chars: int = MAX_CHARS


def line_cap(limits: ServeLimits) -> int:
    """The longest request line (bytes) accepted: `max_texts` texts of `max_chars` characters in their
    longest JSON form, each quoted and comma-separated, plus the envelope. 6.06 MiB for 64 × 8,192."""
    return limits.max_texts * (limits.max_chars * JSON_BYTES_PER_CHAR + len('"",')) + ENVELOPE_BYTES


def pending_cap(limits: ServeLimits) -> int:
    """Bytes of texts admitted embed calls may hold at once: one call per worker at the limits, each text
    as large as Python can make `max_chars` characters (4 bytes each). Smaller calls admit many more."""
    return EMBED_WORKERS * limits.max_texts * widest_string_bytes(limits.max_chars)


def widest_string_bytes(chars: int) -> int:
    """sys.getsizeof of a `chars`-character string of 4-byte characters, computed rather than built (a
    --max-chars of 10^9 must not allocate 4 GB to find out it is too large)."""
    one = sys.getsizeof(chr(0x10FFFF))
    return one + UCS4_BYTES * (chars - 1)


def serving_reserve(limits: ServeLimits) -> int:
    """Held in the engine's budget for the server's lifetime, before the plan is chosen: a line of up to
    FREE_LINE_BYTES being parsed (and the chunk being read), plus the texts of admitted calls. Longer
    lines and each response reserve their own room."""
    return PARSE_COPIES * FREE_LINE_BYTES + READ_CHUNK + pending_cap(limits)


class ToolInputError(ValueError):
    """A tool call's arguments are malformed; the message goes back to the client as a tool error."""


def _embed_arguments(arguments: object, limits: ServeLimits) -> tuple[list[str], bool]:
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


def error_reply(tool: str, error: Exception) -> ToolReply:
    """The tool error for `error`: its message for the reader, its class as the structured `kind`."""
    if isinstance(error, ToolInputError):
        return ToolReply.error(f"{tool}: {error}", "ToolInputError")
    if isinstance(error, BudgetExceeded):
        return ToolReply.error(f"{tool}: refused by the memory budget: {error}", "BudgetExceeded")
    if isinstance(error, GGUFSandboxError):
        return ToolReply.error(f"{tool}: {error}", type(error).__name__)
    return ToolReply.error(f"{tool}: internal error: {type(error).__name__}: {error}", "InternalError")


def embed_reply(head: Mapping[str, Any], vectors: Any) -> ToolReply:
    """The embed result: `head`'s fields and "vectors", whose JSON is also the text content.

    Row by row: a single json.dumps of 64 × 384 floats holds the GIL for ~45 ms, which the reading thread
    (and every other request) would wait for. float32 → Python float is exact and JSON keeps every digit:
    clients get the same bits.
    """
    rows = ",".join(json.dumps(row.tolist(), allow_nan=False, separators=(",", ":")) for row in vectors)
    text = "".join((json.dumps(dict(head), ensure_ascii=False)[:-1], ',"vectors":[', rows, "]}"))
    return ToolReply(text, text)


class EmbeddingService:
    """The server's tools over one Embedder: `embed` and `model_info` (a session.ToolHost)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        architecture: str,
        limit: budget.MemoryLimit,
        floor: int,
        limits: ServeLimits = ServeLimits(),
        serving: Reservation | None = None,
    ) -> None:
        self._embedder = embedder
        self._serving = serving
        self._architecture = architecture
        self._limit = limit
        self._floor = floor
        self.limits = limits
        self._pending_cap = pending_cap(limits)
        self._pending = 0
        self._pending_lock = threading.Lock()
        # The reading thread's only: room for a long line's bytes, and for parsing them.
        self._line_read: list[Reservation] = []
        self._line_room: list[Reservation] = []
        self.tools = (self._embed_spec(), self._model_info_spec())
        self.instructions = (
            f"Text embeddings from a GGUF model served inside a memory limit. Call `embed` with up to "
            f"{limits.max_texts} texts; `model_info` shows the model, the plan and memory use."
        )

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
                "in order), dimension and model; unit length unless normalize is false. Calls that do not "
                "fit the server's memory budget return an error of kind BudgetExceeded; retry with fewer "
                "texts."
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
                        "description": (
                            "true: unit-length vectors (cosine similarity = dot product); false: the pooled "
                            "vectors as the model computes them"
                        ),
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
            inline=True,
        )

    def close(self) -> None:
        """Wait for running embeddings, then release the Embedder and the serving reservation."""
        self._embedder.close()
        if self._serving is not None:
            self._serving.release()

    # -- calls ----------------------------------------------------------------------------------------
    def line_room(self, nbytes: int) -> bool:
        """Room to read `nbytes` more of a long request line, and to parse it, waiting a while for it.

        The line asks for more only once what it was granted is full, so the bytes granted before are read
        by now: they are marked allocated, and a re-measured working set (which holds them) does not count
        them a second time beside their reservation.
        """
        memory = self._embedder.budget
        for read in self._line_read:
            read.mark_allocated()
        parsing = int((PARSE_COPIES - 1) * nbytes)
        cap = max(nbytes, parsing, memory.cap)
        try:
            read = memory.reserve_blocking(
                "reading a long request line", nbytes, LINE_ROOM_TIMEOUT_S, cap=cap
            )
        except BudgetExceeded:
            return False
        try:
            parse = memory.reserve_blocking(
                "parsing a long request line", parsing, LINE_ROOM_TIMEOUT_S, cap=cap
            )
        except BudgetExceeded:
            read.release()
            return False
        self._line_read.append(read)
        self._line_room.append(parse)
        return True

    def release_line_room(self) -> None:
        for held in (self._line_read, self._line_room):
            while held:
                held.pop().release()

    def prepare(self, name: str, arguments: object) -> Prepared:
        """A reply now (model_info, every refusal), or the job computing an admitted embed call."""
        try:
            if name == "embed":
                return self._admit_embed(arguments)
            if name == "model_info":
                if arguments:
                    names = (
                        ", ".join(sorted(arguments)) if isinstance(arguments, Mapping) else repr(arguments)
                    )
                    raise ToolInputError(f"model_info takes no arguments, got {names}")
                return ToolReply.of(self.model_info())
        except Exception as error:  # a bug must cost one call, not the server
            return error_reply(name, error)
        tools = ", ".join(spec.name for spec in self.tools)
        return ToolReply.error(f"unknown tool {name!r}; this server has {tools}", "UnknownTool")

    def call(self, name: str, arguments: object) -> ToolReply:
        """prepare() and, for a job, run it here: one call from start to reply, in the calling thread."""
        prepared = self.prepare(name, arguments)
        if isinstance(prepared, ToolReply):
            return prepared
        replies: list[ToolReply] = []
        prepared(replies.append)
        return replies[0]

    def _admit_embed(self, arguments: object) -> Prepared:
        """Check the arguments and count the call's texts as pending; the texts wait in memory until a
        worker takes them, so calls beyond pending_cap are refused instead of queued."""
        texts, normalize = _embed_arguments(arguments, self.limits)
        size = sum(sys.getsizeof(text) for text in texts)
        with self._pending_lock:
            if self._pending + size > self._pending_cap:
                raise BudgetExceeded(
                    f"embed call of {len(texts)} texts while others are pending",
                    size,
                    self._pending_cap - self._pending,
                    "retry when the running calls finish, or send fewer or shorter texts per call",
                )
            self._pending += size

        def job(respond: Respond) -> None:
            try:
                self._embed(texts, normalize, respond)
            except Exception as error:
                respond(error_reply("embed", error))
            finally:
                with self._pending_lock:
                    self._pending -= size

        return job

    def _embed(self, texts: Sequence[str], normalize: bool, respond: Respond) -> None:
        """Worker thread: embed, then hold room for the response until it is written.

        The room is taken after the forward passes, never while they wait for theirs: holding one
        reservation while waiting for another deadlocked two workers.
        """
        import numpy as np

        embedder = self._embedder
        vectors = embedder.embed(texts, normalize=normalize)  # [n, dim] float32
        if not np.isfinite(vectors).all():
            raise GGUFError(
                f"the model {embedder.model_name} produced NaN or infinite values; its weights or "
                "hyperparameters are broken (check it with `gguf-sandbox inspect`)"
            )
        nbytes = len(texts) * embedder.dimension * RESPONSE_BYTES_PER_VALUE
        memory = embedder.budget
        with memory.reserve_blocking(
            f"embed response for {len(texts)} texts", nbytes, RESERVE_TIMEOUT_S, cap=max(nbytes, memory.cap)
        ):
            head = {
                "model": embedder.model_name,
                "dimension": embedder.dimension,
                "count": len(texts),
                "normalized": normalize,
                "plan": embedder.plan,
            }
            respond(embed_reply(head, vectors))

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
                "peak_rss_bytes": budget.peak_rss(),
                "budget_bytes": memory.limit,
                "budget_baseline_bytes": memory.baseline,
                "budget_in_use_bytes": memory.in_use,
                "budget_peak_bytes": memory.peak,
            },
            "server": {
                "name": SERVER_NAME,
                "version": __version__,
                "protocol_versions": list(PROTOCOL_VERSIONS),
                "python": platform.python_version(),
                "versions": _versions(),
            },
        }


def _versions() -> dict[str, str]:
    # Imported here: serve reads this module before its floor check, and the report module imports numpy.
    from gguf_sandbox.workloads.report import versions

    return versions()
