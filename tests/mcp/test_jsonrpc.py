"""Tests for the bounded JSON-RPC framing: lines decoded and cut at their cap in bounded memory, room for
long lines, nesting refused before parsing, and every hostile line turned into the error it must be
answered with."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable

import pytest

from gguf_sandbox.mcp.jsonrpc import (
    HEAD_BYTES,
    MAX_DEPTH,
    READ_CHUNK,
    ROOM_STEP,
    Dropped,
    DropReason,
    ErrorCode,
    Invalid,
    Line,
    Message,
    Nesting,
    dropped_error,
    error_line,
    id_from_head,
    nesting,
    parse_message,
    read_lines,
    result_line,
    result_pieces,
)

MiB = 1 << 20


def reader(data: bytes, chunk: int = 7) -> Callable[[int], bytes]:
    """read(n) over `data`, delivering at most `chunk` bytes per call (a pipe cuts anywhere)."""
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        piece = data[position : position + min(size, chunk)]
        position += len(piece)
        return piece

    return read


def lines(data: bytes, max_bytes: int, chunk: int = 7) -> list[Line]:
    return list(read_lines(reader(data, chunk), max_bytes))


# -- framing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 64, READ_CHUNK], ids=lambda c: f"chunk-{c}")
def test_lines_are_split_and_decoded_wherever_the_chunks_end(chunk: int) -> None:
    data = '{"a":1}\n\n{"é":"😀"}\r\nlast without newline'.encode()
    assert lines(data, 100, chunk) == ['{"a":1}', "", '{"é":"😀"}\r', "last without newline"]


def test_a_line_of_exactly_the_cap_passes_and_one_byte_more_is_dropped() -> None:
    cap = 50
    exact, over = b"x" * cap, b"y" * (cap + 1)
    found = lines(exact + b"\n" + over + b"\nnext\n", cap)
    assert found == [exact.decode(), Dropped(cap + 1, over, DropReason.TOO_LONG), "next"]


def test_a_dropped_line_keeps_only_its_head_and_its_size() -> None:
    line = b'{"jsonrpc":"2.0","id":42,"method":"tools/call","params":' + b"x" * 10_000 + b"}"
    (found,) = lines(line + b"\n", 1000, chunk=333)
    assert found == Dropped(len(line), line[:HEAD_BYTES], DropReason.TOO_LONG)
    assert id_from_head(found.head.decode()) == 42


def test_a_dropped_last_line_without_newline_is_reported() -> None:
    assert lines(b"z" * 30, 10) == [Dropped(30, b"z" * 30, DropReason.TOO_LONG)]


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        pytest.param(b'{"t":"caf\xe9"}', "byte 9: invalid continuation byte", id="latin-1-byte"),
        pytest.param(b"\xff\xfe{}", "byte 0: invalid start byte", id="utf16-bom"),
        pytest.param(b'{"t":"\xf0\x9f\x98', "ends inside a character", id="cut-inside-a-character"),
        pytest.param(b'"\xed\xa0\x80"', "byte 1: invalid continuation byte", id="surrogate"),
    ],
)
def test_a_line_that_is_not_utf8_is_dropped_with_where(data: bytes, detail: str) -> None:
    found = lines(data + b"\nok\n", 100, chunk=3)
    assert isinstance(found[0], Dropped) and found[0].reason is DropReason.NOT_UTF8
    assert detail in found[0].detail and found[0].size == len(data)
    assert found[1] == "ok", "the decoder starts afresh on the next line"


def test_a_50_mib_line_is_read_in_bounded_memory() -> None:
    """The framing's own allocations stay within the cap plus a few chunks, whatever the line's length."""
    cap = 1 * MiB
    remaining = 50 * MiB
    piece = b"a" * READ_CHUNK

    def read(size: int) -> bytes:
        nonlocal remaining
        if remaining <= 0:
            return b""
        remaining -= len(piece)
        return piece if remaining > 0 else piece[:-1] + b"\n"

    tracemalloc.start()
    try:
        found = list(read_lines(read, cap))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == [Dropped(50 * MiB - 1, b"a" * HEAD_BYTES, DropReason.TOO_LONG)]
    assert peak < cap + 4 * READ_CHUNK, f"peak {peak:,} bytes"


@pytest.mark.parametrize("text", ["😀", "é", "東", "a"], ids=["4-byte", "2-byte", "3-byte", "ascii"])
def test_a_line_costs_about_two_copies_of_its_text_whatever_its_characters(text: str) -> None:
    """One-shot decoding allocates 4 bytes per input byte before shrinking (6 copies measured for emoji)."""
    read = reader((text * (2 * MiB // len(text.encode()))).encode() + b"\n", READ_CHUNK)
    tracemalloc.start()
    try:
        (line,) = read_lines(read, 4 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(line, str)
    decoded = len(line) * (4 if text == "😀" else 2 if text == "東" else 1)
    assert peak <= 2 * decoded + 4 * READ_CHUNK, f"peak {peak:,} for {decoded:,} bytes of text"


def test_a_line_past_its_free_allowance_grows_only_as_room_is_granted() -> None:
    asked: list[int] = []

    def room(size: int) -> bool:
        asked.append(size)
        return len(asked) <= 2

    data = b"a" * (2 * ROOM_STEP + 10) + b"\n" + b'{"id":4,' + b"b" * (4 * ROOM_STEP) + b"\nsmall\n"
    found = list(read_lines(reader(data, READ_CHUNK), 8 * ROOM_STEP, free_bytes=1000, room=room))
    assert found[0] == "a" * (2 * ROOM_STEP + 10), "two steps granted"
    refused = found[1]
    assert isinstance(refused, Dropped) and refused.reason is DropReason.NO_ROOM
    assert refused.size == 4 * ROOM_STEP + 8
    assert found[2] == "small"
    assert asked == [ROOM_STEP] * 3, "the third step was refused, and a refused line asks no more"
    error = json.loads(dropped_error(refused, 8 * ROOM_STEP))
    assert error["id"] == 4 and error["error"]["code"] == ErrorCode.OVERLOADED


# -- nesting ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("[" * MAX_DEPTH + "]" * MAX_DEPTH, Nesting.WITHIN, id="at-the-limit"),
        pytest.param("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), Nesting.TOO_DEEP, id="one-deeper"),
        pytest.param(
            "{" + ",".join(f'"k{i}":[{{}}]' for i in range(500)) + "}", Nesting.WITHIN, id="wide-not-deep"
        ),
        pytest.param(json.dumps({"texts": ["[" * 10_000]}), Nesting.WITHIN, id="brackets-inside-a-string"),
        pytest.param(json.dumps({"t": ['"[[[' * 100, ']]]"' * 100]}), Nesting.WITHIN, id="escaped-quotes"),
        pytest.param(
            json.dumps({"t": "\\"}) + "[" * 40 + "]" * 40, Nesting.TOO_DEEP, id="escaped-backslash-then-deep"
        ),
        pytest.param('{"a":' + "[{" * 20 + "}]" * 20 + "}", Nesting.TOO_DEEP, id="mixed-41-levels"),
        pytest.param("[" * 100_000, Nesting.UNPAIRED, id="unclosed"),
        pytest.param("[{]}" * 20, Nesting.UNPAIRED, id="mismatched"),
    ],
)
def test_nesting_is_measured_outside_strings(text: str, expected: Nesting) -> None:
    assert nesting(text) is expected
    if expected is Nesting.WITHIN:
        json.loads(text)  # what passes is JSON the stdlib parser takes


# -- messages -------------------------------------------------------------------------------------------
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(json.dumps(PING), Message("ping", {}, 1), id="ping"),
        pytest.param(json.dumps({**PING, "id": "a-1"}), Message("ping", {}, "a-1"), id="string-id"),
        pytest.param(
            json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            Message("notifications/initialized", {}, None),
            id="notification",
        ),
        pytest.param("   \r", None, id="blank"),
        pytest.param(json.dumps({"jsonrpc": "2.0", "id": 9, "result": {}}), None, id="a-response"),
        pytest.param(
            json.dumps({"jsonrpc": "2.0", "method": "x", "params": [1]}),
            None,
            id="notification-with-bad-params",
        ),
        pytest.param("\x00\x01garbage", Invalid(ErrorCode.PARSE_ERROR, ""), id="garbage"),
        pytest.param("{", Invalid(ErrorCode.PARSE_ERROR, ""), id="truncated"),
        pytest.param("[" * 40 + "}" * 40, Invalid(ErrorCode.PARSE_ERROR, ""), id="unpaired-brackets"),
        pytest.param(
            '{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}',
            Invalid(ErrorCode.PARSE_ERROR, ""),
            id="nan-constant",
        ),
        pytest.param(
            '{"jsonrpc":"2.0","id":' + "9" * 5000 + ',"method":"ping"}',
            Invalid(ErrorCode.PARSE_ERROR, ""),
            id="huge-integer",
        ),
        pytest.param(
            '{"jsonrpc":"2.0","id":2,"method":"x","params":{"a":' + "[" * 5000 + "]" * 5000 + "}}",
            Invalid(ErrorCode.INVALID_REQUEST, "", 2),
            id="deep-nesting",
        ),
        pytest.param(json.dumps([PING]), Invalid(ErrorCode.INVALID_REQUEST, ""), id="batch"),
        pytest.param("42", Invalid(ErrorCode.INVALID_REQUEST, ""), id="scalar"),
        pytest.param(
            json.dumps({"id": 3, "method": "ping"}),
            Invalid(ErrorCode.INVALID_REQUEST, "", 3),
            id="no-jsonrpc",
        ),
        pytest.param(json.dumps({**PING, "id": None}), Invalid(ErrorCode.INVALID_REQUEST, ""), id="null-id"),
        pytest.param(json.dumps({**PING, "id": True}), Invalid(ErrorCode.INVALID_REQUEST, ""), id="bool-id"),
        pytest.param(json.dumps({**PING, "id": 1.5}), Invalid(ErrorCode.INVALID_REQUEST, ""), id="float-id"),
        pytest.param(
            json.dumps({**PING, "method": 5}), Invalid(ErrorCode.INVALID_REQUEST, "", 1), id="method-int"
        ),
        pytest.param(
            json.dumps({**PING, "params": "x"}),
            Invalid(ErrorCode.INVALID_PARAMS, "", 1),
            id="params-a-string",
        ),
    ],
)
def test_each_line_is_a_message_an_error_or_nothing(line: str, expected: Message | Invalid | None) -> None:
    parsed = parse_message(line)
    if isinstance(expected, Invalid):
        assert isinstance(parsed, Invalid), parsed
        assert (parsed.code, parsed.id) == (expected.code, expected.id)
        assert parsed.message and "\n" not in parsed.message
    else:
        assert parsed == expected


def test_huge_floats_parse_and_are_left_to_the_method_to_refuse() -> None:
    parsed = parse_message('{"jsonrpc":"2.0","id":1,"method":"m","params":{"n":1e999999}}')
    assert isinstance(parsed, Message) and parsed.params["n"] == float("inf")


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        pytest.param('{"jsonrpc":"2.0","id":17,"method":', 17, id="sdk-order"),
        pytest.param('{ "id" : "abc", "jsonrpc": "2.0"', "abc", id="id-first"),
        pytest.param('{"method":"x","id":5}', None, id="id-later"),
        pytest.param("\ufffd\ufffd", None, id="garbage"),
        pytest.param('{"id":' + "9" * 40, None, id="too-long-a-number"),
    ],
)
def test_the_id_of_a_dropped_line_is_read_from_its_head_when_cheap(head: str, expected: object) -> None:
    assert id_from_head(head) == expected


@pytest.mark.parametrize(
    ("reason", "code", "words"),
    [
        (DropReason.TOO_LONG, ErrorCode.INVALID_REQUEST, "52,428,800 bytes exceeds the limit of 4,194,304"),
        (DropReason.NO_ROOM, ErrorCode.OVERLOADED, "no room to read it now"),
        (DropReason.NOT_UTF8, ErrorCode.PARSE_ERROR, "is not UTF-8 at byte 3"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_a_dropped_line_is_answered_with_its_reason(reason: DropReason, code: ErrorCode, words: str) -> None:
    dropped = Dropped(50 * MiB, b'{"jsonrpc":"2.0","id":8,"m\xc3', reason, "byte 3")
    reply = json.loads(dropped_error(dropped, 4 * MiB))
    assert reply["id"] == 8 and reply["error"]["code"] == code and words in reply["error"]["message"]


def test_replies_are_single_json_lines() -> None:
    assert json.loads(result_line(3, {"a": [1.5]})) == {"jsonrpc": "2.0", "id": 3, "result": {"a": [1.5]}}
    pieces = result_pieces("x", ['{"b":', "1}"])
    assert json.loads("".join(pieces)) == {"jsonrpc": "2.0", "id": "x", "result": {"b": 1}}
    error = json.loads(error_line(None, ErrorCode.PARSE_ERROR, "bad\nline"))
    assert error == {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "bad\nline"}}
    for line in (result_line(1, {}), error_line(1, ErrorCode.INTERNAL_ERROR, "x")):
        assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_a_line_refused_room_and_then_past_the_cap_is_too_long_not_overloaded() -> None:
    """Whether room was granted depends on what the budget held; a line over the cap is always the
    client's error (-32600), never "retry later" (-32000)."""
    data = b'{"id":7,' + b"b" * (3 * ROOM_STEP) + b"\nsmall\n"
    found = list(
        read_lines(reader(data, READ_CHUNK), 2 * ROOM_STEP, free_bytes=1000, room=lambda size: False)
    )
    refused = found[0]
    assert isinstance(refused, Dropped) and refused.reason is DropReason.TOO_LONG
    assert refused.size == 3 * ROOM_STEP + 8
    assert found[1] == "small"
    error = json.loads(dropped_error(refused, 2 * ROOM_STEP))
    assert error["id"] == 7 and error["error"]["code"] == ErrorCode.INVALID_REQUEST
