"""Hostile MCP input against a real `gguf-sandbox serve` in a real memory cgroup: huge lines, garbage,
deep nesting, huge numbers, wrong types, unknown methods, floods. Each must end in a clean JSON-RPC or tool
error (or, for notifications, in silence), with the server alive afterwards, no traceback, no OOM kill."""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

import gguf_sandbox
from gguf_sandbox.mcp.jsonrpc import ErrorCode
from gguf_sandbox.mcp.server import MAX_CHARS, MAX_TEXTS, ServeLimits, line_cap

MiB = 1 << 20
CORPUS_LIMIT = 64 * MiB  # the matrix's smallest cell
BIG_LINE_LIMIT = 128 * MiB  # where a 50 MB line OOM-killed the SDK-based server
REPLY_TIMEOUT_S = 600.0

pytestmark = [pytest.mark.cgroup, pytest.mark.usefixtures("writable_cgroups")]


def _env() -> dict[str, str]:
    root = str(Path(gguf_sandbox.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def call(request_id: int, arguments: Any, name: str = "embed") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def ping(request_id: int | str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "ping"}


INITIALIZE = line(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
) + line({"jsonrpc": "2.0", "method": "notifications/initialized"})


class RawClient:
    """A server process driven line by line; a thread collects its stdout as JSON replies."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str] | None, stderr: IO[str]) -> None:
        self.stderr = stderr
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._probes = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                self.replies.put(json.loads(raw))
            except ValueError:
                self.replies.put({"not-json": raw.decode(errors="replace")[:300]})
        self.replies.put(None)

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def exchange(self, data: bytes, replies: int = 0) -> list[dict[str, Any]]:
        """Send `data` then a ping; the replies other than the ping's, once it came and `replies` others
        did (tool calls answer from workers, so later than a ping sent after them)."""
        self._probes += 1
        probe = f"probe-{self._probes}"
        self.send(data + line(ping(probe)))
        others: list[dict[str, Any]] = []
        probed = False
        while not probed or len(others) < replies:
            reply = self.replies.get(timeout=REPLY_TIMEOUT_S)
            if reply is None:
                raise AssertionError(f"the server closed its stdout; stderr:\n{self.stderr_text()[-2000:]}")
            if reply.get("id") == probe:
                assert reply.get("result") == {}, reply
                probed = True
            else:
                others.append(reply)
        return others

    def stderr_text(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        code = self.process.wait(timeout=REPLY_TIMEOUT_S)
        self._reader.join(timeout=60)
        return code


@dataclass(frozen=True)
class Expect:
    """One reply: a JSON-RPC error `code`, a tool error of `kind`, a ping's empty result, or else a tool
    result."""

    id: int | None
    code: ErrorCode | None = None
    kind: str | None = None
    ping: bool = False
    # A line longer than the fixed reservation reads into room the budget may not have (README: it gets
    # -32000 "no room … retry later" then): either answer is the contract.
    or_no_room: bool = False


def check(replies: list[dict[str, Any]], expected: tuple[Expect, ...]) -> None:
    """Each expected reply came, matched by id (tool calls finish in any order), and nothing else."""
    assert len(replies) == len(expected), [str(reply)[:300] for reply in replies]
    by_id = {reply.get("id"): reply for reply in replies}
    assert len(by_id) == len(replies), "one reply per id"
    for want in expected:
        reply = by_id[want.id]
        assert reply.get("jsonrpc") == "2.0", str(reply)[:300]
        if want.or_no_room and "error" in reply:
            error = reply["error"]
            assert error["code"] == ERROR.OVERLOADED and "has no room to read it now" in error["message"], (
                error
            )
            continue
        if want.code is not None:
            error = reply["error"]
            assert error["code"] == want.code and error["message"] and "\n" not in error["message"], error
            continue
        result = reply["result"]
        if want.ping:
            assert result == {}, result
        elif want.kind is not None:
            assert result["isError"] is True and result["structuredContent"]["kind"] == want.kind, result
        else:
            assert result["isError"] is False, result


def _garbage(size: int) -> bytes:
    return random.Random(7).randbytes(size).replace(b"\n", b" ")


HEAD = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"embed","arguments":{"texts":'
ERROR = ErrorCode
# name → (bytes to send, the replies they must get). Callables: built when their test runs.
CORPUS: dict[str, tuple[Callable[[], bytes], tuple[Expect, ...]]] = {
    "text-of-50mb": (
        lambda: HEAD % 101 + b'["' + b"x" * (50 * MiB) + b'"]}}}\n',
        (Expect(101, ERROR.INVALID_REQUEST),),
    ),
    "garbage-of-20mb": (lambda: _garbage(20 * MiB) + b"\n", (Expect(None, ERROR.PARSE_ERROR),)),
    "text-past-the-cap": (
        lambda: HEAD % 102 + b'["' + "é".encode() * (4 * MiB) + b'"]}}}\n',
        (Expect(102, ERROR.INVALID_REQUEST),),
    ),
    "garbage-under-the-cap": (lambda: _garbage(MiB) + b"\n", (Expect(None, ERROR.PARSE_ERROR),)),
    "array-nested-100k-deep": (
        lambda: HEAD % 103 + b"[" * 100_000 + b"]" * 100_000 + b"}}}\n",
        (Expect(103, ERROR.INVALID_REQUEST),),
    ),
    "invalid-utf8": (lambda: HEAD % 104 + b'["caf\xe9"]}}}\n', (Expect(104, ERROR.PARSE_ERROR),)),
    "control-bytes": (lambda: b"\x00\x01\x02\x1b[31m\n", (Expect(None, ERROR.PARSE_ERROR),)),
    "truncated-json": (lambda: HEAD % 106 + b'["a"\n', (Expect(None, ERROR.PARSE_ERROR),)),
    "integer-of-a-million-digits": (
        lambda: b'{"jsonrpc":"2.0","id":' + b"7" * 1_000_000 + b',"method":"ping"}\n',
        (Expect(None, ERROR.PARSE_ERROR),),
    ),
    "float-overflowing-to-inf": (
        lambda: HEAD % 108 + b'["a"],"normalize":1e999999}}}\n',
        (Expect(108, kind="ToolInputError"),),
    ),
    "nan-literal": (lambda: HEAD % 109 + b'["a"],"normalize":NaN}}}\n', (Expect(None, ERROR.PARSE_ERROR),)),
    "batch-array": (lambda: line([ping(110), ping(111)]), (Expect(None, ERROR.INVALID_REQUEST),)),
    "null-id": (lambda: line({**ping(0), "id": None}), (Expect(None, ERROR.INVALID_REQUEST),)),
    "unknown-method": (
        lambda: line({"jsonrpc": "2.0", "id": 112, "method": "resources/list"}),
        (Expect(112, ERROR.METHOD_NOT_FOUND),),
    ),
    "params-an-array": (
        lambda: line({"jsonrpc": "2.0", "id": 113, "method": "tools/call", "params": ["embed"]}),
        (Expect(113, ERROR.INVALID_PARAMS),),
    ),
    "tool-name-a-number": (
        lambda: line({"jsonrpc": "2.0", "id": 114, "method": "tools/call", "params": {"name": 5}}),
        (Expect(114, ERROR.INVALID_PARAMS),),
    ),
    "arguments-a-string": (lambda: line(call(115, "texts")), (Expect(115, kind="ToolInputError"),)),
    "texts-of-numbers": (lambda: line(call(116, {"texts": [1, 2]})), (Expect(116, kind="ToolInputError"),)),
    "texts-an-object": (
        lambda: line(call(117, {"texts": {"a": "b"}})),
        (Expect(117, kind="ToolInputError"),),
    ),
    "too-many-texts": (
        lambda: line(call(118, {"texts": ["a"] * (MAX_TEXTS + 1)})),
        (Expect(118, kind="ToolInputError"),),
    ),
    "text-too-long": (
        lambda: line(call(119, {"texts": ["a" * (MAX_CHARS + 1)]})),
        (Expect(119, kind="ToolInputError"),),
    ),
    "normalize-a-string": (
        lambda: line(call(120, {"texts": ["a"], "normalize": "no"})),
        (Expect(120, kind="ToolInputError"),),
    ),
    "unknown-tool": (lambda: line(call(121, {}, name="rm -rf")), (Expect(121, kind="UnknownTool"),)),
    "notification-flood": (
        lambda: b"".join(
            line({"jsonrpc": "2.0", "method": method, "params": {"requestId": i, "progressToken": i}})
            for i in range(5000)
            for method in ("notifications/progress", "notifications/cancelled", "x/unknown")
        ),
        (),
    ),
    "responses-from-the-client": (
        lambda: (
            line({"jsonrpc": "2.0", "id": 5, "result": {}}) + line({"jsonrpc": "2.0", "id": 6, "error": {}})
        ),
        (),
    ),
    "blank-lines": (lambda: b"\n\r\n   \n", ()),
    "crlf-line-end": (lambda: json.dumps(ping(126)).encode() + b"\r\n", (Expect(126, ping=True),)),
    "ping-flood": (
        lambda: b"".join(line(ping(1000 + i)) for i in range(1000)),
        tuple(Expect(1000 + i, ping=True) for i in range(1000)),
    ),
    "embed-flood": (
        lambda: b"".join(line(call(3000 + i, {"texts": [f"text number {i}"]})) for i in range(200)),
        tuple(Expect(3000 + i) for i in range(200)),
    ),
    # The largest request the limits allow, in its longest JSON form: every character outside the BMP,
    # escaped as a surrogate pair. It passes the line cap; in 64 MiB it is within ~1 MiB of the budget
    # (served, or -32000 when the server's baseline is a little higher); served for certain in 128 MiB
    # (test_a_50mb_line_in_a_128mb_cell_…).
    "largest-valid-request": (lambda: largest_valid_request(130), (Expect(130, or_no_room=True),)),
}


def largest_valid_request(request_id: int) -> bytes:
    return line(call(request_id, {"texts": ["\U0001f600" * MAX_CHARS] * MAX_TEXTS}))


def test_the_largest_valid_request_fits_the_line_cap() -> None:
    make, _ = CORPUS["largest-valid-request"]
    assert len(make()) - 1 <= line_cap(ServeLimits()) < len(make()) + 128 * 1024


@dataclass
class Served:
    client: RawClient
    finish: Callable[[float], Any]


@pytest.fixture(scope="module")
def served(minilm_gguf: Callable[[str], Path]) -> Iterator[Served]:
    """One server for the whole corpus, in a CORPUS_LIMIT cgroup.

    The package is byte-compiled first, as `pip install` leaves it: with PYTHONDONTWRITEBYTECODE (or a
    fresh checkout) the server would compile ~100 modules inside its 64 MiB cell, and the heap that leaves
    behind took the room the largest valid request needs (-32000, "no room to read it now").
    """
    import compileall

    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    compileall.compile_dir(Path(gguf_sandbox.__file__).parent, quiet=1)

    argv = (sys.executable, "-m", "gguf_sandbox", "serve", "--model", str(minilm_gguf("q8_0")))
    with attach_limited(argv, CORPUS_LIMIT, 3600, env=_env()) as cell:
        client = RawClient(
            cell.command.argv, None if cell.command.env is None else dict(cell.command.env), cell.stderr
        )
        replies = client.exchange(INITIALIZE, 1)
        assert [reply.get("id") for reply in replies] == [0] and "result" in replies[0], replies
        yield Served(client, cell.finish)
        if client.process.poll() is None:
            client.process.kill()


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_line_gets_a_clean_answer_and_the_server_goes_on(served: Served, name: str) -> None:
    make, expected = CORPUS[name]
    check(served.client.exchange(make(), len(expected)), expected)
    assert "Traceback" not in served.client.stderr_text(), served.client.stderr_text()[-3000:]


def test_after_the_corpus_the_server_exits_cleanly_without_oom(served: Served) -> None:
    code = served.client.close()
    result = served.finish(10)
    stderr = result.stderr
    assert code == 0 and result.exit_code == 0, stderr[-3000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag, stderr[-3000:]
    assert result.peak_bytes is not None and result.peak_bytes <= CORPUS_LIMIT
    assert "Traceback" not in stderr, stderr[-3000:]
    print(f"corpus cell: peak {result.peak_bytes / MiB:.1f}/{CORPUS_LIMIT / MiB:.0f} MiB")


def test_a_50mb_line_in_a_128mb_cell_is_refused_and_the_next_call_answered(
    minilm_gguf: Callable[[str], Path],
) -> None:
    """The failure this file started from: the SDK's transport read and parsed the whole line (OOM kill).
    After it, the largest valid request is served (in 64 MiB it may be refused for room, see CORPUS)."""
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    argv = (sys.executable, "-m", "gguf_sandbox", "serve", "--model", str(minilm_gguf("q8_0")))
    with attach_limited(argv, BIG_LINE_LIMIT, 600, env=_env()) as cell:
        client = RawClient(
            cell.command.argv, None if cell.command.env is None else dict(cell.command.env), cell.stderr
        )
        try:
            replies = client.exchange(
                INITIALIZE
                + HEAD % 2
                + b'["'
                + b"x" * (50 * MiB)
                + b'"]}}}\n'
                + line(call(3, {"texts": ["hello"]}))
                + largest_valid_request(4),
                replies=4,
            )
            code = client.close()
        except (BrokenPipeError, queue.Empty):
            client.process.kill()
            code = client.process.wait()
            replies = []
        result = cell.finish(10)
    assert result.oom_kill_count == 0 and code == 0, f"exit {code}, OOM kills {result.oom_kill_count}"
    assert sorted(reply["id"] for reply in replies) == [0, 2, 3, 4]
    replies.sort(key=lambda reply: int(reply["id"]))
    assert replies[1]["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert "exceeds the limit" in replies[1]["error"]["message"]
    assert (
        replies[2]["result"]["isError"] is False
        and len(replies[2]["result"]["structuredContent"]["vectors"]) == 1
    )
    largest = replies[3].get("result")
    assert largest is not None and largest["isError"] is False, str(replies[3])[:500]
    assert len(largest["structuredContent"]["vectors"]) == MAX_TEXTS
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
