"""JSON-RPC 2.0 over newline-delimited byte streams, bounded before anything is parsed.

Third-party stdio readers read and parse a whole line whatever its size: one 50 MB line OOM-killed an MCP
server in a 128 MB cell. Here a line is decoded as its chunks arrive (CPython's one-shot UTF-8 decoder
allocates four bytes per input byte before it shrinks: a 2 MB line of emoji cost 8 MB), a line longer
than its cap is dropped as it arrives (only its first bytes are kept, to answer with its id), a line grows
past a free allowance only as the caller grants room for it, a line nested deeper than MAX_DEPTH is refused
before the JSON parser sees it, and every line that is not a usable message becomes an `Invalid` carrying
the JSON-RPC error to answer with.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

JSONRPC = "2.0"
# Far deeper than any request this server understands (tools/call arguments sit 4 levels down), far
# shallower than the recursion the stdlib parser can take.
MAX_DEPTH = 32
READ_CHUNK = 1 << 16
# A line longer than its free allowance asks for room in steps of this size.
ROOM_STEP = 1 << 20
# What is kept of a dropped line: enough for `{"jsonrpc":"2.0","id":…` in the order clients write it.
HEAD_BYTES = 256

RequestId = int | str


class ErrorCode(IntEnum):
    """JSON-RPC 2.0's reserved error codes."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # The first of the codes JSON-RPC leaves to servers: no memory for the request now.
    OVERLOADED = -32000


@dataclass(frozen=True)
class Message:
    """A request (`id` set) or a notification (`id` None) from the peer."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    id: RequestId | None = None

    @property
    def is_request(self) -> bool:
        return self.id is not None


@dataclass(frozen=True)
class Invalid:
    """A line that is not a usable message: the error to answer it with (`id` None when unknown)."""

    code: ErrorCode
    message: str
    id: RequestId | None = None


class DropReason(Enum):
    TOO_LONG = "longer than the line cap"
    NO_ROOM = "refused room to grow"
    NOT_UTF8 = "not UTF-8"


@dataclass(frozen=True)
class Dropped:
    """A line not kept: its size in bytes, its first bytes, why, and where it went wrong."""

    size: int
    head: bytes
    reason: DropReason
    detail: str = ""


Line = str | Dropped


# -- framing -------------------------------------------------------------------------------------------
class _Assembler:
    """One line's text, decoded piece by piece as its bytes arrive, or why it was dropped."""

    def __init__(self, max_bytes: int, free: int, room: Callable[[int], bool] | None) -> None:
        self._max = max_bytes
        self._free = free
        self._room = room
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._start()

    def _start(self) -> None:
        self._decoder.reset()
        self._parts: list[str] = []
        self._size = 0
        self._head = bytearray()
        self._granted = self._free
        self._dropped: tuple[DropReason, str] | None = None

    @property
    def empty(self) -> bool:
        return self._size == 0

    def add(self, piece: memoryview) -> None:
        self._size += len(piece)
        if len(self._head) < HEAD_BYTES:
            self._head += piece[: HEAD_BYTES - len(self._head)]
        if self._dropped is not None:
            return
        while self._granted < self._size <= self._max and self._room is not None and self._room(ROOM_STEP):
            self._granted += ROOM_STEP
        if self._size > self._granted:
            self._drop(DropReason.TOO_LONG if self._size > self._max else DropReason.NO_ROOM, "")
            return
        pending = len(self._decoder.getstate()[0])  # bytes of a character cut by the previous piece
        try:
            self._parts.append(self._decoder.decode(piece))
        except UnicodeDecodeError as error:
            at = self._size - len(piece) - pending + error.start
            self._drop(DropReason.NOT_UTF8, f"byte {at:,}: {error.reason}")

    def _drop(self, reason: DropReason, detail: str) -> None:
        self._dropped = (reason, detail)
        self._parts = []

    def finish(self) -> Line:
        """The line so far, complete: its text or a Dropped; then ready for the next line."""
        if self._dropped is None:
            try:
                self._parts.append(self._decoder.decode(b"", final=True))
            except UnicodeDecodeError as error:
                self._drop(DropReason.NOT_UTF8, f"it ends inside a character ({error.reason})")
        line: Line
        if self._dropped is None:
            parts, self._parts = self._parts, []
            line = "".join(parts)
        elif self._dropped[0] is DropReason.NO_ROOM and self._size > self._max:
            # Refused room while growing, and then it passed the cap too: a line over the cap is the
            # client's error whatever the budget held at the time, so say that (and not "retry later").
            line = Dropped(self._size, bytes(self._head), DropReason.TOO_LONG)
        else:
            line = Dropped(self._size, bytes(self._head), *self._dropped)
        self._start()
        return line


def read_lines(
    read: Callable[[int], bytes],
    max_bytes: int,
    *,
    free_bytes: int | None = None,
    room: Callable[[int], bool] | None = None,
) -> Iterator[Line]:
    """Lines (without their newline) read through `read(n)` until it returns b"" (end of stream), each
    decoded as UTF-8 while it arrives.

    A line over `max_bytes`, or not UTF-8, is yielded as `Dropped` once its newline arrives; its bytes past
    HEAD_BYTES are dropped while they arrive, so memory stays within about twice max_bytes whatever the
    input. With `room`, a line grows past `free_bytes` only by the ROOM_STEPs `room(ROOM_STEP)` grants, and
    is dropped (NO_ROOM) at the first refusal; the caller gives back what was granted for a line once it
    has dealt with what was yielded.
    """
    if max_bytes < 1:
        raise ValueError(f"read_lines: max_bytes must be at least 1, got {max_bytes}")
    free = max_bytes if room is None or free_bytes is None else min(free_bytes, max_bytes)
    line = _Assembler(max_bytes, free, room)
    while chunk := read(READ_CHUNK):
        view = memoryview(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            line.add(view[start:end])
            yield line.finish()
            start = end + 1
        line.add(view[start:])
    if not line.empty:
        yield line.finish()


# -- nesting ---------------------------------------------------------------------------------------------
_STRING = re.compile(r'"[^"]*"')
_PAIR = re.compile(r"\[\]|\{\}")
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class Nesting(Enum):
    """How arrays and objects nest in a line, as far as the brackets outside strings tell."""

    WITHIN = "within the limit"
    TOO_DEEP = "too deep"
    UNPAIRED = "brackets that do not pair up"


def nesting(line: str, limit: int = MAX_DEPTH) -> Nesting:
    """Whether arrays and objects in JSON text `line` nest at most `limit` deep.

    Linear in the line at C speed: a line with at most `limit` opening brackets passes at once (the parser
    reports its other faults); otherwise escaped backslashes and quotes are removed, then strings (whose
    brackets are text), then each pass removes the innermost pairs: `limit` passes must leave nothing.
    """
    if line.count("[") + line.count("{") <= limit:
        return Nesting.WITHIN
    unescaped = line.replace("\\\\", "").replace('\\"', "")
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", unescaped))
    for _ in range(limit):
        reduced = _PAIR.sub("", brackets)
        if len(reduced) == len(brackets):
            return Nesting.UNPAIRED if brackets else Nesting.WITHIN
        brackets = reduced
    return Nesting.TOO_DEEP if brackets else Nesting.WITHIN


# -- messages -------------------------------------------------------------------------------------------
_HEAD_ID = re.compile(
    r'\A\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(-?[0-9]{1,18}(?=\s*[,}])|"[^"\\]{0,128}")'
)


def id_from_head(head: str) -> RequestId | None:
    """The id of a message whose text starts `{"jsonrpc":"2.0","id":…` or `{"id":…`, else None."""
    found = _HEAD_ID.match(head[:HEAD_BYTES])
    if found is None:
        return None
    value = json.loads(found.group(1))
    return value if isinstance(value, (int, str)) else None


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _valid_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_message(line: str) -> Message | Invalid | None:
    """The message on one line, an Invalid saying what is wrong with it, or None when nothing is to be
    answered (a blank line, a response from the peer, a malformed notification)."""
    if not line.strip():
        return None
    shape = nesting(line)
    if shape is Nesting.TOO_DEEP:
        return Invalid(
            ErrorCode.INVALID_REQUEST, f"JSON nested deeper than {MAX_DEPTH} levels", id_from_head(line)
        )
    if shape is Nesting.UNPAIRED:
        return Invalid(ErrorCode.PARSE_ERROR, "the line is not JSON: its brackets do not pair up")
    try:
        value = json.loads(line, parse_constant=_no_constants)
    except (ValueError, RecursionError) as error:
        return Invalid(ErrorCode.PARSE_ERROR, f"the line is not JSON: {str(error)[:200]}")
    return _message(value)


def _message(value: Any) -> Message | Invalid | None:
    if not isinstance(value, dict):
        kind = "an array (batches are not supported)" if isinstance(value, list) else type(value).__name__
        return Invalid(ErrorCode.INVALID_REQUEST, f"a message must be a JSON object, got {kind}")
    has_id = "id" in value
    request_id = value.get("id")
    if has_id and not _valid_id(request_id):
        return Invalid(ErrorCode.INVALID_REQUEST, "id must be a string or an integer")
    if value.get("jsonrpc") != JSONRPC:
        return Invalid(ErrorCode.INVALID_REQUEST, f'jsonrpc must be "{JSONRPC}"', request_id)
    method = value.get("method")
    if method is None and ("result" in value or "error" in value):
        return None  # a response: this server sends no requests, so there is nothing to match it with
    if not isinstance(method, str):
        return Invalid(ErrorCode.INVALID_REQUEST, "method must be a string", request_id)
    params = value.get("params", {})
    if not isinstance(params, dict):
        if not has_id:
            return None  # notifications are never answered, not even with an error
        return Invalid(ErrorCode.INVALID_PARAMS, f"params of {method} must be an object", request_id)
    return Message(method, params, request_id if has_id else None)


# -- replies ---------------------------------------------------------------------------------------------
def _envelope(request_id: RequestId | None) -> str:
    return f'{{"jsonrpc":"{JSONRPC}","id":{json.dumps(request_id, ensure_ascii=False)},'


def result_line(request_id: RequestId, result: Mapping[str, Any]) -> bytes:
    """A response line (newline included) carrying `result`."""
    text = json.dumps(result, ensure_ascii=False, allow_nan=False)
    return "".join(result_pieces(request_id, [text])).encode()


def result_pieces(request_id: RequestId, result: Iterable[str]) -> Iterator[str]:
    """A response line as pieces around `result`, the result's JSON as pieces: made and written one after
    the other, a large result is never joined into one more copy of itself."""
    yield f'{_envelope(request_id)}"result":'
    yield from result
    yield "}\n"


def error_line(request_id: RequestId | None, code: ErrorCode, message: str) -> bytes:
    """An error response line; `request_id` None when the request's id could not be read."""
    error = json.dumps({"code": int(code), "message": message}, ensure_ascii=False)
    return f'{_envelope(request_id)}"error":{error}}}\n'.encode()


_DROPPED = {
    DropReason.TOO_LONG: (
        ErrorCode.INVALID_REQUEST,
        "message of {size:,} bytes exceeds the limit of {max_bytes:,} bytes per line; it was discarded (send "
        "fewer or shorter texts per call)",
    ),
    DropReason.NO_ROOM: (
        ErrorCode.OVERLOADED,
        "message of {size:,} bytes was discarded: the server's memory budget has no room to read it now; "
        "retry later, or send fewer texts per call",
    ),
    DropReason.NOT_UTF8: (ErrorCode.PARSE_ERROR, "message of {size:,} bytes is not UTF-8 at {detail}"),
}


def dropped_error(line: Dropped, max_bytes: int) -> bytes:
    """The error answering a dropped line, with its id when its head shows one."""
    code, template = _DROPPED[line.reason]
    message = template.format(size=line.size, max_bytes=max_bytes, detail=line.detail)
    return error_line(id_from_head(line.head.decode("utf-8", "replace")), code, message)
