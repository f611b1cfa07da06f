"""The int8 kernel (onnxruntime's MatMulNBits on Q8_0 weights) and the resident-int8 plan that uses it."""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import engine, ort_bert, ort_kernel, plan
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.embed.gelu import gelu
from gguf_sandbox.embed.ort_bert import FusedBert
from gguf_sandbox.embed.ort_kernel import Int8Matrix, PackedMatrix
from gguf_sandbox.embed.q8_block import Q8_BLOCK, Q8_BLOCK_BYTES
from gguf_sandbox.embed.rows import DEFAULT_CAP, aligned
from gguf_sandbox.embed.shapes import read_config, read_layout
from gguf_sandbox.errors import GGUFError, KernelRefused
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert
from gguf_sandbox.gguf.synth_decoder import QWEN2_TINY, QWEN3_TINY, SyntheticDecoder
from tests.embed.conftest import EVERY_PLAN, Variant, holds_whole, kernels_hidden
from tests.models import cached_decoder

UNLIMITED = 1 << 40
needs_kernel = pytest.mark.skipif(
    not ort_kernel.available(), reason="the int8 kernel needs the `fast` extra (onnxruntime, onnx)"
)


def _q8_blocks(quants: np.ndarray, scales: np.ndarray) -> bytes:
    """Q8_0 bytes of int8 quants [rows, row_len] with one fp16 scale per 32 of a row [rows, row_len / 32]."""
    rows, row_len = quants.shape
    blocks = np.empty((rows, row_len // Q8_BLOCK, Q8_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., :2] = scales.astype("<f2").reshape(rows, -1, 1).view(np.uint8)
    blocks[..., 2:] = quants.astype(np.int8).reshape(rows, -1, Q8_BLOCK).view(np.uint8)
    return blocks.tobytes()


@needs_kernel
def test_quants_keep_their_sign_and_scale() -> None:
    """Every int8 value, -128 and 127 included, times its block's scale: ones multiply exactly (1.0
    quantizes to 127 at scale 1/127), so a wrong zero point or scale would show."""
    quants = np.tile(np.arange(-128, 128, dtype=np.int8), (3, 1))  # [3, 256]
    scales = np.array([[1.0] * 8, [0.5] * 8, [2.0, -1.0] * 4])  # [3, 8]
    blocks = [(0, _q8_blocks(quants[:2], scales[:2])), (2, _q8_blocks(quants[2:], scales[2:]))]
    kernel = Int8Matrix("w", 3, 256, blocks, threads=1)
    got = kernel.multiply(np.ones((2, 256), dtype=np.float32))
    expected = (quants.reshape(3, 8, 32).sum(-1) * scales).sum(-1)  # [3]
    np.testing.assert_allclose(got, np.tile(expected, (2, 1)), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 26, 300])
def test_products_are_the_dequantized_products_to_int8_rounding(rows: int) -> None:
    rng = np.random.default_rng(rows)
    weight = (rng.standard_normal((200, 384)) * 0.05).astype(np.float32)
    raw = quantize(weight, GGMLQuantizationType.Q8_0).tobytes()
    kernel = Int8Matrix("w", 200, 384, [(0, raw)], threads=2)
    x = rng.standard_normal((rows, 384)).astype(np.float32)
    reference = x @ dequantize(raw, GGMLQuantizationType.Q8_0).reshape(200, 384).T
    got = kernel.multiply(x)
    assert got.shape == (rows, 200)
    # Activations rounded to 8 bits per block of 32: ~0.5% of the largest output at worst, never more.
    assert np.abs(got - reference).max() <= 0.01 * np.abs(reference).max()
    assert np.abs(got - reference).max() > 0  # the kernel really is the int8 one, not float32's


@needs_kernel
def test_the_kernels_gelu_is_erfs() -> None:
    """GELU inside the kernel against gelu.py's on the same product: erf's, within 1e-6 of the larger."""
    rng = np.random.default_rng(3)
    raw = quantize((rng.standard_normal((512, 384)) * 0.1).astype(np.float32), GGMLQuantizationType.Q8_0)
    kernel = Int8Matrix(
        "w", 512, 384, [(0, raw.tobytes())], bias=rng.standard_normal(512).astype(np.float32), threads=1
    )
    x = (rng.standard_normal((40, 384)) * 3).astype(np.float32)
    expected = kernel.multiply(x)
    assert np.abs(expected).max() > 5  # both tails of GELU are reached
    gelu(expected)
    assert kernel.applies(gelu) and not kernel.applies(None)
    got = kernel.multiply(x, after=gelu)
    assert np.abs(got - expected).max() <= 1e-6 * np.maximum(1, np.abs(expected)).max()


@needs_kernel
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=str)
def test_a_row_that_is_not_finite_gives_a_nan_row(poison: float) -> None:
    """The kernel rounds a NaN activation to some int8, and its row would come out finite and wrong: the
    row is NaN instead, as a float32 product makes it, and the other rows are untouched."""
    rng = np.random.default_rng(7)
    raw = quantize((rng.standard_normal((64, 64)) * 0.05).astype(np.float32), GGMLQuantizationType.Q8_0)
    kernel = Int8Matrix("w", 64, 64, [(0, raw.tobytes())], threads=1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    clean = kernel.multiply(x)
    x[1, 17] = poison
    got = kernel.multiply(x)
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], clean[[0, 2]])


@needs_kernel
def test_a_poisoned_scale_is_refused_when_loaded() -> None:
    blocks = np.zeros((2, 34), dtype=np.uint8)
    blocks[1, :2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    with pytest.raises(GGUFError, match=r"^blk\.0\.ffn_up\.weight: a Q8_0 block scale is NaN or infinite"):
        Int8Matrix("blk.0.ffn_up.weight", 2, 32, [(0, blocks.tobytes())], threads=1)


@needs_kernel
def test_a_failure_inside_the_kernel_is_one_line_naming_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's own errors (std::bad_alloc under an address-space limit, in the review's probe) come
    out as a GGUFError naming the matrix, its first line only."""
    raw = quantize(np.ones((32, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
    kernel = Int8Matrix("blk.3.ffn_down.weight", 32, 32, [(0, raw.tobytes())], threads=1)

    def failing(*_: object) -> None:
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc\n/onnxruntime_src/x.cc:1"
        )

    monkeypatch.setattr(kernel._session, "run", failing)
    with pytest.raises(GGUFError) as raised:
        kernel.multiply(np.ones((2, 32), dtype=np.float32))
    assert str(raised.value) == (
        "blk.3.ffn_down.weight: the int8 kernel failed on 2 rows: "
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"
    )


# Two float32 numbers a row in and out of its attention and feed-forward: MLAS packs the down projection's
# 2 output rows into a panel of 16, 8x its float32 bytes (16 MiB a layer), which the plan must reserve.
NARROW = SyntheticBert(
    vocab_size=400, hidden=2, layers=8, heads=1, ffn=262144, context=128, tensor_type=GGMLQuantizationType.F32
)


@needs_kernel
@pytest.mark.parametrize(
    ("plan_name", "model"),
    [("resident-int8", "minilm"), ("resident-f32", "minilm"), ("resident-f32", "narrow")],
)
@pytest.mark.parametrize("pool", [(1, False), (8, False), (8, True)], ids=["1", "8", "8-shared"])
def test_the_plan_holds_no_more_than_it_reserves(
    minilm_gguf: Callable[[str], Path], tmp_path: Path, plan_name: str, model: str, pool: tuple[int, bool]
) -> None:
    """A fresh process: RSS grown by importing the kernel and loading the model into it, its sessions'
    worker threads (or the process's shared pool) included, stays within what the plan reserves
    (plan.KERNEL_*, and resident-int8's INT8_HELD_PER_STORED or packed resident-f32's PACKED_*, with the
    tables and vectors), and its peak while loading within that and the load's own reservation."""
    threads, own_process = pool
    path = (
        minilm_gguf("q8_0") if model == "minilm" else write_synthetic_bert(tmp_path / "narrow.gguf", NARROW)
    )
    script = """
import gc, json, sys
import psutil
from gguf_sandbox.embed import engine
from gguf_sandbox.budget import MemoryBudget
engine.usable_cpus = lambda: 8  # as many threads as asked for, on any runner
process = psutil.Process()
with engine.Embedder.open(sys.argv[1], plan="resident-quant", budget=MemoryBudget(1 << 40)):
    pass  # everything but the kernel imported and warmed
gc.collect()
before, threads = process.memory_info().rss, process.num_threads()
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak RSS (VmHWM) starts again from now
except OSError:
    pass
opened = engine.Embedder.open(
    sys.argv[1],
    plan=sys.argv[4],
    budget=MemoryBudget(1 << 40),
    threads=int(sys.argv[2]),
    own_process=sys.argv[3] == "own",
)
gc.collect()
details = opened.plan_details
grown = process.memory_info().rss - before
threads = process.num_threads() - threads
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM:"))
reserved, packed, loading = details["resident_bytes"], details["packed"], details["load_bytes"]
peak = hwm - before
measured = {"grown": grown, "peak": peak, "reserved": reserved, "loading": loading}
print(json.dumps({**measured, "threads": threads, "packed": packed}))
"""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(path),
            str(threads),
            "own" if own_process else "",
            plan_name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    measured: dict[str, int] = json.loads(out.stdout)
    assert measured["packed"] == (plan_name == "resident-f32"), measured
    assert 0 < measured["grown"] <= measured["reserved"], measured
    assert measured["peak"] <= measured["reserved"] + measured["loading"], measured
    # A pool per session (layers: Q/K/V, output, up, down), threads - 1 workers each, and the pass's own.
    # Packed sessions' pools have at most PACKED_SESSION_THREADS each.
    workers = min(threads, ort_kernel.PACKED_SESSION_THREADS) if measured["packed"] else threads
    layers = 6 if model == "minilm" else NARROW.layers
    assert measured["threads"] <= 4 * layers * (workers - 1) + threads, measured


_SHARED_POOL_SCRIPT = """
import json, sys, time
import numpy as np
import psutil
from gguf_sandbox.embed import engine, ort_kernel
from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.errors import GGUFError
engine.usable_cpus = lambda: 2  # as many threads as asked for, on any runner
model, first_threads = sys.argv[1], int(sys.argv[2])
texts = ["", "a short one", "the quick brown fox jumps over the lazy dog " * 8]
budget = MemoryBudget(1 << 40)
process = psutil.Process()
installed = ort_kernel.available
ort_kernel.available = lambda: False  # the reference multiplies with numpy: no session before the others
with engine.Embedder.open(model, plan="resident-f32", budget=budget, threads=2) as exact:
    floats = exact.embed(texts)
ort_kernel.available = installed
result = {}
def opened(threads, own_process):
    try:
        before = process.num_threads()
        with engine.Embedder.open(
            model, plan="resident-int8", budget=budget, threads=threads, own_process=own_process
        ) as fast:
            workers = process.num_threads() - before
            cosine = float((fast.embed(texts) * floats).sum(axis=1).min())
            batch = float((fast.embed(texts * 8) * np.tile(floats, (8, 1))).sum(axis=1).min())
            time.sleep(0.5)  # a spinning worker stops within ~40 ms of its last product
            cpu = time.process_time()
            time.sleep(0.5)
            idle = time.process_time() - cpu
        return {"workers": workers, "cosine": min(cosine, batch), "idle_cpu_s": idle}
    except GGUFError as error:
        return {"error": str(error)}
result["first"] = opened(first_threads, True)
result["per_matrix"] = opened(2, False)
result["other_size"] = opened(1, False)
with engine.Embedder.open(model, budget=budget, threads=1) as auto:
    cosine = float((auto.embed(texts) * floats).sum(axis=1).min())
    result["auto_other_size"] = {"packed": auto.plan_details["packed"], "cosine": cosine}
print(json.dumps(result))
"""


def _three_opens(
    model: Path, *, first_threads: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """_SHARED_POOL_SCRIPT in a new process: resident-int8 opened with own_process on `first_threads`, then
    with a pool per matrix on 2 threads, then on 1; each one's new threads, cosine and idle CPU, or error;
    then auto on 1 thread: whether it is packed, and its cosine."""
    out = subprocess.run(
        [sys.executable, "-c", _SHARED_POOL_SCRIPT, str(model), str(first_threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout)
    return measured["first"], measured["per_matrix"], measured["other_size"], measured["auto_other_size"]


@needs_kernel
def test_a_shared_pool_is_one_set_of_threads_for_every_matrix(minilm_gguf: Callable[[str], Path]) -> None:
    """own_process on 2 threads: every matrix multiplies on onnxruntime's one process-wide pool (one worker
    beside the pass's own helper, where a pool per matrix starts 24), with resident-int8's vectors; from
    then on the process's sessions all use that pool, and an Embedder asking for another size is refused
    in words."""
    first, later, other, auto = _three_opens(minilm_gguf("q8_0"), first_threads=2)
    measured = {"first": first, "per_matrix": later, "other_size": other, "auto": auto}
    # The pass's helper, the shared pool's one worker, and a thread onnxruntime starts once per process.
    assert first["workers"] <= 3, measured
    assert first["cosine"] >= INT8_COSINE, measured
    # Idle, the shared worker sleeps: a worker spinning on would take ~0.5 s of CPU in the half second.
    assert first["idle_cpu_s"] < 0.1 and later["idle_cpu_s"] < 0.1, measured
    assert later["workers"] <= 1 and later["cosine"] >= INT8_COSINE, measured  # the same pool, reused
    assert other == {
        "error": "onnxruntime's kernels share a pool of 2 threads in this process (share_process_pool); "
        "open with threads=2, not 1"
    }, measured
    # auto on 1 thread cannot use the shared pool either: it holds resident-f32 for numpy, unrefused.
    assert not auto["packed"] and auto["cosine"] >= 0.99999, measured


@needs_kernel
def test_own_process_on_one_thread_leaves_the_process_pools_alone(minilm_gguf: Callable[[str], Path]) -> None:
    """One thread gains nothing from a shared pool, so none is made: later Embedders keep a pool per matrix,
    of any size (6 layers' 24 sessions, one worker each on 2 threads)."""
    first, later, other, auto = _three_opens(minilm_gguf("q8_0"), first_threads=1)
    measured = {"first": first, "per_matrix": later, "other_size": other, "auto": auto}
    # No pass helper and no pool worker on one thread: only the thread onnxruntime starts once per process.
    assert first["workers"] <= 1 and first["cosine"] >= INT8_COSINE, measured
    assert later["workers"] >= 24 and later["cosine"] >= INT8_COSINE, measured
    assert other["workers"] == 0 and other["cosine"] >= INT8_COSINE, measured
    assert auto["packed"] and auto["cosine"] >= 0.99999, measured


_RACE_SCRIPT = """
import json, sys, threading
import onnxruntime
from gguf_sandbox.embed import engine, ort_kernel
from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.errors import GGUFError
engine.usable_cpus = lambda: 2
made = onnxruntime.InferenceSession
sharing = []
def interleaved(*args, **kwargs):
    if not sharing:  # between the first session's options and the session, another open shares the pool
        sharing.append(threading.Thread(target=ort_kernel.share_process_pool, args=(2,)))
        sharing[0].start()
        sharing[0].join(timeout=0.5)
    return made(*args, **kwargs)
onnxruntime.InferenceSession = interleaved
try:
    with engine.Embedder.open(
        sys.argv[1], plan="resident-int8", budget=MemoryBudget(1 << 40), threads=2
    ) as fast:
        fast.embed(["a text"])
    result = "opened"
except GGUFError as error:
    result = str(error)
sharing[0].join()
print(json.dumps({"result": result, "shared": ort_kernel._PROCESS_POOL.threads}))
"""


@needs_kernel
def test_a_pool_shared_while_another_open_makes_its_sessions_waits_for_them(
    minilm_gguf: Callable[[str], Path],
) -> None:
    """One thread opens with a pool per matrix while another shares the process's pool: the sharing waits
    until the session being made exists (onnxruntime would refuse its options once the pool is shared),
    then the rest of the open uses the shared pool; stdout carries nothing but the result."""
    out = subprocess.run(
        [sys.executable, "-c", _RACE_SCRIPT, str(minilm_gguf("q8_0"))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {"result": "opened", "shared": 2}, out.stdout + out.stderr


_OTHER_CODES_POOL_SCRIPT = """
import sys
import onnxruntime.capi.onnxruntime_pybind11_state as state
from gguf_sandbox.embed import engine
from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.errors import GGUFError
engine.usable_cpus = lambda: 2
state.set_global_thread_pool_sizes(2, 1)  # what other code in the process may have done
budget = MemoryBudget(1 << 40)
for own in (False, True):
    try:
        engine.Embedder.open(sys.argv[1], plan="resident-int8", budget=budget, threads=2, own_process=own)
    except GGUFError as error:
        print(error, file=sys.stderr)
"""


@needs_kernel
def test_a_pool_other_code_made_is_refused_in_words_with_stdout_untouched(
    minilm_gguf: Callable[[str], Path],
) -> None:
    """Other code made onnxruntime's process-wide pool: a pool per matrix and a shared one are each refused
    in one line saying so, and onnxruntime prints nothing to stdout (no provider-fallback banner)."""
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_CODES_POOL_SCRIPT, str(minilm_gguf("q8_0"))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "blk.0.attn_q.weight, blk.0.attn_k.weight, blk.0.attn_v.weight: the int8 kernel cannot hold this "
        "matrix: other code in this process made onnxruntime's process-wide thread pool, and onnxruntime "
        "then refuses sessions with a pool of their own",
        "onnxruntime's kernels cannot share a pool of 2 threads: other code in this process already made "
        "onnxruntime's process-wide thread pool",
    ]


# resident-int8's own agreement, llama.cpp's: activations rounded to 8 bits cost most on short texts; the
# empty one ([CLS] [SEP]) is the lowest, 0.99852 to sentence-transformers, where resident-f32 has 0.99956
# and llama.cpp 0.99843 with the same GGUF (issue #15's notes, fixture_cos and llama_cos).
INT8_COSINE = 0.998


@needs_kernel
def test_resident_int8_agrees_with_float_plans_and_sentence_transformers(
    minilm_gguf: Callable[[str], Path], minilm_reference: dict[str, Any]
) -> None:
    texts = [entry["text"] for entry in minilm_reference["sentences"]]
    expected = np.asarray([entry["embedding"] for entry in minilm_reference["sentences"]], dtype=np.float64)
    path = minilm_gguf("q8_0")
    with Embedder.open(path, plan="resident-f32", budget=MemoryBudget(UNLIMITED)) as exact:
        floats = exact.embed(texts).astype(np.float64)
    for threads in (1, 2):
        with Embedder.open(
            path, plan="resident-int8", budget=MemoryBudget(UNLIMITED), threads=threads
        ) as fast:
            assert (fast.plan, fast.degraded) == ("resident-int8", False)
            got = fast.embed(texts).astype(np.float64)
        assert ((got * floats).sum(axis=1)).min() >= INT8_COSINE, threads
        assert not np.array_equal(got, floats)
        cosines = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
        assert cosines.min() >= INT8_COSINE, threads


@needs_kernel
def test_a_bert_layer_is_four_kernel_products_gelu_inside_the_up_projection(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bool]] = []
    original = Int8Matrix.multiply

    def counted(self: Int8Matrix, x: np.ndarray, *, after: Any = None) -> np.ndarray:
        calls.append((self.rows, after is gelu))
        return original(self, x, after=after)

    monkeypatch.setattr(Int8Matrix, "multiply", counted)
    with Embedder.open(minilm_gguf("q8_0"), plan="resident-int8", budget=MemoryBudget(UNLIMITED)) as opened:
        opened.embed(["one short text"])
    # Per layer: Q, K and V (1152 rows), the output (384), the up projection with its GELU (1536), down (384).
    assert calls == [(1152, False), (384, False), (1536, True), (384, False)] * 6


@needs_kernel
def test_auto_never_chooses_int8(minilm_gguf: Callable[[str], Path]) -> None:
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as opened:
        assert opened.plan == "resident-f32"


def test_asking_for_int8_without_the_kernel_says_what_to_install(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_kernel, "available", lambda: False)
    with pytest.raises(GGUFError, match=r"gguf-sandbox\[fast\]"):
        Embedder.open(minilm_gguf("q8_0"), plan="resident-int8", budget=MemoryBudget(UNLIMITED))


@needs_kernel
@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_a_kernel_library_that_cannot_be_imported_is_one_line(
    minilm_gguf: Callable[[str], Path], tmp_path: Path, package: str
) -> None:
    """Installed but broken (its shared library gone, say): `embed --plan resident-int8` exits 4 with one
    line naming the package and the fix, not a traceback."""
    broken = tmp_path / package
    broken.mkdir()
    missing = "libonnxruntime.so.1: cannot open shared object file"
    (broken / "__init__.py").write_text(f"raise ImportError({missing!r})")
    root = str(Path(__file__).resolve().parents[2])
    model = str(minilm_gguf("q8_0"))
    out = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "embed", "--model", model, "--plan", "resident-int8", "text"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])},
    )
    assert (out.returncode, out.stdout) == (4, "")
    assert out.stderr.splitlines() == [
        f"gguf-sandbox embed: error: plan resident-int8 cannot import {package} ({missing}); reinstall it "
        "with pip install --force-reinstall 'gguf-sandbox[fast]', or use --plan auto"
    ]


@pytest.mark.parametrize("kind", ["f32", "f16", "q4_0"])
def test_asking_for_int8_on_other_types_is_refused_in_words(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(ort_kernel, "available", lambda: True)
    with pytest.raises(GGUFError, match="Q8_0 weights only"):
        Embedder.open(minilm_gguf(kind), plan="resident-int8", budget=MemoryBudget(UNLIMITED))


def test_the_plan_reserves_its_libraries_sessions_and_stored_bytes() -> None:
    sizes = plan.ModelSizes(0, 0, 0, 400, 100, 104, True, 1.0625, matrix_count=2, q8_only=True)
    assert sizes.resident(plan.PlanName.RESIDENT_INT8, plan.TableMode.FILE) == (
        plan.KERNEL_IMPORT_BYTES + 2 * plan.KERNEL_SESSION_BYTES + plan.INT8_HELD_PER_STORED * 100
    )


# -- decoders: Q, K and V in one product where it fits a chunk, with qwen2's biases -------------------------
QWEN2_Q8 = dataclasses.replace(QWEN2_TINY, tensor_type=GGMLQuantizationType.Q8_0)


@needs_kernel
@pytest.mark.parametrize(
    ("spec", "fused"),
    # qwen2-tiny's Q, K and V are 256 wide, its FFN 384: one product. qwen3-tiny's are 256 wide too, its
    # FFN only 192: a chunk is sized for 192-wide rows, so they stay three products.
    [(QWEN2_Q8, True), (QWEN3_TINY, False)],
    ids=["qwen2-q8_0-biased-fused", "qwen3-q8_0-qk-norm-apart"],
)
def test_a_decoders_q_k_v_are_one_product_where_it_fits_a_chunk(
    spec: SyntheticDecoder, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cached_decoder(spec)
    texts = ["a few words", "the quick brown fox jumps over the lazy dog", "x" * 40, "1 2 3 4 5 6"]
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(path, plan="resident-f32", budget=budget) as exact:
        floats = exact.embed(texts).astype(np.float64)
    products: list[int] = []
    original = Int8Matrix.multiply

    def counted(self: Int8Matrix, x: np.ndarray, *, after: Any = None) -> np.ndarray:
        products.append(self.rows)
        return original(self, x, after=after)

    monkeypatch.setattr(Int8Matrix, "multiply", counted)
    with Embedder.open(path, plan="resident-int8", budget=budget) as fast:
        fast.embed(texts[:1])
        config = fast.config
        q_k_v = config.query_width + 2 * config.kv_width
        assert (q_k_v <= config.widest) is fused
        # Per layer: Q, K and V (one product or three), then the output, gate, up and down projections.
        assert products.count(q_k_v) == (config.layers if fused else 0)
        assert len(products) == (5 if fused else 7) * config.layers
        got = fast.embed(texts).astype(np.float64)
    assert ((got * floats).sum(axis=1)).min() >= INT8_COSINE


@needs_kernel
def test_blocks_of_a_kernel_matrix_are_its_weights(minilm_gguf: Callable[[str], Path]) -> None:
    """A pass that asks a resident-int8 matrix for blocks (none does today) gets the file's weights."""
    from gguf_sandbox.gguf.reader import GGUFFile

    path = minilm_gguf("q8_0")
    with Embedder.open(path, plan="resident-int8", budget=MemoryBudget(UNLIMITED)) as opened:
        weights = opened._weights
        name = "blk.2.attn_k.weight"
        blocks = list(weights.blocks(name))
        with GGUFFile.open(path) as gguf:
            expected = gguf.read_tensor(name)  # [out, in]
    got = np.concatenate([block for _, block in blocks])
    assert blocks[0][0] == 0
    np.testing.assert_array_equal(got, expected)


# -- hostile files on resident-int8: poisoned float vectors of a Q8_0 model, a file that shrinks -------------
SMALL_Q8 = SyntheticBert(
    vocab_size=400, hidden=64, layers=2, heads=4, ffn=128, context=128, seed=3,
    tensor_type=GGMLQuantizationType.Q8_0,
)  # fmt: skip


def _with_vector(model: Path, folder: Path, tensor: str, value: float) -> Path:
    """A copy of `model` whose float32 vector `tensor` holds `value` in its middle element."""
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(model) as gguf:
        info = gguf.tensor(tensor)
    assert info.type is GGMLQuantizationType.F32
    data = bytearray(model.read_bytes())
    at = info.offset + 4 * (info.n_elements // 2)
    data[at : at + 4] = np.float32(value).tobytes()
    poisoned = folder / f"{tensor}-{value}.gguf"
    poisoned.write_bytes(bytes(data))
    return poisoned


@needs_kernel
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("tensor", "value"),
    [
        ("blk.0.ffn_up.bias", math.inf),  # a bias the kernel holds, GELU inside the kernel after it
        ("blk.0.attn_q.bias", math.nan),  # in the fused Q/K/V bias
        ("blk.0.attn_output_norm.weight", math.nan),  # NaN activations into the next kernel product
    ],
    ids=["inf-up-bias", "nan-qkv-bias", "nan-norm"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_poisoned_vectors_are_one_error_per_call_and_release_the_pass(
    tmp_path: Path, tensor: str, value: float, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 kernel rounds what it multiplies, so a poison must not come out as a finite, wrong vector:
    every call is one GGUFError in words, no numpy warning, the pass's memory released."""
    from gguf_sandbox.embed import engine as engine_module

    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    model = _with_vector(write_synthetic_bert(tmp_path / "small.gguf", SMALL_Q8), tmp_path, tensor, value)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(model, plan="resident-int8", budget=budget, threads=threads) as opened:
        resident = budget.in_use
        for _ in range(2):
            with pytest.raises(GGUFError, match="NaN or infinite"):
                opened.embed(["a b c", "b c a b", "c"])
            assert budget.in_use == resident
    assert budget.in_use == 0


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("tensor", ["blk.0.attn_output_norm.weight", "blk.1.attn_output_norm.bias"])
def test_a_norm_or_bias_past_the_bound_is_refused_by_every_plan(tmp_path: Path, tensor: str) -> None:
    """3e38 in a norm weight or bias is refused in words when the model opens, by every plan alike (numpy's
    pass refused it while the whole encoder's session answered, issue #15's review); 1e19, under the
    bound, embeds on every plan, the float plans' vectors alike and resident-int8's close."""
    clean = write_synthetic_bert(tmp_path / "small.gguf", SMALL_WHOLE_Q8)
    huge = _with_vector(clean, tmp_path, tensor, 3e38)
    large = _with_vector(clean, tmp_path, tensor, 1e19)
    texts = ["a b c", "b c a b", "c"]
    vectors = {}
    for variant in EVERY_PLAN:
        with pytest.raises(GGUFError, match=rf"^{re.escape(tensor)} holds 3e\+38 at element 32: no norm"):
            variant.open(huge, budget=MemoryBudget(UNLIMITED))
        with variant.open(large, budget=MemoryBudget(UNLIMITED)) as opened:
            vectors[str(variant)] = opened.embed(texts).astype(np.float64)
    int8 = vectors.pop("resident-int8", None)
    f32 = vectors.pop("resident-f32")
    for other in vectors.values():
        assert np.abs(other - f32).max() <= 1e-5
    if int8 is not None:
        assert (int8 * f32).sum(axis=1).min() >= INT8_COSINE


# SMALL_Q8 with an FFN wide enough for its Q, K and V side by side: resident-f32 holds it whole in one
# session (ort_bert.FusedBert), where SMALL_Q8's is held a session per matrix.
SMALL_WHOLE_Q8 = dataclasses.replace(SMALL_Q8, ffn=256)


@needs_kernel
@pytest.mark.parametrize(
    ("plan_name", "spec"),
    [("resident-int8", SMALL_Q8), ("resident-f32", SMALL_Q8), ("resident-f32", SMALL_WHOLE_Q8)],
    ids=["int8", "f32 by matrix", "f32 whole"],
)
def test_a_file_that_shrinks_while_the_kernel_loads_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_name: str, spec: SyntheticBert
) -> None:
    """Truncated between the header's parse and the weights' reads: one GGUFError, nothing reserved (for
    packed resident-f32 too: a file's fault is not the kernel's, so it is not taken for a refusal)."""
    from gguf_sandbox.embed.weights import load_weights

    model = write_synthetic_bert(tmp_path / "small.gguf", spec)
    whole = ort_bert.fusable(read_config_of(model), DEFAULT_CAP)
    assert whole == (spec is SMALL_WHOLE_Q8)

    def shrinking(*args: Any, **kwargs: Any) -> Any:
        os.truncate(model, model.stat().st_size * 9 // 10)
        return load_weights(*args, **kwargs)

    monkeypatch.setattr("gguf_sandbox.embed.engine.load_weights", shrinking)
    budget = MemoryBudget(UNLIMITED)
    with pytest.raises(GGUFError, match=r"short read|shrank"):
        Embedder.open(model, plan=plan_name, budget=budget)
    assert budget.in_use == 0


SMALL_F32 = dataclasses.replace(SMALL_Q8, tensor_type=GGMLQuantizationType.F32)
# A cap under which the small BERT's whole_tokens (64) is shorter than LONG_SMALL_TEXT (82 tokens with [CLS]
# and [SEP]) and its context (128).
SMALL_CAP = 64 << 10
# ... and under which LONG_SMALL_TEXT is past attend_tokens (64) too: its attention is numpy's.
TINY_CAP = 16 << 10
LONG_SMALL_TEXT = "a b " * 40
SMALL_WHOLE_F32 = dataclasses.replace(SMALL_WHOLE_Q8, tensor_type=GGMLQuantizationType.F32)


def read_config_of(model: Path) -> Any:
    with GGUFFile.open(model) as gguf:
        return read_config(gguf)


@needs_kernel
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("tensor", "value"),
    [
        ("blk.0.attn_q.weight", 3e38),  # in the Q, K and V one session holds
        ("blk.0.attn_output.weight", 1e30),
        ("blk.1.ffn_up.weight", -math.inf),  # GELU inside the session after it
        ("blk.1.ffn_down.weight", math.nan),
    ],
    ids=str,
)
@pytest.mark.parametrize("spec", [SMALL_F32, SMALL_WHOLE_F32], ids=["by matrix", "whole"])
@pytest.mark.parametrize(
    "cap", [DEFAULT_CAP, SMALL_CAP, TINY_CAP], ids=["cap 1 MiB", "cap 64 KiB", "cap 16 KiB"]
)
def test_a_hostile_weight_gets_numpys_answer_when_packed(
    tmp_path: Path, tensor: str, value: float, spec: SyntheticBert, cap: int
) -> None:
    """A huge, infinite or NaN float32 weight: packed resident-f32, a session per matrix or the whole
    encoder in one, gives what numpy's does, the same vectors or the same error in words, and no warning;
    on a single text and on batches: of short texts (one whole encoder's call for them all) and, under the
    smaller caps, with a text past whole_tokens (on its own, layer by layer), its attention in the session
    (64 KiB) or past attend_tokens in numpy (16 KiB)."""
    model = _with_vector(write_synthetic_bert(tmp_path / "small.gguf", spec), tmp_path, tensor, value)
    config, long_tokens = read_config_of(model), len(LONG_SMALL_TEXT.split()) + 2
    assert ort_bert.whole_tokens(config, SMALL_CAP) < long_tokens <= ort_bert.attend_tokens(config, SMALL_CAP)
    assert ort_bert.attend_tokens(config, TINY_CAP) < long_tokens
    batches = (["a b c"], ["a b c", "b c a b", "c"], ["a b c", LONG_SMALL_TEXT, "c"], [LONG_SMALL_TEXT])
    _assert_packed_gives_numpys(model, batches, whole=spec is SMALL_WHOLE_F32, cap=cap, tolerance=1e-5)


@needs_kernel
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("value", [math.nan, math.inf, 3e38], ids=str)
def test_a_poisoned_token_row_stays_in_its_own_text(tmp_path: Path, value: float) -> None:
    """Texts share the whole encoder's calls, each padded on its own: a token whose embedding row is poisoned
    spoils only the texts holding it, so the error names the same text and count as numpy's pass, and the
    others' vectors are numpy's when embedded alongside it."""
    from gguf_sandbox.embed.engine import Embedder as Opened

    clean = write_synthetic_bert(tmp_path / "small.gguf", SMALL_WHOLE_F32)
    with Opened.open(clean, budget=MemoryBudget(UNLIMITED)) as opened:
        token = opened.tokenize("b")[1]  # after [CLS]
    with GGUFFile.open(clean) as gguf:
        table = gguf.tensor("token_embd.weight")
    data = bytearray(clean.read_bytes())
    at = table.offset + 4 * SMALL_WHOLE_F32.hidden * token
    data[at : at + 4] = np.float32(value).tobytes()
    model = tmp_path / "poisoned.gguf"
    model.write_bytes(bytes(data))
    batches = (["a c", "c a c", "b", "a a", "c"], ["a c", "c a c", "a a", "c"])
    _assert_packed_gives_numpys(model, batches, whole=True, cap=DEFAULT_CAP, tolerance=1e-6)


def _assert_packed_gives_numpys(
    model: Path, batches: tuple[list[str], ...], *, whole: bool, cap: int, tolerance: float
) -> None:
    """Packed resident-f32 (held whole where `whole` and this onnxruntime allows) embeds each batch as
    numpy's resident-f32 does: the same error in words, or vectors within `tolerance`."""
    outcomes: dict[bool, list[np.ndarray | str]] = {}
    for variant in (Variant(plan.PlanName.RESIDENT_F32), Variant(plan.PlanName.RESIDENT_F32, numpy=True)):
        with variant.open(model, budget=MemoryBudget(UNLIMITED, cap=cap)) as opened:
            assert opened.plan_details["packed"] is not variant.numpy
            assert opened.plan_details["fused"] == (whole and not variant.numpy and holds_whole())
            outcomes[variant.numpy] = [_embedded(opened, texts) for texts in batches]
    for packed, numpy_held in zip(outcomes[False], outcomes[True], strict=True):
        if isinstance(numpy_held, str):
            assert packed == numpy_held
        else:
            assert not isinstance(packed, str), packed
            assert np.abs(packed - numpy_held).max() <= tolerance


def _embedded(opened: Embedder, texts: list[str]) -> np.ndarray | str:
    """The vectors of `texts`, or the error in words."""
    try:
        return opened.embed(texts)
    except GGUFError as error:
        return str(error)


# -- resident-f32 held packed: float32 rows in a Gemm, packed when the session is made -----------------------
def _packed(weight: np.ndarray, *, bias: np.ndarray | None = None, name: str = "w") -> PackedMatrix:
    """weight [rows, row_len] handed over in two blocks, as a plan reads them."""
    rows, row_len = weight.shape
    half = rows // 2
    blocks = [(0, weight[:half]), (half, weight[half:])]
    return PackedMatrix(name, rows, row_len, blocks, bias=bias, threads=2)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 26, 300])
def test_packed_products_are_float32_products(rows: int) -> None:
    rng = np.random.default_rng(rows)
    weight = (rng.standard_normal((200, 384)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(200).astype(np.float32)
    kernel = _packed(weight, bias=bias)
    x = (rng.standard_normal((rows, 384)) * 3).astype(np.float32)
    expected = (x.astype(np.float64) @ weight.T.astype(np.float64) + bias).astype(np.float32)
    got = kernel.multiply(x)
    assert got.shape == (rows, 200)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale  # float32 rounding, nothing more
    gelu(expected)
    assert kernel.applies(gelu)
    assert np.abs(kernel.multiply(x, after=gelu) - expected).max() <= 1e-5 * scale


@needs_kernel
def test_packed_rows_are_given_back_once_packed() -> None:
    """The rows handed to the session read zeros once it has packed them (their pages dropped), and the
    products are still the rows' products: only the packed copy is held."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((96, 64)).astype(np.float32)
    kernel = _packed(weight)
    assert not np.frombuffer(kernel._pages, dtype=np.float32).any()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(kernel.multiply(x), x @ weight.T, rtol=1e-5, atol=1e-5)


class _ReadingSession:
    """A session that multiplies the rows as handed over, at every run: as a version of onnxruntime that
    read them after making the session would (1.23-1.32 copy them when the session is made)."""

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = weight

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds["x"] @ self.weight.T]


def _reading_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that read the rows handed to them at run time: each matrix's, and the whole encoder's
    (whose output then moves with the first of its pages)."""

    def reading(
        self: PackedMatrix, model: bytes, arrays: dict[str, np.ndarray], threads: int, **_: object
    ) -> None:
        self._session = _ReadingSession(arrays["weight"])

    def whole_reading(self: FusedBert, x: np.ndarray) -> np.ndarray:
        return x + np.frombuffer(self._pages, dtype=np.float32, count=1)

    monkeypatch.setattr(PackedMatrix, "_open", reading)
    monkeypatch.setattr(FusedBert, "whole", whole_reading)


@needs_kernel
@pytest.mark.parametrize("rows", ["random", "summing to zero"])
def test_a_session_that_reads_the_rows_again_is_caught(monkeypatch: pytest.MonkeyPatch, rows: str) -> None:
    """Its products after the drop would be of zeros: the probe rows see it, rows that sum to zero
    included, and the matrix says so instead of multiplying wrongly."""
    _reading_sessions(monkeypatch)
    weight = np.random.default_rng(6).standard_normal((64, 32)).astype(np.float32)
    if rows == "summing to zero":
        weight = np.tile(np.array([1.0, -1.0], dtype=np.float32), (64, 16))
    with pytest.raises(KernelRefused, match=r"^blk\.0\.ffn_up\.weight: onnxruntime reads float32"):
        _packed(weight, name="blk.0.ffn_up.weight")


def _failing_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that onnxruntime cannot start the threads of (its message under a thread limit)."""

    def failing(*_: object, what: str, **__: object) -> None:
        thread_limit = RuntimeError(
            "/onnxruntime_src/env.cc:327 PosixThread pthread_create failed, error code: 11"
        )
        raise GGUFError(f"{what}: {ort_kernel.failure_words(thread_limit)}")

    monkeypatch.setattr(ort_kernel, "open_session", failing)


def _no_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """No anonymous pages to be had (an address-space limit)."""

    def refused(*_: object, **__: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refused)


def _no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation refused while a session is made (a limit the budget cannot see)."""

    def refused(*_: object, **__: object) -> None:
        raise MemoryError(
            "Unable to allocate 1023. KiB for an array with shape (261888,) and data type float32"
        )

    monkeypatch.setattr(ort_kernel, "open_session", refused)


@pytest.fixture(params=["whole", "by matrix"])
def holder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How packed resident-f32 holds a BERT: whole in one session (ort_bert.FusedBert, the default), or a
    session per matrix (PackedMatrix, as for decoders)."""
    if request.param == "by matrix":
        monkeypatch.setattr(engine, "_fused_bytes", lambda config, cap: None)
    elif not holds_whole():
        pytest.skip("this onnxruntime's layer norm is not numpy's: the encoder is not held whole")
    return str(request.param)


@needs_kernel
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_packed_resident_f32_gives_numpys_vectors(
    minilm_gguf: Callable[[str], Path], minilm_reference: dict[str, Any], kind: str, holder: str
) -> None:
    """auto on an unconstrained host holds resident-f32 packed, and its vectors are numpy's within float
    rounding, on every fixture text, on one thread and two, one text at a time (the whole encoder in one
    call where it is held whole) and all together."""
    texts = [entry["text"] for entry in minilm_reference["sentences"]]
    with kernels_hidden(), Embedder.open(minilm_gguf(kind), budget=MemoryBudget(UNLIMITED)) as numpy_held:
        assert not numpy_held.plan_details["packed"]
        expected = numpy_held.embed(texts)
    for threads in (1, 2):
        with Embedder.open(minilm_gguf(kind), budget=MemoryBudget(UNLIMITED), threads=threads) as packed:
            assert (packed.plan, packed.plan_details["packed"], packed.degraded) == (
                "resident-f32",
                True,
                False,
            )
            assert packed.plan_details["fused"] == (holder == "whole")
            assert np.abs(packed.embed(texts) - expected).max() <= 1e-6
            one_by_one = np.concatenate([packed.embed([text]) for text in texts])
            assert np.abs(one_by_one - expected).max() <= 1e-6


@needs_kernel
@pytest.mark.parametrize(
    "refusal",
    [_reading_sessions, _failing_session, _no_pages, _no_memory],
    ids=["rows read again", "no threads", "no pages", "no memory"],
)
def test_a_kernel_that_cannot_hold_the_matrices_leaves_resident_f32_on_numpy(
    minilm_gguf: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    refusal: Callable[[pytest.MonkeyPatch], None],
    holder: str,
) -> None:
    """The load gives the packed reservation back and holds the matrices for numpy: the same vectors, and
    the smaller reservation plus the libraries it imported, which stay in the process; no error."""
    texts = ["a short text", "", "the quick brown fox " * 20]
    with kernels_hidden():
        budget = MemoryBudget(UNLIMITED)
        with Embedder.open(minilm_gguf("q8_0"), budget=budget) as numpy_held:
            expected, reserved = numpy_held.embed(texts), budget.in_use
    refusal(monkeypatch)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(minilm_gguf("q8_0"), budget=budget) as opened:
        assert (opened.plan, opened.plan_details["packed"]) == ("resident-f32", False)
        assert budget.in_use == reserved + plan.KERNEL_IMPORT_BYTES
        np.testing.assert_array_equal(opened.embed(texts), expected)
    assert budget.in_use == 0


def test_resident_f32_is_packed_only_where_the_kernel_and_its_bytes_fit(
    minilm_gguf: Callable[[str], Path],
) -> None:
    """Packed first where its libraries, sessions and packed copy fit (its tables read from the file before
    it is given up), else numpy's; and never where the kernel is not installed."""
    with GGUFFile.open(minilm_gguf("q8_0")) as gguf:
        config, sizes = read_config(gguf), plan.ModelSizes.of(gguf, read_layout(gguf))
    packed_bytes = sizes.resident(plan.PlanName.RESIDENT_F32, plan.TableMode.FILE, threads=8, packed=True)
    workers = ort_kernel.PACKED_SESSION_THREADS - 1  # per session, at any thread count
    assert packed_bytes == (
        sizes.vectors
        + plan.KERNEL_IMPORT_BYTES
        + sizes.matrix_count * (plan.KERNEL_SESSION_BYTES + workers * plan.KERNEL_THREAD_BYTES)
        + math.ceil(plan.PACKED_HELD_PER_F32 * sizes.paneled_f32)
    )
    assert sizes.paneled_f32 == sizes.matrices_f32  # MiniLM's rows fill whole panels
    # The load holds the rows of a group being packed twice more, and gives them back before any pass.
    load = plan.PACKED_LOAD_COPIES * sizes.largest_f32
    assert sizes.largest_f32 == 1536 * 384 * 4
    needed = packed_bytes + max(plan.pass_bytes(config, aligned(config.context_length)), load)
    roomy = plan.choose_plan(config, sizes, UNLIMITED, packable=True, threads=8)
    assert (roomy.name, roomy.packed, roomy.tables) == (plan.PlanName.RESIDENT_F32, True, plan.TableMode.F32)
    assert (roomy.resident_bytes, roomy.load_bytes) == (
        sizes.resident(plan.PlanName.RESIDENT_F32, plan.TableMode.F32, threads=8, packed=True),
        load,
    )
    just = plan.choose_plan(config, sizes, needed, packable=True, threads=8)
    assert (just.name, just.packed, just.tables) == (plan.PlanName.RESIDENT_F32, True, plan.TableMode.FILE)
    short = plan.choose_plan(config, sizes, needed - 1, packable=True, threads=8)
    assert (short.name, short.packed, short.load_bytes) == (plan.PlanName.RESIDENT_F32, False, 0)
    assert not plan.choose_plan(config, sizes, UNLIMITED).packed


@needs_kernel
def test_a_broken_onnxruntime_leaves_auto_on_numpy(
    minilm_gguf: Callable[[str], Path], tmp_path: Path
) -> None:
    """Installed but not loading: `embed` with auto still prints its vector, and says nothing else."""
    broken = tmp_path / "onnxruntime"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('libonnxruntime.so.1: cannot open shared object')")
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "embed", "--model", str(minilm_gguf("q8_0")), "a text"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])},
    )
    assert (out.returncode, out.stderr) == (0, "")
    printed = json.loads(out.stdout)
    assert printed["plan"] == "resident-f32" and len(printed["data"][0]["embedding"]) == 384


_LIMITED_SCRIPT = """
import json, resource, sys
import numpy as np
import onnx, onnxruntime
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.budget import MemoryBudget
if sys.argv[2] == "made":  # as other code in the process would
    onnxruntime.capi.onnxruntime_pybind11_state.set_global_thread_pool_sizes(2, 1)
else:  # an address-space limit 500 MiB above what the libraries map: numpy's plan fits
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (500 << 20), size + (500 << 20)))
with Embedder.open(sys.argv[1], budget=MemoryBudget(1 << 40), threads=2) as opened:
    vectors = opened.embed(["a text", ""])
    norms = np.linalg.norm(vectors, axis=1).tolist()
    print(json.dumps({"packed": opened.plan_details["packed"], "norms": norms}))
"""


@needs_kernel
@pytest.mark.parametrize("limit", ["made", "address space"])
def test_a_process_the_kernel_cannot_run_in_gets_resident_f32_from_numpy(
    minilm_gguf: Callable[[str], Path], limit: str
) -> None:
    """Other code made onnxruntime's process-wide pool (which refuses sessions with pools of their own), or
    an address-space limit is set (the sessions' threads map arenas it would run out of, and which stay
    mapped after a refusal): auto embeds with numpy, and says nothing on stdout or stderr but its result."""
    out = subprocess.run(
        [sys.executable, "-c", _LIMITED_SCRIPT, str(minilm_gguf("q8_0")), limit],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stderr) == (0, "")
    result = json.loads(out.stdout)
    assert not result["packed"]
    np.testing.assert_allclose(result["norms"], [1.0, 1.0], rtol=1e-5)


@needs_kernel
def test_the_plan_numpy_takes_after_a_refusal_leaves_room_for_its_passes(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget in which packed resident-f32 fits, and numpy's with its tables in memory and full 4096-token
    passes would too, were the libraries the packing imported not counted; its sessions then cannot be
    made. The plan numpy takes is chosen with the libraries counted, so its passes fit beside them and a
    4096-token batch embeds without waiting."""
    with GGUFFile.open(minilm_gguf("q8_0")) as gguf:
        config, sizes = read_config(gguf), plan.ModelSizes.of(gguf, read_layout(gguf))
    tables_in_memory = sizes.resident(plan.PlanName.RESIDENT_F32, plan.TableMode.F32)
    full_passes = -(-plan.DEFAULT_PASS_TOKENS * config.row_bytes * plan.PASS_SHARE[1] // plan.PASS_SHARE[0])
    budget = MemoryBudget(tables_in_memory + plan.TRANSIENT_CAPS * DEFAULT_CAP + full_passes + (1 << 20))
    assert plan.choose_plan(config, sizes, budget.available, packable=True).packed
    _failing_session(monkeypatch)
    with Embedder.open(minilm_gguf("q8_0"), budget=budget, threads=1, wait_s=1.0) as opened:
        assert not opened.plan_details["packed"]
        max_tokens = opened.plan_details["max_tokens"]
        assert isinstance(max_tokens, int)
        assert budget.available >= plan.pass_bytes(opened.config, max_tokens)
        vectors = opened.embed(["the quick brown fox jumps over the lazy dog " * 60] * 8)  # 8 x 512 tokens
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
