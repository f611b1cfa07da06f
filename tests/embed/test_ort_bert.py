"""A BERT encoder held whole in one onnxruntime session (ort_bert.FusedBert): packed resident-f32's BERTs."""

from __future__ import annotations

import gc
import json
import math
import mmap
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import bert, engine, ort_bert, ort_kernel, plan
from gguf_sandbox.embed.bert import BertConfig
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.embed.rows import DEFAULT_CAP, FLOAT_BYTES, rows_per_chunk
from gguf_sandbox.embed.shapes import read_config, read_layout
from gguf_sandbox.errors import GGUFError, KernelRefused
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.conftest import holds_whole, kernels_hidden

UNLIMITED = 1 << 40
needs_kernel = pytest.mark.skipif(
    not ort_kernel.available(), reason="the encoder's session needs the `fast` extra (onnxruntime, onnx)"
)
# Where onnxruntime's layer norm is not numpy's (1.23), a BERT is held a session per matrix instead (tested
# below): the tests that need it held whole skip there, saying why.
needs_whole = pytest.mark.skipif(
    not holds_whole(), reason="this onnxruntime's layer norm is not numpy's: the encoder is not held whole"
)
MINILM = BertConfig(vocab_size=30522, hidden=384, layers=6, heads=12, ffn=1536, context_length=512)


@pytest.mark.parametrize(
    "config",
    [
        MINILM,
        BertConfig(vocab_size=30522, hidden=768, layers=12, heads=12, ffn=3072, context_length=512),
        BertConfig(vocab_size=100, hidden=8, layers=1, heads=64 // 8, ffn=32, context_length=4096),
    ],
    ids=["minilm", "bert-base", "many heads"],
)
def test_a_whole_text_keeps_every_activation_within_the_cap(config: BertConfig) -> None:
    """At whole_tokens, all heads' scores and the widest activation fit the cap; one token more and one of
    them would not (or the context ends there)."""
    tokens = ort_bert.whole_tokens(config, DEFAULT_CAP)

    def largest(rows: int) -> int:
        return FLOAT_BYTES * max(config.heads * rows * rows, rows * max(3 * config.hidden, config.ffn))

    assert 1 <= tokens <= config.context_length
    assert largest(tokens) <= DEFAULT_CAP
    assert tokens == config.context_length or largest(tokens + 1) > DEFAULT_CAP
    assert ort_bert.whole_tokens(MINILM, DEFAULT_CAP) == 147  # 12 heads' scores at 147 tokens: 1.04 MB


def test_a_bert_whose_q_k_v_outgrow_a_chunk_is_not_held_whole() -> None:
    """A chunk is sized for the widest activation; Q, K and V side by side are 3 hidden wide."""
    narrow_ffn = BertConfig(vocab_size=100, hidden=64, layers=1, heads=4, ffn=128, context_length=64)
    assert not ort_bert.fusable(narrow_ffn, DEFAULT_CAP)
    assert ort_bert.fusable(MINILM, DEFAULT_CAP)
    assert engine._fused_bytes(narrow_ffn, DEFAULT_CAP) is None


def test_a_pass_reserves_the_sessions_activations_beside_numpys() -> None:
    """Every activation of a layer at once, for whole texts at their most rows (the attention scores three
    times: as computed, masked and as probabilities, each within the cap), a full chunk's rest(), or one
    text's attention at its longest (one head's scores at a time): MiniLM's is the last, at 512 tokens."""
    rows = DEFAULT_CAP // (FLOAT_BYTES * 1536)  # [rows, ffn] within the cap: 170
    assert ort_bert.whole_fits(MINILM, DEFAULT_CAP, 10, 17)
    assert not ort_bert.whole_fits(MINILM, DEFAULT_CAP, 1, rows + 1)
    whole = FLOAT_BYTES * rows * (20 * 384 + 2 * 1536) + 3 * DEFAULT_CAP
    rest = FLOAT_BYTES * rows_per_chunk(MINILM, DEFAULT_CAP) * (6 * 384 + 2 * 1536)
    assert ort_bert.attend_tokens(MINILM, DEFAULT_CAP) == 512
    attend = FLOAT_BYTES * (14 * 512 * 384 + 2 * 512 * 512)
    assert ort_bert.pass_transient(MINILM, DEFAULT_CAP) == max(whole, rest, attend) == attend


@needs_kernel
def test_the_plan_reserves_the_whole_encoders_passes_and_load(minilm_gguf: Callable[[str], Path]) -> None:
    """Packed resident-f32 of a BERT is held whole: each pass reserves the session's activations too, and
    the load both copies of the matrices; where that does not fit, it is held for numpy."""
    with GGUFFile.open(minilm_gguf("q8_0")) as gguf:
        config, sizes = read_config(gguf), plan.ModelSizes.of(gguf, read_layout(gguf))
    extra = ort_bert.pass_transient(config, DEFAULT_CAP)
    roomy = plan.choose_plan(config, sizes, UNLIMITED, packable=True, fused_bytes=extra)
    assert (roomy.packed, roomy.fused, roomy.fused_bytes) == (True, True, extra)
    assert roomy.load_bytes == plan.FUSED_LOAD_COPIES * sizes.paneled_f32
    assert roomy.pass_bytes(config, 64) == plan.pass_bytes(config, 64) + extra
    resident = sizes.resident(plan.PlanName.RESIDENT_F32, plan.TableMode.FILE, packed=True)
    tokens = 512
    just = resident + max(plan.pass_bytes(config, tokens) + extra, roomy.load_bytes)
    fits = plan.choose_plan(config, sizes, just, packable=True, fused_bytes=extra)
    assert (fits.packed, fits.fused, fits.tables) == (True, True, plan.TableMode.FILE)
    short = plan.choose_plan(config, sizes, just - 1, packable=True, fused_bytes=extra)
    assert (short.packed, short.fused) == (False, False)


@needs_whole
@pytest.mark.parametrize("threads", [1, 2])
def test_whole_texts_long_texts_and_batches_get_numpys_vectors(
    minilm_gguf: Callable[[str], Path], threads: int
) -> None:
    """Texts up to whole_tokens in one call, longer ones and batches layer by layer: numpy's vectors within
    float rounding, and the same whichever way a text goes."""
    longest = ort_bert.whole_tokens(MINILM, DEFAULT_CAP)
    texts = ["", "a short text", "the quick brown fox " * 20, "word " * 400]
    with kernels_hidden(), Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as numpy_held:
        lengths = [len(numpy_held.tokenize(text)) for text in texts]
        at_limit = " ".join(["a"] * (longest - 2))  # with [CLS] and [SEP]
        past_limit = at_limit + " a"
        texts += [at_limit, past_limit]
        expected = numpy_held.embed(texts)
    assert max(lengths[:3]) <= longest < lengths[3]  # both ways are taken
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED), threads=threads) as fused:
        assert fused.plan_details["fused"]
        assert [len(fused.tokenize(text)) for text in (at_limit, past_limit)] == [longest, longest + 1]
        one_by_one = np.concatenate([fused.embed([text]) for text in texts])
        together = fused.embed(texts)  # the short ones whole, the longer ones each on its own
        short_together = fused.embed(texts[:3])  # whole calls of several texts, each padded
    assert np.abs(one_by_one - expected).max() <= 1e-6
    assert np.abs(together - expected).max() <= 1e-6
    assert np.abs(short_together - expected[:3]).max() <= 1e-6


@needs_whole
def test_a_whole_call_goes_through_the_session_once(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One short text is one call of the session, and so are as many short texts together as fit it; a
    longer text goes on its own, a call for each piece's Q, K and V, one for its attention and one for the
    rest of the layer per piece."""
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as fused:
        held = fused._weights.fused
        assert held is not None
        calls: list[str] = []
        run = type(held)._run

        def counted(self: ort_bert.FusedBert, output: str, *args: object) -> np.ndarray:
            calls.append(output)
            return run(self, output, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(ort_bert.FusedBert, "_run", counted)
        fused.embed(["a short text"])
        assert calls == ["out.5"]
        calls.clear()
        fused.embed(["a short text", "another one"])
        assert calls == ["out.5"]
        calls.clear()
        texts = [" ".join(["word"] * 10)] * 32
        assert {len(fused.tokenize(text)) for text in texts} == {12}
        assert ort_bert.whole_fits(MINILM, DEFAULT_CAP, 14, 12)
        assert not ort_bert.whole_fits(MINILM, DEFAULT_CAP, 15, 12)
        fused.embed(texts)  # 14 a call: [14 * 12, ffn] within the cap
        assert calls == ["out.5"] * 3
        calls.clear()
        fused.embed(["a short text", "word " * 150])  # 5 and 152 tokens: the longer one on its own
        assert calls == ["out.5"] + [
            name for layer in range(6) for name in (f"qkv.{layer}", "ctx", f"out.{layer}")
        ]
        calls.clear()
        fused.embed(["word " * 400])  # 256 tokens: two pieces of 168 and 88 rows
        assert calls == [
            name
            for layer in range(6)
            for name in (f"qkv.{layer}", f"qkv.{layer}", "ctx", f"out.{layer}", f"out.{layer}")
        ]


@needs_whole
def test_a_closed_model_lets_its_session_go(minilm_gguf: Callable[[str], Path]) -> None:
    """Nothing keeps a closed Embedder's session (its packed weights, ~130 MB for MiniLM) alive: a cache of
    whole()'s inputs on the class once did."""
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as fused:
        held = fused._weights.fused
        assert held is not None
        session = weakref.ref(held)
        fused.embed(["a short text", "another one"])
        fused.embed(["a short text"])
        del held
    gc.collect()
    assert session() is None


def test_pages_read_again_after_the_drop_are_refused() -> None:
    """drop_pages' guard: a probe whose result moves with the pages (as a session reading them at run time
    would) is refused; one that does not is left alone, and the pages read as zeros afterwards."""
    pages, flat = ort_kernel.anonymous_floats("w", 1024)
    flat[:] = np.arange(1, 1025, dtype=np.float32)
    with pytest.raises(KernelRefused, match=r"^w: onnxruntime reads float32 weights again"):
        ort_kernel.drop_pages("w", pages, flat[:4].copy)
    flat[:] = 1.0
    kept = flat[:4].copy()
    ort_kernel.drop_pages("w", pages, lambda: kept)
    assert not flat.any()


def test_no_pages_for_the_rows_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_: object, **__: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refused)
    with pytest.raises(KernelRefused, match=r"^the 6-layer encoder: no pages for its float32 rows"):
        ort_kernel.anonymous_floats("the 6-layer encoder", 1 << 20)


_PEAK_SCRIPT = """
import gc, json, sys
from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed.engine import Embedder
def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) << 10 for line in lines if line.startswith(key))
with Embedder.open(sys.argv[1], budget=MemoryBudget(1 << 40), threads=int(sys.argv[2])) as opened:
    texts = [" ".join(["a"] * (int(sys.argv[3]) - 2))] * int(sys.argv[4])
    tokens = sum(len(opened.tokenize(text)) for text in texts)
    opened.embed(texts)  # warm: the session's first call sets up its kernels
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak RSS (VmHWM) starts again from now
    before = status("VmHWM:")
    for _ in range(3):
        opened.embed(texts)
    peak = status("VmHWM:") - before
    reserved = opened._weights.plan.pass_bytes(opened.config, tokens)
    print(json.dumps({"tokens": tokens, "peak": peak, "reserved": reserved}))
"""


def _rss_reading_error() -> int:
    """How far a reading of VmRSS or VmHWM may be from the truth. The kernel counts RSS in per-CPU counters
    (file, anon, shmem) and folds a CPU's count in only past a batch of max(32, 2·CPUs) pages, so each
    counter may be off by a batch per CPU. (CI read -92 KiB for a 256-token pass.)"""
    cpus = os.cpu_count() or 1
    return 3 * cpus * max(32, 2 * cpus) * mmap.PAGESIZE


@needs_whole
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("tokens", "count"), [(147, 1), (256, 1), (12, 14), (17, 10)])
def test_a_pass_stays_within_its_reservation(
    minilm_gguf: Callable[[str], Path], threads: int, tokens: int, count: int
) -> None:
    """A fresh process: the peak RSS of a text at whole_tokens (one call), of a full-context one (layer by
    layer: MiniLM's sentence-transformers limit) and of short texts as many as one call takes (the most
    rows, and the most attention scores) stays within what its pass reserves."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(minilm_gguf("q8_0")), str(threads), str(tokens), str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout)
    assert measured["tokens"] == tokens * count
    error = _rss_reading_error()
    assert -error <= measured["peak"] <= measured["reserved"] - error, measured


@needs_whole
def test_nan_weights_in_the_encoder_are_one_error(minilm_gguf: Callable[[str], Path], tmp_path: Path) -> None:
    """A NaN in a layer norm's scale reaches the vectors through the session as through numpy: one error in
    words, for a whole text and for a batch, and the Embedder goes on."""
    from tests.embed.test_ort_kernel import _with_vector

    poisoned = _with_vector(minilm_gguf("q8_0"), tmp_path, "blk.3.layer_output_norm.weight", math.nan)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(poisoned, budget=budget) as fused:
        assert fused.plan_details["fused"]
        held = budget.in_use
        for texts in (["a short text"], ["a short text", "word " * 300], ["again"]):
            with pytest.raises(GGUFError, match=r"NaN or infinite values for \d+ of the \d+ texts"):
                fused.embed(texts)
            assert budget.in_use == held  # each pass's reservation given back


_IDLE_SCRIPT = """
import json, sys, time
from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import engine
engine.usable_cpus = lambda: 4  # as many threads as asked for, on any runner
with engine.Embedder.open(sys.argv[1], budget=MemoryBudget(1 << 40), threads=4) as opened:
    opened.embed(["a short text"])  # the whole encoder in one call
    opened.embed(["a short text", "word " * 300])  # layer by layer
    time.sleep(0.5)  # its workers spin a little after a call, then sleep
    cpu = time.process_time()
    time.sleep(0.5)
    print(json.dumps({"fused": opened.plan_details["fused"], "idle_cpu_s": time.process_time() - cpu}))
"""


@needs_whole
def test_the_sessions_spinning_workers_sleep_when_idle(minilm_gguf: Callable[[str], Path]) -> None:
    """The session's pool spins between the nodes of a call (one session per Embedder, so nothing else's
    pool competes), but not while the Embedder is idle: three spinning workers would take ~1.5 s of CPU in
    the half second."""
    out = subprocess.run(
        [sys.executable, "-c", _IDLE_SCRIPT, str(minilm_gguf("q8_0"))],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout)
    assert measured["fused"] and measured["idle_cpu_s"] < 0.1, measured


@needs_whole
def test_the_session_has_no_fused_matmul_which_onnxruntime_1_23_divides_by_zero_in(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A part's call runs attention on no rows; onnxruntime 1.23's FusedMatMul (MatMul with its operands'
    Transposes folded in) kills the process there with SIGFPE, which no fallback can catch. The graph as
    onnxruntime optimizes it (written out) has no FusedMatMul, whatever version runs it."""
    onnx = pytest.importorskip("onnx")
    written = tmp_path / "optimized.onnx"
    made = ort_kernel.session_options

    def writing(threads: int, **options: object) -> object:
        made_options = made(threads, **options)  # type: ignore[arg-type]
        made_options.optimized_model_filepath = str(written)
        return made_options

    monkeypatch.setattr(ort_kernel, "session_options", writing)
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as fused:
        assert fused.plan_details["fused"]
    graph = onnx.load(str(written), load_external_data=False).graph
    ops: set[str] = set()

    def walk(nodes: object) -> None:
        for node in nodes:  # type: ignore[attr-defined]
            ops.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g.node)

    walk(graph.node)
    assert {"Gemm", "Softmax", "If"} <= ops and "FusedMatMul" not in ops, ops


@needs_kernel
def test_where_onnxruntimes_layer_norm_is_not_numpys_a_bert_is_held_a_session_per_matrix(
    minilm_gguf: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime 1.23's LayerNormalization gives NaN where a row's squares overflow, numpy's a finite
    row (a weight of 1e30 would make the whole encoder refuse vectors numpy gives): there the BERT is held
    packed a session per matrix, with numpy's layer norm between them, and the same vectors; no error."""
    texts = ["a short text", "", "the quick brown fox " * 20]
    with kernels_hidden(), Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as numpy_held:
        expected = numpy_held.embed(texts)
    monkeypatch.setattr(ort_bert._LayerNormCheck, "answer", False)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(minilm_gguf("q8_0"), budget=budget) as by_matrix:
        assert (by_matrix.plan_details["packed"], by_matrix.plan_details["fused"]) == (True, False)
        assert budget.in_use == by_matrix.plan_details["resident_bytes"]
        assert np.abs(by_matrix.embed(texts) - expected).max() <= 1e-6
    assert budget.in_use == 0


@needs_kernel
def test_the_layer_norm_check_is_what_onnxruntime_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs onnxruntime's LayerNormalization on a row whose squares overflow; its answer is
    whether that row comes out finite, as numpy's does."""
    monkeypatch.setattr(ort_bert._LayerNormCheck, "answer", None)
    row = np.array([[1e30, -2e30, 3, 0, 1, 2, 3, 4]], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        numpy_row = bert.layer_norm(row.copy(), np.ones(8, np.float32), np.zeros(8, np.float32), 1e-12)
    assert np.isfinite(numpy_row).all()
    onnxruntime = ort_kernel.library("onnxruntime")
    finite_from = (1, 32)  # 1.23.2 gives NaN, 1.32 numpy's row; versions between are not known here
    version = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    answer = ort_bert.numpys_layer_norm(1)
    if version >= finite_from:
        assert answer
    elif version <= (1, 23):
        assert not answer
