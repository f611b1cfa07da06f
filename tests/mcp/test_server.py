"""Tests for `gguf-sandbox serve`: the MCP flow over stdio with the SDK's own client, tool errors,
concurrency, disconnects, raw vectors, and the graceful refusal below the memory floor (real cgroups where
marked)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

import gguf_sandbox
from gguf_sandbox.mcp import serve
from gguf_sandbox.mcp import server as mcp_server
from gguf_sandbox.mcp.server import MAX_CHARS, MAX_TEXTS, ServeLimits, ToolInputError, serve_floor
from gguf_sandbox.mcp.session import PROTOCOL_VERSIONS, ToolReply
from gguf_sandbox.sandbox.base import CellCommand
from gguf_sandbox.workloads.corpus import corpus

if TYPE_CHECKING:
    from gguf_sandbox.embed.engine import Embedder

HAVE_SDK = importlib.util.find_spec("mcp") is not None
if HAVE_SDK:
    import anyio
    from anyio.from_thread import BlockingPortal, start_blocking_portal
# Typed Any: these tests run against both SDK majors, whose types differ.
mcp: Any = importlib.import_module("mcp") if HAVE_SDK else None
needs_sdk = pytest.mark.skipif(
    not HAVE_SDK, reason="the MCP SDK is not installed: pip install 'gguf-sandbox[mcp]'"
)

MiB = 1 << 20
# Generous enough not to flake on a loaded 2-core machine; the figures measured here are far below.
MODEL_INFO_P95_LIMIT_MS = 50.0


# -- pure parts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        pytest.param(None, "arguments must be an object", id="no-arguments"),
        pytest.param({}, "texts is required", id="missing-texts"),
        pytest.param({"texts": "one text"}, "wrap a single text in a list", id="texts-a-string"),
        pytest.param({"texts": []}, "texts is empty", id="empty-list"),
        pytest.param({"texts": ["a"] * (MAX_TEXTS + 1)}, f"at most {MAX_TEXTS} per call", id="too-many"),
        pytest.param({"texts": ["a", 3]}, "texts[1] is int", id="not-a-string"),
        pytest.param({"texts": ["x" * (MAX_CHARS + 1)]}, f"at most {MAX_CHARS:,} per text", id="too-long"),
        pytest.param(
            {"texts": ["a"], "normalize": "yes"}, "normalize must be true or false", id="bad-normalize"
        ),
        pytest.param({"texts": ["a"], "colour": 1}, "unknown argument(s) colour", id="unknown-argument"),
    ],
)
def test_malformed_embed_arguments_are_named(arguments: Any, fragment: str) -> None:
    with pytest.raises(ToolInputError) as caught:
        mcp_server._embed_arguments(arguments, ServeLimits())
    assert fragment in str(caught.value)


def test_valid_embed_arguments_pass_through() -> None:
    texts = ["a", "x" * MAX_CHARS] + ["b"] * (MAX_TEXTS - 2)
    assert mcp_server._embed_arguments({"texts": texts}, ServeLimits()) == (texts, True)
    assert mcp_server._embed_arguments({"texts": ["a"], "normalize": False}, ServeLimits()) == (["a"], False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72m", 72 * MiB),
        ("1g", 1 << 30),
        ("65536", 65536),
        ("1.5M", 3 * MiB // 2),
        ("0", 0),
        ("8MiB", 8 * MiB),
    ],
)
def test_sizes_parse_with_binary_units(text: str, expected: int) -> None:
    assert memory_floor(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1m", "", "64ib"])
def test_bad_sizes_are_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        memory_floor(text)
    assert "is not a size" in capsys.readouterr().err


def memory_floor(text: str) -> int:
    """--memory-floor as `serve` parses it (the units grammar, 0 allowed: 0 turns the floor off)."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    value: int = parser.parse_args(["--model", "m.gguf", f"--memory-floor={text}"]).memory_floor
    return value


def test_the_floor_is_read_through_one_function_and_fits_the_matrix() -> None:
    assert 32 * MiB < serve_floor() <= 64 * MiB, "the matrix's smallest cell is 64m"


# -- the sizes the serving reservations are derived from ---------------------------------------------------
def _longest_float32s(count: int) -> np.ndarray:
    """float32 values whose JSON is among the longest: negative, with two-digit negative exponents (most
    need 17 significant digits), and the extremes."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0x80800000, 0x9F000000, count, dtype=np.uint32)  # -1e-38 … -1e-20
    finfo = np.finfo(np.float32)
    extremes = np.array(
        [finfo.min, finfo.max, -finfo.tiny, -finfo.smallest_subnormal, -0.1], dtype=np.float32
    )
    return np.concatenate([bits.view(np.float32), extremes])


def test_max_number_chars_is_the_longest_json_of_a_float32() -> None:
    lengths = [len(json.dumps(float(value))) + len(",") for value in _longest_float32s(100_000)]
    assert max(lengths) == mcp_server.MAX_NUMBER_CHARS


class _Sink:
    """A stdout that keeps nothing (tracemalloc then sees only what building the response holds)."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def test_an_embed_response_is_built_and_written_within_its_reservation() -> None:
    from gguf_sandbox.mcp.session import ServerInfo, Session

    dimension = 384
    vectors = _longest_float32s(MAX_TEXTS * dimension)[: MAX_TEXTS * dimension].reshape(MAX_TEXTS, dimension)
    head = {
        "model": "m",
        "dimension": dimension,
        "count": MAX_TEXTS,
        "normalized": False,
        "plan": "streaming",
    }
    sink = _Sink()
    session = Session(_service(1 << 20), ServerInfo("t", "0"), sink, workers=1)  # type: ignore[arg-type]
    reserved = MAX_TEXTS * dimension * mcp_server.RESPONSE_BYTES_PER_VALUE
    tracemalloc.start()
    try:
        session.reply(1, mcp_server.embed_reply(head, vectors))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    figures = f"peak {peak:,} bytes of {reserved:,} reserved, {sink.written:,} written"
    print(figures)
    assert reserved / 2 < peak <= reserved, figures


@pytest.mark.parametrize(
    "escape", [pytest.param(True, id="ascii-escaped"), pytest.param(False, id="raw-utf8")]
)
def test_the_longest_line_is_read_and_parsed_within_parse_copies(escape: bool) -> None:
    from gguf_sandbox.mcp.jsonrpc import READ_CHUNK, Message, parse_message, read_lines

    limits = ServeLimits()
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "embed", "arguments": {"texts": ["\U0001f600" * MAX_CHARS] * MAX_TEXTS}},
    }
    data = json.dumps(request, ensure_ascii=escape).encode() + b"\n"
    assert len(data) <= mcp_server.line_cap(limits)
    view, position = memoryview(data), 0

    def read(size: int) -> bytes:
        nonlocal position
        piece = bytes(view[position : position + size])
        position += len(piece)
        return piece

    tracemalloc.start()
    try:
        for line in read_lines(read, mcp_server.line_cap(limits), free_bytes=1 << 20, room=lambda size: True):
            assert isinstance(line, str)
            message = parse_message(line)
            del line
            assert isinstance(message, Message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    figures = f"line {len(data):,} bytes, peak {peak:,} bytes = {peak / len(data):.2f} copies"
    print(figures)
    assert peak <= mcp_server.PARSE_COPIES * len(data) + READ_CHUNK, figures


def test_pending_texts_are_admitted_up_to_their_cap_then_refused() -> None:
    service = _service(1 << 30)
    largest = {"texts": ["\U0001f600" * MAX_CHARS] * MAX_TEXTS}
    assert sum(map(sys.getsizeof, largest["texts"])) * mcp_server.EMBED_WORKERS == mcp_server.pending_cap(
        ServeLimits()
    )
    jobs = [service.prepare("embed", largest) for _ in range(mcp_server.EMBED_WORKERS)]
    assert all(callable(job) for job in jobs), "one largest call per worker"
    refused = service.prepare("embed", {"texts": ["one more"]})
    assert isinstance(refused, ToolReply) and refused.structured is not None
    assert refused.structured["kind"] == "BudgetExceeded" and "pending" in refused.text
    replies: list[ToolReply] = []
    jobs[0](replies.append)  # type: ignore[operator]
    assert not replies[0].is_error
    assert callable(service.prepare("embed", {"texts": ["one more"]})), "room again once a call finished"


# -- a real server over stdio ---------------------------------------------------------------------------
class _FakeEmbedder:
    """Enough of an Embedder for EmbeddingService: fixed vectors, a real (small) MemoryBudget."""

    model_name = "fake"
    pooling = "mean"
    dimension = 4
    context_length = 8
    plan = preferred_plan = "streaming"
    degraded = False

    def __init__(self, budget_bytes: int) -> None:
        from gguf_sandbox.budget import MemoryBudget

        self.budget = MemoryBudget(budget_bytes, cap=budget_bytes)

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        return np.full((len(texts), self.dimension), 0.5 if normalize else 2.0, dtype=np.float32)

    def close(self) -> None:
        pass


def _service(budget_bytes: int) -> mcp_server.EmbeddingService:
    from gguf_sandbox.budget import MemoryLimit

    return mcp_server.EmbeddingService(
        _FakeEmbedder(budget_bytes),  # type: ignore[arg-type]
        architecture="bert",
        limit=MemoryLimit(96 * MiB, "cgroup1"),
        floor=74 * MiB,
    )


def test_the_server_opens_its_engine_as_the_only_onnxruntime_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server's process runs nothing else on onnxruntime: its engine opens with own_process, so that
    resident-int8 shares one kernel pool across its matrices (the budget probe before it has no kernel)."""
    from gguf_sandbox.budget import MemoryBudget
    from gguf_sandbox.embed.engine import Embedder

    opened: list[tuple[str, bool]] = []

    class Opened:
        budget = MemoryBudget(1 << 30)

        def __enter__(self) -> Opened:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def fake_open(model: Path, plan: str = "auto", **options: Any) -> Opened:
        opened.append((plan, options.get("own_process", False)))
        return Opened()

    monkeypatch.setattr(Embedder, "open", fake_open)
    _, serving = serve._open_embedder(tmp_path / "model.gguf", "resident-int8", 1 << 20, None)
    serving.release()
    assert opened == [("streaming", False), ("resident-int8", True)]


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None,
    reason="resident-int8 needs the `fast` extra (onnxruntime)",
)
def test_a_resident_int8_server_multiplies_on_one_shared_pool(
    model: Path, engine: Callable[[Sequence[str]], np.ndarray]
) -> None:
    """`serve --plan resident-int8` on 2 CPUs: its engine shares one onnxruntime pool (a pool per matrix
    would start 24 threads), serves resident-int8's vectors, and stdout carries JSON-RPC only."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    command = serve_command(model, "--plan", "resident-int8")
    server = subprocess.Popen(
        ["taskset", "-c", ",".join(map(str, cpus)), *command.argv],
        env=command.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    hello = {
        "protocolVersion": PROTOCOL_VERSIONS[0],
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    }
    texts = ["", "a short text", "the quick brown fox jumps over the lazy dog " * 8]
    for message in (
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "embed", "arguments": {"texts": texts}},
        },
    ):
        server.stdin.write(json.dumps(message) + "\n")
    server.stdin.flush()
    try:
        replies = [json.loads(server.stdout.readline()) for _ in range(2)]
        threads = len(os.listdir(f"/proc/{server.pid}/task"))
    finally:
        server.stdin.close()
        trailing = server.stdout.read()
        server.wait(timeout=60)
    assert [reply["id"] for reply in replies] == [1, 2] and trailing == ""
    served = np.asarray(replies[1]["result"]["structuredContent"]["vectors"], dtype=np.float64)
    assert (served * engine(texts)).sum(axis=1).min() >= 0.998  # resident-int8's agreement (test_ort_kernel)
    # 5 here (the main thread, 2 embed workers, the pass's helper, the shared pool's worker); a pool per
    # matrix makes it 28.
    assert threads <= 8, threads


def test_a_budget_refusal_is_a_tool_error_of_its_kind_and_the_next_call_succeeds() -> None:
    per_text = 4 * mcp_server.RESPONSE_BYTES_PER_VALUE
    service = _service(budget_bytes=10 * per_text)
    refused = service.call("embed", {"texts": ["a"] * 11})
    assert refused.is_error and "refused by the memory budget" in refused.text
    assert "11 texts" in refused.text and "raise the memory limit" in refused.text
    assert refused.structured == {"error": refused.text, "kind": "BudgetExceeded"}
    served = service.call("embed", {"texts": ["a"] * 10})
    assert not served.is_error and served.structured is not None
    assert served.structured["vectors"] == [[0.5] * 4] * 10


def test_an_unexpected_exception_costs_one_call_not_the_server() -> None:
    service = _service(budget_bytes=1 << 20)

    def broken(texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        raise RuntimeError("boom")

    service._embedder.embed = broken  # type: ignore[method-assign]
    failed = service.call("embed", {"texts": ["a"]})
    assert failed.is_error and failed.text == "embed: internal error: RuntimeError: boom"
    assert failed.structured == {"error": failed.text, "kind": "InternalError"}
    assert not service.call("model_info", {}).is_error


def _env() -> dict[str, str]:
    root = str(Path(gguf_sandbox.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def serve_command(model: Path, *extra: str) -> CellCommand:
    argv = (sys.executable, "-m", "gguf_sandbox", "serve", "--model", str(model), *extra)
    return CellCommand(argv, _env())


@asynccontextmanager
async def connect(command: CellCommand, errlog: Any = None) -> AsyncIterator[Any]:
    """An initialized ClientSession of the official SDK talking to the server over stdio."""
    params = mcp.StdioServerParameters(
        command=command.argv[0], args=list(command.argv[1:]), env=dict(command.env or {})
    )
    async with (
        mcp.stdio_client(params, errlog=errlog or sys.stderr) as (read, write),
        mcp.ClientSession(read, write) as session,
    ):
        with anyio.fail_after(120):
            session.initialization = await session.initialize()
        yield session


def payload(result: Any) -> dict[str, Any]:
    """The structured content of a successful call (fails the test on a tool error)."""
    data = result.model_dump(by_alias=True)
    assert not data["isError"], data["content"]
    structured: dict[str, Any] = data["structuredContent"]
    assert json.loads(data["content"][0]["text"]) == structured, "the text content is the same JSON"
    return structured


def error_text(result: Any) -> str:
    data = result.model_dump(by_alias=True)
    assert data["isError"], f"expected a tool error, got {str(data)[:300]}"
    return " ".join(block["text"] for block in data["content"])


@pytest.fixture(scope="module")
def model(minilm_gguf: Callable[[str], Path]) -> Path:
    """all-MiniLM-L6-v2 as Q8_0 GGUF (converted once per session, shared with the engine tests)."""
    return minilm_gguf("q8_0")


@pytest.fixture(scope="module")
def embedder(model: Path) -> Iterator[Embedder]:
    """The engine opened in this process: what every served vector must equal."""
    from gguf_sandbox.embed.engine import Embedder

    with Embedder.open(model) as opened:
        yield opened


@pytest.fixture(scope="module")
def engine(embedder: Embedder) -> Callable[[Sequence[str]], np.ndarray]:
    """Unit-length vectors from the engine called directly."""
    return lambda texts: embedder.embed(list(texts))


class LiveServer:
    """One server for many tests: its session lives in a portal's event loop, tests call into it."""

    def __init__(self, portal: BlockingPortal, session: Any) -> None:
        self.portal = portal
        self.session = session

    def call(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.portal.call(self.session.call_tool, name, arguments if arguments is not None else {})

    def run(self, scenario: Callable[[Any], Any]) -> Any:
        return self.portal.call(scenario, self.session)


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[LiveServer]:
    with start_blocking_portal() as portal:
        manager: AbstractContextManager[Any] = portal.wrap_async_context_manager(
            connect(serve_command(model))
        )
        with manager as session:
            yield LiveServer(portal, session)


@needs_sdk
def test_initialize_then_tools_list_announces_both_tools_with_their_limits(server: LiveServer) -> None:
    info = server.session.initialization.model_dump(by_alias=True)
    assert info["serverInfo"]["name"] == "gguf-sandbox"
    assert "embed" in info["instructions"]
    tools = {
        tool.name: tool.model_dump(by_alias=True)
        for tool in server.portal.call(server.session.list_tools).tools
    }
    assert set(tools) == {"embed", "model_info"}
    embed = tools["embed"]
    assert f"1–{MAX_TEXTS} texts per call" in embed["description"]
    assert f"{MAX_CHARS:,} characters per text" in embed["description"]
    assert embed["inputSchema"]["properties"]["texts"]["maxItems"] == MAX_TEXTS
    assert embed["inputSchema"]["required"] == ["texts"]
    assert embed["outputSchema"]["required"] == ["vectors", "dimension", "model"]


@needs_sdk
def test_embed_returns_the_engines_vectors(
    server: LiveServer, engine: Callable[[Sequence[str]], np.ndarray]
) -> None:
    texts = ["The cat sat on the mat.", "Café naïve résumé — 東京 🙂", "x"]
    result = payload(server.call("embed", {"texts": texts}))
    vectors = np.asarray(result["vectors"], dtype=np.float32)
    assert vectors.shape == (3, 384) and result["dimension"] == 384 and result["count"] == 3
    assert result["model"] and result["normalized"] is True
    # Same plan and weights; only BLAS blocking may differ (the server runs one BLAS thread).
    np.testing.assert_allclose(vectors, engine(texts), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@needs_sdk
def test_embed_with_normalize_false_returns_the_pooled_vectors(
    server: LiveServer, embedder: Embedder
) -> None:
    texts = ["The cat sat on the mat.", "x"]
    raw = payload(server.call("embed", {"texts": texts, "normalize": False}))
    unit = payload(server.call("embed", {"texts": texts}))
    assert raw["normalized"] is False and unit["normalized"] is True
    vectors = np.asarray(raw["vectors"], dtype=np.float32)
    np.testing.assert_allclose(vectors, embedder.embed(texts, normalize=False), rtol=0, atol=1e-5)
    norms = np.linalg.norm(vectors, axis=1)
    assert np.all(np.abs(norms - 1) > 0.1), f"mean-pooled MiniLM vectors are not unit length: {norms}"
    np.testing.assert_allclose(vectors / norms[:, None], unit["vectors"], rtol=0, atol=1e-6)


@needs_sdk
def test_model_info_names_model_plan_and_memory(server: LiveServer) -> None:
    info = payload(server.call("model_info"))
    assert info["architecture"] == "bert" and info["dimension"] == 384 and info["context_length"] == 512
    assert info["plan"] in ("resident-f32", "resident-quant", "streaming")
    assert info["limits"] == {"max_texts": MAX_TEXTS, "max_chars": MAX_CHARS}
    memory = info["memory"]
    assert memory["limit_bytes"] > 0 and memory["peak_bytes"] >= memory["current_bytes"] > 0
    assert memory["floor_bytes"] == serve_floor()
    assert info["server"]["protocol_versions"] == list(PROTOCOL_VERSIONS)


@pytest.mark.parametrize(
    ("tool", "arguments", "fragment"),
    [
        pytest.param("embed", {"texts": "one"}, "wrap a single text in a list", id="wrong-type"),
        pytest.param("embed", {"texts": []}, "texts is empty", id="empty-list"),
        pytest.param("embed", {"texts": ["a"] * 65}, "at most 64 per call", id="too-many-texts"),
        pytest.param("embed", {"texts": ["x" * 10_000]}, "at most 8,192 per text", id="oversized-text"),
        pytest.param("embed", {"texts": [None]}, "texts[0] is NoneType", id="null-text"),
        pytest.param("model_info", {"verbose": True}, "takes no arguments", id="model-info-argument"),
        pytest.param("translate", {"texts": ["a"]}, "unknown tool 'translate'", id="unknown-tool"),
    ],
)
@needs_sdk
def test_malformed_call_is_a_tool_error_and_the_next_call_succeeds(
    server: LiveServer, tool: str, arguments: dict[str, Any], fragment: str
) -> None:
    assert fragment in error_text(server.call(tool, arguments))
    assert payload(server.call("embed", {"texts": ["still serving"]}))["count"] == 1


@needs_sdk
def test_model_info_answers_while_a_64_text_batch_embeds(
    server: LiveServer, record_property: Callable[[str, object], None]
) -> None:
    texts = [f"{text} {text}" for text in corpus(64, seed=7)]  # long texts: a batch of seconds

    async def scenario(session: Any) -> tuple[list[float], float, int]:
        latencies: list[float] = []
        finished: list[float] = []

        async def batch() -> None:
            payload(await session.call_tool("embed", {"texts": texts}))
            finished.append(time.perf_counter())

        async with anyio.create_task_group() as group:
            started = time.perf_counter()
            group.start_soon(batch)
            while not finished:
                began = time.perf_counter()
                payload(await session.call_tool("model_info", {}))
                latencies.append(time.perf_counter() - began)
                await anyio.sleep(0.01)
        during = sum(1 for _ in latencies)
        return latencies, finished[0] - started, during

    latencies, batch_seconds, calls = server.run(scenario)
    latencies_ms = sorted(1e3 * value for value in latencies)
    p50 = float(np.percentile(latencies_ms, 50))
    p95 = float(np.percentile(latencies_ms, 95))
    figures = (
        f"64-text batch {batch_seconds:.2f} s; {calls} model_info calls, p50 {p50:.1f} ms, p95 {p95:.1f} ms"
    )
    record_property("model_info_during_batch", figures)
    print(figures)
    assert calls >= 5, f"the batch should outlast several model_info calls: {figures}"
    assert p95 <= MODEL_INFO_P95_LIMIT_MS, figures


def nan_model(directory: Path) -> Path:
    """A small synthetic BERT whose last layer's output-norm bias is NaN: every vector comes out NaN."""
    from gguf_sandbox.gguf.reader import GGUFFile
    from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert

    spec = SyntheticBert(layers=2)
    path = write_synthetic_bert(directory / "nan-weights.gguf", spec)
    with GGUFFile.open(path) as gguf:
        tensor = gguf.tensor(f"blk.{spec.layers - 1}.layer_output_norm.bias")
    with path.open("r+b") as file:
        file.seek(tensor.offset)
        file.write(np.full(tensor.n_elements, np.nan, dtype=np.float32).tobytes())
    return path


@needs_sdk
def test_nan_vectors_are_a_tool_error_of_their_kind_never_a_result(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(serve_command(nan_model(tmp_path))) as session:
            failed = (await session.call_tool("embed", {"texts": ["a", "b"]})).model_dump(by_alias=True)
            raw = (await session.call_tool("embed", {"texts": ["a"], "normalize": False})).model_dump(
                by_alias=True
            )
            info = payload(await session.call_tool("model_info", {}))
        return {"unit": failed, "raw": raw}, info

    results, info = anyio.run(scenario)
    for result in results.values():
        assert result["isError"] is True, str(result)[:300]
        assert result["structuredContent"]["kind"] == "GGUFError"
        assert "NaN or infinite" in result["content"][0]["text"]
        assert "vectors" not in result["structuredContent"]
    assert info["model"] == "synthetic-bert", "the server goes on"


@needs_sdk
def test_client_disconnecting_mid_batch_lets_the_server_exit_cleanly(model: Path) -> None:
    """Raw JSON-RPC: start a 64-text embed, then close the pipes; the server exits 0 without a traceback."""
    command = serve_command(model)
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "embed", "arguments": {"texts": corpus(64, seed=3)}},
        },
    ]
    process = subprocess.Popen(
        list(command.argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(command.env or {}),
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write((json.dumps(requests[0]) + "\n").encode())
        process.stdin.flush()
        assert json.loads(process.stdout.readline())["id"] == 1
        for request in requests[1:]:
            process.stdin.write((json.dumps(request) + "\n").encode())
        process.stdin.flush()
        time.sleep(0.3)  # the batch is being embedded now
        process.stdin.close()
        process.stdout.close()
        code = process.wait(timeout=60)
        stderr = process.stderr.read().decode() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


# -- refusals --------------------------------------------------------------------------------------------
_IMPORT_PROBE = """
import json, sys
from gguf_sandbox.cli import main
code = main(sys.argv[1:])
heavy = sorted(name for name in ("numpy", "gguf_sandbox.embed.engine", "mcp") if name in sys.modules)
print(json.dumps({"code": code, "imported": heavy}))
"""


def test_below_the_floor_the_server_refuses_before_importing_numpy_or_the_engine(model: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, "serve", "--model", str(model), "--memory-floor", "1t"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert json.loads(done.stdout) == {"code": 3, "imported": []}, "nothing else on stdout"
    error = json.loads(done.stderr.strip().splitlines()[-1])
    assert error["kind"] == "BudgetExceeded" and error["floor"] == 1 << 40
    assert "1048576 MiB" in error["error"] and "raise the memory limit" in error["error"]


def test_missing_model_is_bad_input(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "serve", "--model", str(tmp_path / "absent.gguf")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 4 and done.stdout == ""
    assert json.loads(done.stderr.strip().splitlines()[-1])["kind"] == "FileNotFoundError"


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_in_a_cgroup_below_the_floor_the_refusal_is_graceful(model: Path) -> None:
    from gguf_sandbox.sandbox.cgroup.process import run_limited

    limit = serve_floor() - 8 * MiB
    result = run_limited(
        [sys.executable, "-m", "gguf_sandbox", "serve", "--model", str(model)], limit, 120, env=_env()
    )
    assert result.exit_code == 3 and result.oom_kill_count == 0, result.stderr[-2000:]
    error = json.loads(result.stderr.strip().splitlines()[-1])
    assert error["kind"] == "BudgetExceeded" and error["floor"] == serve_floor()
    assert error["limit"] == limit and error["limit_source"].startswith("cgroup")
    # Neither numpy nor the engine was imported: the cell stayed far below even the limit.
    assert result.peak_bytes is not None and result.peak_bytes < 40 * MiB


@needs_sdk
@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_100_concurrent_embed_calls_answer_correctly_within_the_memory_limit(
    model: Path, engine: Callable[[Sequence[str]], np.ndarray], record_property: Callable[[str, object], None]
) -> None:
    from gguf_sandbox.sandbox.cgroup.attach import attach_limited

    limit = 128 * MiB
    pool = corpus(100, seed=11)
    calls = [pool[i : i + 1 + i % 4] for i in range(100)]  # 1–4 texts each

    async def scenario(command: CellCommand, errlog: Any) -> tuple[list[np.ndarray | str], dict[str, Any]]:
        answers: list[np.ndarray | str] = [""] * len(calls)
        async with connect(command, errlog) as session:

            async def one(index: int) -> None:
                data = (await session.call_tool("embed", {"texts": calls[index]})).model_dump(by_alias=True)
                structured = data["structuredContent"]
                answers[index] = (
                    data["content"][0]["text"]
                    if data["isError"]
                    else np.asarray(structured["vectors"], dtype=np.float32)
                )

            async with anyio.create_task_group() as group:
                for index in range(len(calls)):
                    group.start_soon(one, index)
            info = payload(await session.call_tool("model_info", {}))
        return answers, info

    argv = serve_command(model).argv
    with attach_limited(argv, limit, 600, env=_env()) as cell:
        answers, info = anyio.run(scenario, cell.command, cell.stderr)
        result = cell.finish(10)
    failed = [answer for answer in answers if isinstance(answer, str)]
    assert not failed, failed[:3]
    for texts, vectors in zip(calls, answers, strict=True):
        assert isinstance(vectors, np.ndarray)
        np.testing.assert_allclose(vectors, engine(texts), rtol=0, atol=1e-4)
    memory = info["memory"]
    room = memory["budget_bytes"] - memory["budget_baseline_bytes"]
    peak = result.peak_bytes or 0
    figures = (
        f"plan {info['plan']}, cell peak {peak / MiB:.1f}/{limit / MiB:.0f} MiB, "
        f"budget peak {memory['budget_peak_bytes'] / MiB:.1f} of {room / MiB:.1f} MiB"
    )
    record_property("concurrent_100", figures)
    print(figures)
    assert result.exit_code == 0 and result.oom_kill_count == 0 and not result.timed_out, result.stderr[
        -2000:
    ]
    assert memory["limit_bytes"] == limit
    assert memory["budget_peak_bytes"] <= room
    assert result.peak_bytes is not None and result.peak_bytes <= limit


@pytest.mark.parametrize("chars", [1, 2, 3, 1000, MAX_CHARS])
def test_the_widest_string_size_is_computed_as_python_builds_it(chars: int) -> None:
    assert mcp_server.widest_string_bytes(chars) == sys.getsizeof("\U0001f600" * chars)


def test_a_huge_max_chars_is_sized_without_building_the_string() -> None:
    tracemalloc.start()
    try:
        cap = mcp_server.pending_cap(ServeLimits(max_texts=1, max_chars=10**12))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cap > 4 * 10**12 and peak < 1 << 16
