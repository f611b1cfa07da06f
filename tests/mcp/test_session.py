"""Tests for the MCP session over in-memory streams: the lifecycle, version negotiation, tools, errors,
cancellation, and a client that stops reading."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from gguf_sandbox.mcp.jsonrpc import ErrorCode
from gguf_sandbox.mcp.session import (
    PROTOCOL_VERSIONS,
    Prepared,
    Respond,
    ServerInfo,
    Session,
    ToolReply,
    ToolSpec,
)

SCHEMA = {"type": "object"}


class FakeHost:
    """`echo` answers inline, `slow` in a worker once `gate` opens, `broken` is a bug in prepare()."""

    instructions = "test instructions"

    def __init__(self, gate: threading.Event, room: bool = True) -> None:
        self.gate = gate
        self.room_granted = room
        self.room_asked = self.room_released = 0
        self.tools = (
            ToolSpec("echo", "echoes its arguments", SCHEMA, SCHEMA, inline=True),
            ToolSpec("slow", "answers from a worker", SCHEMA, SCHEMA),
        )

    def prepare(self, name: str, arguments: object) -> Prepared:
        if name == "echo":
            return ToolReply.of({"echo": arguments})
        if name == "slow":

            def job(respond: Respond) -> None:
                self.gate.wait(10)
                respond(ToolReply.of({"slow": arguments}))

            return job
        if name == "broken":
            raise RuntimeError("a bug in prepare")
        return ToolReply.error(f"unknown tool {name!r}", "UnknownTool")

    def line_room(self, nbytes: int) -> bool:
        self.room_asked += 1
        return self.room_granted

    def release_line_room(self) -> None:
        self.room_released += 1


def request(request_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}


INITIALIZE = request(0, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}})
INITIALIZED = notification("notifications/initialized")


def converse(
    messages: Sequence[dict[str, Any] | bytes],
    *,
    output: io.BytesIO | None = None,
    max_line: int = 8 << 20,
    free_line: int = 1 << 20,
    host: FakeHost | None = None,
) -> dict[object, dict[str, Any]]:
    """Feed `messages` (dicts, or raw lines) to a Session; responses by id (None for id-less errors: the
    last one). The gate of `slow` opens at end of input, after every message was handled."""
    gate = threading.Event()
    host = host or FakeHost(gate)
    host.gate = gate
    data = b"".join(m if isinstance(m, bytes) else json.dumps(m).encode() + b"\n" for m in messages)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        piece = data[position : position + size]
        position += len(piece)
        if not piece:
            gate.set()
        return piece

    sink = output if output is not None else io.BytesIO()
    Session(host, ServerInfo("test-server", "9.9"), sink, workers=2).serve(read, max_line, free_line)
    lines = sink.getvalue().splitlines()
    assert all(line.strip() for line in lines)
    return {reply.get("id"): reply for reply in map(json.loads, lines)}


@pytest.mark.parametrize(
    ("asked", "answered"),
    [
        pytest.param("2024-11-05", "2024-11-05", id="oldest"),
        pytest.param("2025-06-18", "2025-06-18", id="2025-06-18"),
        pytest.param("2099-01-01", PROTOCOL_VERSIONS[-1], id="unknown-gets-the-newest"),
        pytest.param(None, PROTOCOL_VERSIONS[-1], id="missing"),
    ],
)
def test_initialize_negotiates_the_version_and_announces_tools(asked: str | None, answered: str) -> None:
    replies = converse([request(1, "initialize", {"protocolVersion": asked})])
    result = replies[1]["result"]
    assert result == {
        "protocolVersion": answered,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "test-server", "version": "9.9"},
        "instructions": "test instructions",
    }


def test_before_initialize_only_ping_is_answered() -> None:
    replies = converse(
        [request(1, "ping"), request(2, "tools/list"), request(3, "tools/call", {"name": "echo"})]
    )
    assert replies[1]["result"] == {}
    for request_id in (2, 3):
        assert replies[request_id]["error"]["code"] == ErrorCode.INVALID_REQUEST
        assert "before initialize" in replies[request_id]["error"]["message"]


def test_tools_list_announces_name_description_and_both_schemas() -> None:
    replies = converse([INITIALIZE, INITIALIZED, request(1, "tools/list")])
    tools = replies[1]["result"]["tools"]
    assert [tool["name"] for tool in tools] == ["echo", "slow"]
    assert set(tools[0]) == {"name", "description", "inputSchema", "outputSchema"}


def test_inline_and_worker_tools_answer_with_text_and_structured_content() -> None:
    replies = converse(
        [
            INITIALIZE,
            INITIALIZED,
            request(1, "tools/call", {"name": "slow", "arguments": {"n": 1}}),
            request(2, "tools/call", {"name": "echo", "arguments": {"n": 2}}),
        ]
    )
    for request_id, key in ((1, "slow"), (2, "echo")):
        result = replies[request_id]["result"]
        assert result["isError"] is False
        assert result["structuredContent"] == {key: {"n": request_id}}
        assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
        assert result["content"][0]["type"] == "text"


def test_tool_errors_carry_their_kind_as_structured_content() -> None:
    replies = converse([INITIALIZE, request(1, "tools/call", {"name": "nope"})])
    result = replies[1]["result"]
    assert result["isError"] is True
    assert result["structuredContent"] == {"error": "unknown tool 'nope'", "kind": "UnknownTool"}
    assert result["content"] == [{"type": "text", "text": "unknown tool 'nope'"}]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        pytest.param(request(1, "resources/list"), ErrorCode.METHOD_NOT_FOUND, id="unknown-method"),
        pytest.param(
            request(1, "tools/call", {"arguments": {}}), ErrorCode.INVALID_PARAMS, id="no-tool-name"
        ),
        pytest.param(request(1, "tools/call", {"name": 5}), ErrorCode.INVALID_PARAMS, id="tool-name-int"),
        pytest.param(
            request(1, "tools/call", {"name": "broken"}), ErrorCode.INTERNAL_ERROR, id="bug-in-prepare"
        ),
        pytest.param(
            request(1, "notifications/initialized"), ErrorCode.INVALID_REQUEST, id="notification-as-request"
        ),
    ],
)
def test_protocol_errors_are_answered_with_the_request_id(message: dict[str, Any], code: ErrorCode) -> None:
    replies = converse([INITIALIZE, message, request(2, "ping")])
    assert replies[1]["error"]["code"] == code
    assert replies[2]["result"] == {}, "the session goes on"


def test_notifications_are_never_answered() -> None:
    flood = [notification("notifications/progress", {"progressToken": i, "progress": i}) for i in range(2000)]
    flood += [notification("x/unknown"), notification("notifications/cancelled", {"requestId": 12345})]
    flood += [notification("tools/call", {"name": "echo"}), {"jsonrpc": "2.0", "id": 77, "result": {}}]
    replies = converse([INITIALIZE, *flood, request(1, "ping")])
    assert set(replies) == {0, 1}


def test_a_cancelled_call_gets_no_response() -> None:
    replies = converse(
        [
            INITIALIZE,
            request(1, "tools/call", {"name": "slow", "arguments": {}}),
            request(2, "tools/call", {"name": "slow", "arguments": {}}),
            notification("notifications/cancelled", {"requestId": 1, "reason": "user"}),
        ]
    )
    assert 1 not in replies and replies[2]["result"]["isError"] is False


def test_unparseable_and_oversized_lines_are_answered_and_the_session_goes_on() -> None:
    big = json.dumps(request(5, "tools/call", {"name": "echo", "arguments": {"t": "x" * 5000}})).encode()
    replies = converse([INITIALIZE, b"{not json\n", big + b"\n", request(6, "ping")], max_line=1000)
    assert replies[None]["error"]["code"] == ErrorCode.PARSE_ERROR
    assert replies[5]["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert "exceeds the limit of 1,000 bytes" in replies[5]["error"]["message"]
    assert replies[6]["result"] == {}


class _ClosedPipe(io.BytesIO):
    def write(self, data: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_client_that_stops_reading_costs_nothing_but_its_responses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    replies = converse(
        [INITIALIZE, request(1, "tools/call", {"name": "slow"}), request(2, "ping")], output=_ClosedPipe()
    )
    assert replies == {}
    assert capsys.readouterr().err.count("stopped reading") == 1


def test_at_end_of_input_running_calls_still_answer() -> None:
    replies = converse(
        [INITIALIZE]
        + [request(i, "tools/call", {"name": "slow", "arguments": {"i": i}}) for i in range(1, 9)]
    )
    assert all(replies[i]["result"]["structuredContent"] == {"slow": {"i": i}} for i in range(1, 9))


@pytest.mark.parametrize("granted", [True, False], ids=["room-granted", "room-refused"])
def test_a_line_longer_than_the_free_allowance_waits_for_room(granted: bool) -> None:
    host = FakeHost(threading.Event(), room=granted)
    long = request(3, "tools/call", {"name": "echo", "arguments": {"t": "x" * (3 << 20)}})
    replies = converse([INITIALIZE, long, request(4, "ping")], host=host, free_line=1 << 20)
    if granted:
        assert replies[3]["result"]["structuredContent"] == {"echo": long["params"]["arguments"]}
        assert host.room_asked == 3, "3 MiB past a 1 MiB allowance: three steps of 1 MiB"
    else:
        assert replies[3]["error"]["code"] == ErrorCode.OVERLOADED
        assert "no room to read it now" in replies[3]["error"]["message"]
        assert host.room_asked == 1
    assert replies[4]["result"] == {}
    assert host.room_released == 3, "after every line, room given or not"
