"""The MCP lifecycle over stdio: initialize, ping, tools/list and tools/call, answered while tools run.

This is what `gguf-sandbox serve` speaks instead of importing the MCP SDK's server: that costs 25–32 MiB of
anonymous memory (its pydantic protocol models, httpx, jsonschema; measured in tests/test_mcp_floor.py),
more than a 64 MiB cell has left once the interpreter, numpy and the engine are in. The protocol subset a
tools-only stdio server needs is small; the official SDK client (both majors) is what the tests check it
with. Lines are read through jsonrpc.read_lines, so no input is parsed before it is bounded.

Threads: the caller's thread reads stdin and answers everything quick on the spot (ping, tools/list, tools
the host marks inline, every error); slow tool calls run in a pool of `workers` threads and write their
own responses. Writes are serialized by a lock; once the client is gone, responses are dropped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from gguf_sandbox import log
from gguf_sandbox.mcp.jsonrpc import (
    Dropped,
    ErrorCode,
    Invalid,
    Message,
    RequestId,
    dropped_error,
    error_line,
    parse_message,
    read_lines,
    result_line,
    result_pieces,
)

LOG = log.get(__name__)

# The revisions whose initialize handshake this server answers; a client asking for another one is offered
# the newest (MCP's version negotiation), and decides whether to go on.
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# Large replies are escaped and encoded this many characters at a time: never a second whole copy.
WRITE_SLICE = 1 << 16


@dataclass(frozen=True)
class ToolSpec:
    """A tool as tools/list announces it; `inline` tools answer on the reading thread (they must be quick)."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any]
    inline: bool = False

    def announced(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputSchema": dict(self.input_schema),
            "outputSchema": dict(self.output_schema),
        }


@dataclass(frozen=True)
class ToolReply:
    """A tool call's outcome: its text content and its structured content as JSON text.

    Errors carry `{"error": message, "kind": kind}` as structured content, `kind` naming the error class
    (BudgetExceeded, GGUFError, ToolInputError, …) so clients can tell a refusal without reading prose.
    """

    text: str
    structured_json: str | None = None
    is_error: bool = False

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> ToolReply:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
        return cls(text, text)

    @classmethod
    def error(cls, message: str, kind: str) -> ToolReply:
        return cls(message, json.dumps({"error": message, "kind": kind}, ensure_ascii=False), True)

    @property
    def structured(self) -> dict[str, Any] | None:
        value = None if self.structured_json is None else json.loads(self.structured_json)
        return value if isinstance(value, dict) else None

    def result_pieces(self) -> Iterator[str]:
        """The CallToolResult object as pieces of JSON text, never joined: the structured JSON is embedded
        as it is, the text is escaped a slice at a time (a 64 × 384 result is ~600 kB of JSON)."""
        yield '{"content":[{"type":"text","text":"'
        for start in range(0, len(self.text), WRITE_SLICE):
            yield json.dumps(self.text[start : start + WRITE_SLICE], ensure_ascii=False)[1:-1]
        yield '"}]'
        if self.structured_json is not None:
            yield ',"structuredContent":'
            yield self.structured_json
        yield ',"isError":true}' if self.is_error else ',"isError":false}'


Respond = Callable[[ToolReply], None]
# A slow tool call, run in a worker thread: it calls `respond` exactly once, and may keep what the reply
# needs (e.g. a memory reservation) until `respond` has returned, i.e. until the response is written.
ToolJob = Callable[[Respond], None]
Prepared = ToolReply | ToolJob


class ToolHost(Protocol):
    """What a Session serves: the tools, the instructions for clients, calls, and room for long lines."""

    @property
    def tools(self) -> Sequence[ToolSpec]: ...

    @property
    def instructions(self) -> str: ...

    def prepare(self, name: str, arguments: object) -> Prepared:
        """Check and admit a call on the reading thread: a reply now (errors, quick tools) or a job."""
        ...

    def line_room(self, nbytes: int) -> bool:
        """Room for the request line being read to grow by `nbytes`, held until release_line_room()."""
        ...

    def release_line_room(self) -> None:
        """Give back the room granted for the last line, now parsed and dealt with (or dropped)."""
        ...


@dataclass(frozen=True)
class ServerInfo:
    name: str
    version: str


class Session:
    """One MCP session over a byte stream pair; `serve` returns when the input ends."""

    def __init__(self, host: ToolHost, info: ServerInfo, output: BinaryIO, *, workers: int) -> None:
        self._host = host
        self._info = info
        self._output = output
        self._workers = workers
        self._write_lock = threading.Lock()
        self._output_closed = False
        self._state = threading.Lock()
        self._initialized = False
        self._in_flight: set[RequestId] = set()
        self._cancelled: set[RequestId] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._handlers: Mapping[str, Callable[[Message], None]] = {
            "initialize": self._initialize,
            "ping": self._ping,
            "tools/list": self._tools_list,
            "tools/call": self._tools_call,
            "notifications/initialized": self._ignore,
            "notifications/cancelled": self._cancel,
        }

    # -- the loop ---------------------------------------------------------------------------------------
    def serve(self, read: Callable[[int], bytes], max_line_bytes: int, free_line_bytes: int) -> None:
        """Answer every line `read` delivers; at end of input, finish the admitted tool calls and return
        (a client may close its end and still read the answers). Lines up to `free_line_bytes` are read
        without asking; longer ones grow as the host's line_room() allows, up to `max_line_bytes`."""
        host = self._host
        lines = read_lines(read, max_line_bytes, free_bytes=free_line_bytes, room=host.line_room)
        with ThreadPoolExecutor(self._workers, thread_name_prefix="mcp-tool") as pool:
            self._pool = pool
            try:
                for line in lines:
                    try:
                        self._take(line, max_line_bytes)
                    finally:
                        del line  # only the parsed message is kept, then the line's room is given back
                        host.release_line_room()
            except BaseException:
                # Stopped (SIGTERM, Ctrl-C): running calls end, queued ones are dropped.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                self._pool = None

    def _take(self, line: str | Dropped, max_line_bytes: int) -> None:
        if isinstance(line, Dropped):
            self._write((dropped_error(line, max_line_bytes),))
            return
        message = parse_message(line)
        if isinstance(message, Invalid):
            self._write((error_line(message.id, message.code, message.message),))
        elif message is not None:
            self.handle(message)

    def handle(self, message: Message) -> None:
        handler = self._handlers.get(message.method)
        if handler is None:
            if message.is_request:
                self._error(message, ErrorCode.METHOD_NOT_FOUND, f"method {message.method!r} not found")
            return  # unknown notifications are ignored, as the protocol asks
        if message.is_request and message.method not in ("initialize", "ping") and not self._initialized:
            self._error(message, ErrorCode.INVALID_REQUEST, f"{message.method} before initialize")
            return
        try:
            handler(message)
        except Exception as error:  # a bug must cost one request, not the session
            if message.is_request:
                self._error(message, ErrorCode.INTERNAL_ERROR, f"{type(error).__name__}: {error}")

    # -- methods ----------------------------------------------------------------------------------------
    def _initialize(self, message: Message) -> None:
        asked = message.params.get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]
        self._result(
            message,
            {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": self._info.name, "version": self._info.version},
                "instructions": self._host.instructions,
            },
        )
        self._initialized = True

    def _ping(self, message: Message) -> None:
        self._result(message, {})

    def _ignore(self, message: Message) -> None:
        if message.is_request:
            self._error(message, ErrorCode.INVALID_REQUEST, f"{message.method} is a notification")

    def _tools_list(self, message: Message) -> None:
        self._result(message, {"tools": [tool.announced() for tool in self._host.tools]})

    def _tools_call(self, message: Message) -> None:
        request_id = message.id
        if request_id is None:
            return  # a call sent as a notification: nobody waits for its result
        name = message.params.get("name")
        if not isinstance(name, str):
            self._error(message, ErrorCode.INVALID_PARAMS, "tools/call needs params.name, a string")
            return
        prepared = self._host.prepare(name, message.params.get("arguments"))
        if isinstance(prepared, ToolReply):
            self.reply(request_id, prepared)
            return
        if self._pool is None:
            self.reply(request_id, ToolReply.error(f"{name}: the server is shutting down", "Shutdown"))
            return
        with self._state:
            self._in_flight.add(request_id)
        self._pool.submit(self._run, request_id, name, prepared)

    def _run(self, request_id: RequestId, name: str, job: ToolJob) -> None:
        replied = False

        def respond(reply: ToolReply) -> None:
            nonlocal replied
            if not replied:
                replied = True
                self.reply(request_id, reply)

        try:
            job(respond)
        except Exception as error:  # a bug must cost one call, not the worker
            respond(
                ToolReply.error(f"{name}: internal error: {type(error).__name__}: {error}", "InternalError")
            )
        finally:
            with self._state:
                self._in_flight.discard(request_id)
                self._cancelled.discard(request_id)

    def _cancel(self, message: Message) -> None:
        """notifications/cancelled: the call's work cannot be interrupted, but its response is dropped."""
        request_id = message.params.get("requestId")
        with self._state:
            if request_id in self._in_flight:
                self._cancelled.add(request_id)

    # -- writing ----------------------------------------------------------------------------------------
    def reply(self, request_id: RequestId, reply: ToolReply) -> None:
        """Send the reply of tool call `request_id` (dropped when it was cancelled)."""
        with self._state:
            if request_id in self._cancelled:
                return
        self._write(result_pieces(request_id, reply.result_pieces()))

    def _result(self, message: Message, result: Mapping[str, Any]) -> None:
        if message.id is not None:
            self._write((result_line(message.id, result),))

    def _error(self, message: Message, code: ErrorCode, text: str) -> None:
        if message.id is not None:
            self._write((error_line(message.id, code, text),))

    def _write(self, pieces: Iterable[bytes | str]) -> None:
        """One line, written piece by piece under the lock, a str encoded a slice at a time."""
        with self._write_lock:
            if self._output_closed:
                return
            try:
                for piece in pieces:
                    if isinstance(piece, bytes):
                        self._output.write(piece)
                        continue
                    for start in range(0, len(piece), WRITE_SLICE):
                        self._output.write(piece[start : start + WRITE_SLICE].encode())
                self._output.flush()
            except (OSError, ValueError):
                # EPIPE, or stdout closed: the client is gone. Nothing else is sent; reading goes on until
                # stdin ends too.
                self._output_closed = True
                LOG.warning("gguf-sandbox serve: the client stopped reading; dropping responses")
