"""Products of activation rows by weight matrices: how they are cut into tasks for the compute pool, and
several products lined up in one hand-off."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from numpy.typing import NDArray

from gguf_sandbox.embed import linear
from gguf_sandbox.embed.bert import BertConfig
from gguf_sandbox.embed.gelu import gelu
from gguf_sandbox.embed.q8_rows import Q8Piece, Q8Rows
from gguf_sandbox.embed.threads import use_pool
from gguf_sandbox.gguf.dequant import dequantize
from tests.embed.conftest import CountingPool
from tests.embed.test_bert import F64, SMALL, DictWeights, random_weights
from tests.embed.test_q8_rows import random_q8_0


def _chunks(*rows: int, width: int = 384) -> list[NDArray[np.float32]]:
    return [np.zeros((r, width), dtype=np.float32) for r in rows]


def test_one_thread_never_cuts_a_product() -> None:
    assert linear.column_parts(_chunks(168, 168, 100), 1536, threads=1) == 1


@pytest.mark.parametrize(
    ("rows", "columns"),
    [((28,), 384), ((28,), 1536), ((8,), 384), ((168, 168, 168, 168, 60), 384), ((512,), 1536)],
    ids=["sentence-q", "sentence-ffn", "8-tokens", "batch-5-chunks", "long-text"],
)
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_tasks_keep_every_thread_busy_and_none_is_too_small(
    rows: tuple[int, ...], columns: int, threads: int
) -> None:
    xs = _chunks(*rows)
    parts = linear.column_parts(xs, columns, threads)
    macs = sum(rows) * 384 * columns
    tasks = len(xs) * parts
    # Each task worth handing over, and as many as the work allows up to TASKS_PER_THREAD per thread: every
    # chunk is cut into the same number of column spans, and one more span each would leave tasks too small.
    assert parts == 1 or macs // tasks >= linear.MIN_TASK_MACS
    assert (
        tasks >= linear.TASKS_PER_THREAD * threads or macs // (len(xs) * (parts + 1)) < linear.MIN_TASK_MACS
    )


def test_a_sentence_product_too_small_to_share_stays_whole() -> None:
    # 8 or 25 tokens x 384 x 384: 1.2M and 3.7M multiply-adds, less than one task's worth; a 25-token
    # text's FFN product, 14.7M, is worth sharing between two threads.
    assert linear.column_parts(_chunks(8), 384, threads=2) == 1
    assert linear.column_parts(_chunks(25), 384, threads=2) == 1
    assert linear.column_parts(_chunks(25), 1536, threads=2) >= 2


WIDE = BertConfig(vocab_size=10, hidden=384, layers=1, heads=12, ffn=1536, context_length=512)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("config", "block_rows", "rows"),
    [(SMALL, 16, (25,)), (SMALL, 16, (168, 60)), (WIDE, 1536, (64,)), (WIDE, 1536, (168, 60))],
    ids=["sentence", "two-chunks", "wide-sentence", "wide-two-chunks"],
)
def test_after_runs_once_per_chunk_after_its_columns_on_several_threads(
    threads: int, config: BertConfig, block_rows: int, rows: tuple[int, ...]
) -> None:
    """On one thread `after` runs in each task on its columns; on several, once per chunk on all of its
    columns, after every product (never twice on a column, never on one not yet computed: the outputs
    start as NaN), and the result is the same. WIDE's products are cut into column spans on 2 threads."""
    rng = np.random.default_rng(5)
    tensors = random_weights(config, 5)
    weights = DictWeights(config, tensors, block_rows)
    xs = [rng.standard_normal((r, config.hidden)).astype(np.float32) for r in rows]
    name = "blk.0.ffn_up"
    want = [np.tanh(x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]) for x in xs]
    outputs = [np.full((r, config.ffn), np.nan, dtype=np.float32) for r in rows]
    seen: list[tuple[int, ...]] = []

    def after(y: NDArray[np.float32]) -> None:
        assert np.isfinite(y).all()  # every column's product is done before `after` sees it
        seen.append(y.shape)
        np.tanh(y, out=y)

    pool = CountingPool(threads)
    try:
        with use_pool(pool):
            ys = linear.linear(xs, weights, name, config.ffn, after=after, out=outputs)
    finally:
        pool.close()
    for y, w in zip(ys, want, strict=True):
        np.testing.assert_allclose(y, w, rtol=1e-5, atol=1e-5)
    assert sum(shape[0] * shape[1] for shape in seen) == sum(r * config.ffn for r in rows)
    if threads > 1:
        assert sorted(seen) == sorted((r, config.ffn) for r in rows)
    if config is WIDE and threads == 2:
        assert linear.column_parts(xs, config.ffn, threads) > 1


class HeldWeights(DictWeights):
    """DictWeights that say every matrix is held in memory (as the resident plans do)."""

    def held(self, name: str) -> bool:
        return name in self._tensors


@pytest.mark.parametrize("weights_class", [DictWeights, HeldWeights], ids=["read-in-turn", "held"])
def test_q_k_v_products_equal_three_linears(weights_class: type[DictWeights]) -> None:
    rng = np.random.default_rng(11)
    weights = weights_class(SMALL, random_weights(SMALL, 11), 16)
    xs = [rng.standard_normal((rows, SMALL.hidden)).astype(np.float32) for rows in (28, 9)]
    names = [f"blk.0.{part}" for part in ("attn_q", "attn_k", "attn_v")]
    expected = [linear.linear(xs, weights, name, SMALL.hidden) for name in names]
    pool = CountingPool(3)
    try:
        with use_pool(pool):
            outs = [[np.empty_like(x) for x in xs] for _ in names]
            linear.linears(xs, weights, list(zip(names, outs, strict=True)))
    finally:
        pool.close()
    for got, want in zip(outs, expected, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # Held matrices: one hand-off for the three products; read in turn: at least one per matrix.
    if weights_class is HeldWeights:
        assert pool.handoffs == 1
    else:
        assert pool.handoffs >= len(names)


@pytest.mark.parametrize(
    ("rows", "layout", "spare_floats", "transposed"),
    [
        (25, "row-major", 1 << 17, True),
        (linear.FEW_ROWS, "row-major", 1 << 17, True),
        (linear.FEW_ROWS + 1, "row-major", 1 << 17, False),
        (25, "W.T contiguous", 1 << 17, False),
        (25, "row-major", 170 * 25 - 1, False),
    ],
    ids=["sentence", "few-rows-limit", "more-rows", "resident-f32-layout", "spare-too-small"],
)
def test_multiply_is_x_times_block_transposed(
    rows: int, layout: str, spare_floats: int, transposed: bool
) -> None:
    """Whichever way round BLAS is called: out = x @ block.T, into a column block of y; the transposed
    product goes through `spare` only for a few rows of a row-major block."""
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((170, 384)).astype(np.float32)
    block = weight if layout == "row-major" else np.ascontiguousarray(weight.T).T
    x = rng.standard_normal((rows, 384)).astype(np.float32)
    y = np.zeros((rows, 512), dtype=np.float32)
    spare = np.full(spare_floats, np.nan, dtype=np.float32)
    linear.multiply(x, block, y[:, 100:270], spare)
    want = x.astype(np.float64) @ weight.T.astype(np.float64)
    np.testing.assert_allclose(y[:, 100:270], want, rtol=1e-4, atol=1e-4)
    assert not y[:, :100].any() and not y[:, 270:].any()
    assert np.isnan(spare).all() != transposed


@pytest.mark.parametrize("rows", [8, 25, linear.FEW_ROWS])
@pytest.mark.parametrize("kind", ["row-order", "column-order"])
def test_a_decoded_piece_and_its_transposed_product_share_the_scratch_without_overlap(
    rows: int, kind: str
) -> None:
    """A Q8_0 piece decodes into the front of the thread's scratch and the product of a few rows goes
    through what it leaves: the result is x @ W.T for every chunk (an overlap would corrupt it)."""
    count, width = 170, 384
    raw = random_q8_0(count * width // 32)
    weight = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(count, width)
    decoder: linear.Decoder = (
        functools.partial(Q8Rows.of(raw, width).decode, 0, count)
        if kind == "row-order"
        else Q8Piece.of(raw, width).decode
    )
    rng = np.random.default_rng(rows)
    xs = [rng.standard_normal((r, width)).astype(np.float32) for r in (rows, rows // 2 + 1)]
    ys = [np.zeros((x.shape[0], 200 + count), dtype=np.float32) for x in xs]
    linear._decoded_product(xs, ys, (200, count, decoder))
    for x, y in zip(xs, ys, strict=True):
        want = x.astype(np.float64) @ weight.T.astype(np.float64)
        np.testing.assert_allclose(y[:, 200:], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
        assert not y[:, :200].any()


# -- a matrix with a kernel of its own (resident-int8): the same contract as a float32 product ---------------
class FloatKernel:
    """A kernel over float32 matrices stacked side by side, holding their biases or not, applying GELU
    itself: what ort_kernel.Int8Matrix does, without its rounding."""

    def __init__(self, matrices: list[NDArray[np.float32]], biases: list[NDArray[np.float32]] | None) -> None:
        self.weight = np.concatenate(matrices)  # [out, in]
        self.bias = None if biases is None else np.concatenate(biases)  # [out]
        self.calls: list[object] = []

    def applies(self, after: object) -> bool:
        return after is gelu

    def multiply(self, x: NDArray[np.float32], *, after: object = None) -> NDArray[np.float32]:
        self.calls.append(after)
        y: NDArray[np.float32] = (x @ self.weight.T).astype(np.float32)
        if self.bias is not None:
            y += self.bias
        if after is not None:
            gelu(y)
        return y


class KernelWeights(DictWeights):
    """DictWeights whose Q, K and V (or one matrix alone) are held by one FloatKernel."""

    def __init__(
        self, config: BertConfig, tensors: dict[str, F64], names: list[str], *, biased: bool
    ) -> None:
        super().__init__(config, tensors, block_rows=64)
        matrices = [self.vector(f"{name}.weight") for name in names]
        biases = [self.vector(f"{name}.bias") for name in names] if biased else None
        self.held = FloatKernel(matrices, biases)
        firsts = np.cumsum([0] + [m.shape[0] for m in matrices])
        self._slices = {
            f"{name}.weight": linear.KernelSlice(self.held, slice(int(lo), int(hi)), biased)
            for name, lo, hi in zip(names, firsts[:-1], firsts[1:], strict=True)
        }

    def kernel(self, name: str) -> linear.KernelSlice | None:
        return self._slices.get(name)


@pytest.mark.parametrize("biased", [True, False], ids=["kernel-bias", "numpy-bias"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("after", [gelu, None], ids=["gelu", "no-after"])
def test_a_kernel_product_is_after_of_x_w_plus_bias_plus_residual(
    biased: bool, bias: bool, residual: bool, after: object
) -> None:
    """Whatever the kernel holds and applies: after(x @ W.T (+ b if asked) (+ residual)), GELU inside the
    kernel only where nothing comes between it and the product."""
    tensors = random_weights(SMALL, seed=11)
    name = "blk.0.ffn_up"
    weights = KernelWeights(SMALL, tensors, [name], biased=biased)
    xs = [
        np.random.default_rng(1).standard_normal((rows, SMALL.hidden)).astype(np.float32) for rows in (5, 9)
    ]
    residuals = [np.full((x.shape[0], SMALL.ffn), 0.25, dtype=np.float32) for x in xs] if residual else None
    epilogue = gelu if after is gelu else None
    ys = linear.linear(xs, weights, name, SMALL.ffn, bias=bias, residual=residuals, after=epilogue)
    w, b = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
    for index, (x, y) in enumerate(zip(xs, ys, strict=True)):
        expected = x.astype(np.float64) @ w.T + (b if bias else 0) + (0.25 if residual else 0)
        if epilogue is not None:
            expected = expected.astype(np.float32)
            gelu(expected)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=f"chunk {index}")
    inside = epilogue is not None and not residual and bias == biased
    assert weights.held.calls == [gelu if inside else None] * len(xs)


@pytest.mark.parametrize("biased", [True, False], ids=["kernel-bias", "numpy-bias"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_q_k_v_held_by_one_kernel_are_one_product_per_chunk(biased: bool, bias: bool) -> None:
    tensors = random_weights(SMALL, seed=12)
    names = [f"blk.0.attn_{part}" for part in "qkv"]
    weights = KernelWeights(SMALL, tensors, names, biased=biased)
    xs = [
        np.random.default_rng(2).standard_normal((rows, SMALL.hidden)).astype(np.float32) for rows in (3, 7)
    ]
    outputs = [
        (name, [np.full((x.shape[0], SMALL.hidden), np.nan, dtype=np.float32) for x in xs]) for name in names
    ]
    linear.linears(xs, weights, outputs, bias=bias)
    assert len(weights.held.calls) == len(xs)
    for name, ys in outputs:
        w, b = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(y, x @ w.T + (b if bias else 0), rtol=1e-4, atol=1e-4, err_msg=name)
