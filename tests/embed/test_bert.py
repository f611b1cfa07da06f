"""The blocked numpy forward pass against a naive float64 BERT written independently here."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.typing import NDArray

from gguf_sandbox.embed import bert, softmax
from gguf_sandbox.embed.bert import BertConfig, Pooling
from gguf_sandbox.embed.rows import F32, ROW_ALIGN, Ids, TokenBatch, padded_rows, rows_per_chunk
from gguf_sandbox.embed.threads import use_pool
from gguf_sandbox.errors import GGUFError
from tests.embed.conftest import CountingPool

F64 = NDArray[np.float64]
SMALL = BertConfig(vocab_size=97, hidden=48, layers=2, heads=4, ffn=96, context_length=80)


def random_weights(config: BertConfig, seed: int = 0) -> dict[str, F64]:
    """Every tensor of a BERT, float64, with norms near 1 like trained ones."""
    rng = np.random.default_rng(seed)
    h, f = config.hidden, config.ffn
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, h),
        "position_embd.weight": (config.context_length, h),
        "token_types.weight": (2, h),
        "token_embd_norm.weight": (h,),
        "token_embd_norm.bias": (h,),
    }
    for layer in range(config.layers):
        p = f"blk.{layer}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"{p}.{part}.weight"], shapes[f"{p}.{part}.bias"] = (h, h), (h,)
        shapes[f"{p}.ffn_up.weight"], shapes[f"{p}.ffn_up.bias"] = (f, h), (f,)
        shapes[f"{p}.ffn_down.weight"], shapes[f"{p}.ffn_down.bias"] = (h, f), (h,)
        for norm in ("attn_output_norm", "layer_output_norm"):
            shapes[f"{p}.{norm}.weight"], shapes[f"{p}.{norm}.bias"] = (h,), (h,)
    weights = {}
    for name, shape in shapes.items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        weights[name] = base + 0.2 * rng.standard_normal(shape)
    return {name: w.astype(np.float32).astype(np.float64) for name, w in weights.items()}


class DictWeights:
    """BertWeights over in-memory arrays, cut into blocks of `block_rows` rows."""

    def __init__(self, config: BertConfig, tensors: dict[str, F64], block_rows: int) -> None:
        self._config = config
        self._tensors = {name: t.astype(np.float32) for name, t in tensors.items()}
        self._block_rows = block_rows

    @property
    def config(self) -> BertConfig:
        return self._config

    def vector(self, name: str) -> F32:
        return self._tensors[name]

    def rows(self, name: str, ids: Ids) -> F32:
        return self._tensors[name][ids]

    def blocks(self, name: str) -> Iterator[tuple[int, F32]]:
        matrix = self._tensors[name]
        for first in range(0, matrix.shape[0], self._block_rows):
            yield first, matrix[first : first + self._block_rows]


def naive_layer_norm(x: F64, gamma: NDArray[np.floating], beta: NDArray[np.floating], eps: float) -> F64:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * gamma + beta, dtype=np.float64)


def naive_gelu(x: F64) -> F64:
    erf = np.vectorize(math.erf)
    return np.asarray(0.5 * x * (1.0 + erf(x / math.sqrt(2.0))))


def naive_bert(config: BertConfig, t: dict[str, F64], sequence: list[int]) -> F64:
    """The textbook BERT sentence embedding, one sequence, float64, no blocking."""
    n = len(sequence)
    x = t["token_embd.weight"][sequence] + t["position_embd.weight"][:n] + t["token_types.weight"][0]
    x = naive_layer_norm(x, t["token_embd_norm.weight"], t["token_embd_norm.bias"], config.layer_norm_eps)
    d = config.head_dim
    for layer in range(config.layers):
        p = f"blk.{layer}"

        def lin(v: F64, part: str, p: str = p) -> F64:
            return np.asarray(v @ t[f"{p}.{part}.weight"].T + t[f"{p}.{part}.bias"])

        q, k, v = lin(x, "attn_q"), lin(x, "attn_k"), lin(x, "attn_v")
        ctx = np.zeros_like(x)
        for h in range(config.heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d)
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            ctx[:, cols] = probs @ v[:, cols]
        x = naive_layer_norm(
            x + lin(ctx, "attn_output"),
            t[f"{p}.attn_output_norm.weight"],
            t[f"{p}.attn_output_norm.bias"],
            config.layer_norm_eps,
        )
        x = naive_layer_norm(
            x + lin(naive_gelu(lin(x, "ffn_up")), "ffn_down"),
            t[f"{p}.layer_output_norm.weight"],
            t[f"{p}.layer_output_norm.bias"],
            config.layer_norm_eps,
        )
    pooled = {
        Pooling.MEAN: x.mean(axis=0),
        Pooling.CLS: x[0],
        Pooling.LAST: x[-1],
    }
    vector = pooled[config.pooling]
    return np.asarray(vector / np.linalg.norm(vector))


def sequences(config: BertConfig, lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, size=n).tolist() for n in lengths]


# -- elementwise pieces ---------------------------------------------------------------------------------
def test_erf_matches_math_erf_to_about_1e7() -> None:
    xs = np.linspace(-7.0, 7.0, 400_001, dtype=np.float32)
    exact = np.array([math.erf(float(v)) for v in xs])
    assert np.abs(bert.erf(xs) - exact).max() <= 2e-7


def test_gelu_is_the_exact_erf_gelu() -> None:
    xs = np.linspace(-12.0, 12.0, 400_001, dtype=np.float32)
    exact = naive_gelu(xs.astype(np.float64))
    got = bert.gelu(xs.copy())
    # Within float32 rounding of the true value, plus a hair.
    assert np.all(np.abs(got - exact) <= 2.5e-7 + 1.5e-7 * np.abs(exact))


def test_gelu_works_in_place_on_a_2d_chunk_larger_than_one_step() -> None:
    x = np.random.default_rng(0).standard_normal((7, bert.GELU_STEP // 3)).astype(np.float32) * 3
    expected = naive_gelu(x.astype(np.float64))
    result = bert.gelu(x)
    assert result is x
    assert np.abs(x - expected).max() <= 1e-6


def test_layer_norm_matches_naive() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((9, 48)) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    expected = naive_layer_norm(x.astype(np.float64), gamma, beta, 1e-12)
    assert np.abs(bert.layer_norm(x, gamma, beta, 1e-12) - expected).max() <= 2e-5


def test_normalize_gives_unit_rows_and_keeps_zero_rows() -> None:
    v = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    bert.normalize(v)
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 0.0]], rtol=0, atol=1e-7)


# -- batches ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lengths", "chunk_rows"),
    [
        pytest.param([5], 8, id="one-short"),
        pytest.param([3, 4, 1, 8, 2], 8, id="packed"),
        pytest.param([20], 8, id="one-long-split"),
        pytest.param([2, 19, 3, 3], 8, id="long-between-short"),
        pytest.param([1, 1, 1], 1, id="chunk-of-one"),
    ],
)
def test_token_batch_chunks_cover_every_row_once(lengths: list[int], chunk_rows: int) -> None:
    seqs = [[i * 100 + j for j in range(n)] for i, n in enumerate(lengths)]
    batch = TokenBatch.from_sequences(seqs, chunk_rows)
    assert batch.n_tokens == sum(lengths)
    assert batch.n_sequences == len(lengths)
    assert [c[0] for c in batch.chunks] == [0] + [c[1] for c in batch.chunks[:-1]]
    assert batch.chunks[-1][1] == sum(lengths)
    assert all(0 < hi - lo <= chunk_rows for lo, hi in batch.chunks)
    for index, pieces in enumerate(batch.pieces):
        rows = [batch.chunks[c][0] + r for c, lo, hi in pieces for r in range(lo, hi)]
        assert batch.ids[rows].tolist() == seqs[index]
        assert batch.positions[rows].tolist() == list(range(lengths[index]))
        # Only sequences longer than a chunk are ever split.
        assert len(pieces) == 1 or lengths[index] > chunk_rows


@pytest.mark.parametrize(
    ("rows", "limit", "expected"),
    [
        pytest.param(19, 168, 20, id="up-to-aligned"),
        pytest.param(20, 168, 20, id="already-aligned"),
        pytest.param(166, 168, 168, id="up-to-the-limit"),
        pytest.param(5, 6, 6, id="limit-below-aligned"),
        pytest.param(7, 5, 7, id="limit-below-rows"),
    ],
)
def test_padded_rows_align_without_passing_the_limit(rows: int, limit: int, expected: int) -> None:
    assert padded_rows(rows, limit) == expected


def test_chunks_are_aligned_and_their_padded_rows_stay_within_the_cap() -> None:
    for cap in (1 << 20, 8192, 4 * 96 * 4, 1000):
        rows = rows_per_chunk(SMALL, cap)
        assert rows * SMALL.widest * 4 <= cap or rows == 1
        assert rows % ROW_ALIGN == 0 or rows < ROW_ALIGN


def test_padding_rows_change_no_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = random_weights(SMALL, seed=6)
    weights = DictWeights(SMALL, tensors, 16)
    seqs = sequences(SMALL, [1, 6, 19, 3, 41])
    batch = TokenBatch.from_sequences(seqs, rows_per_chunk(SMALL))
    padded = bert.encode(weights, batch)
    monkeypatch.setattr("gguf_sandbox.embed.rows.ROW_ALIGN", 1)
    unpadded = bert.encode(weights, batch)
    assert np.isfinite(padded).all()
    assert np.abs(padded - unpadded).max() <= 1e-6


def test_token_batch_refuses_empty_input() -> None:
    with pytest.raises(ValueError, match="at least one sequence"):
        TokenBatch.from_sequences([], 4)
    with pytest.raises(ValueError, match="at least one token"):
        TokenBatch.from_sequences([[1], []], 4)


def test_config_refuses_heads_that_do_not_divide_hidden() -> None:
    with pytest.raises(GGUFError, match="not divisible"):
        BertConfig(vocab_size=10, hidden=50, layers=1, heads=4, ffn=64, context_length=8)


# -- the whole forward pass -------------------------------------------------------------------------------
SENTENCE_POOLINGS = [Pooling.MEAN, Pooling.CLS, Pooling.LAST]


def test_config_refuses_per_token_pooling_by_name() -> None:
    # NONE asks llama.cpp for one vector per token; the engine returns one per text, and used to pool NONE
    # by mean without a word.
    with pytest.raises(GGUFError, match=r"pooling type NONE \(0\).*one vector per token"):
        BertConfig(**{**SMALL.__dict__, "pooling": Pooling.NONE})


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), 0.0, -1e-12], ids=str)
def test_config_refuses_a_layer_norm_epsilon_that_is_not_finite_and_positive(eps: float) -> None:
    with pytest.raises(GGUFError, match="layer_norm_eps"):
        BertConfig(**{**SMALL.__dict__, "layer_norm_eps": eps})


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_end_in_gguf_error_not_in_a_vector(poison: float) -> None:
    tensors = random_weights(SMALL, seed=6)
    tensors["blk.1.ffn_down.bias"][3] = poison
    weights = DictWeights(SMALL, tensors, 16)
    batch = TokenBatch.from_sequences(sequences(SMALL, [5, 9]), rows_per_chunk(SMALL))
    with pytest.raises(GGUFError, match="NaN or infinite"):
        bert.encode(weights, batch)


@pytest.mark.parametrize("pooling", SENTENCE_POOLINGS, ids=lambda p: p.name.lower())
@pytest.mark.parametrize(
    ("cap", "block_rows"),
    [
        pytest.param(1 << 20, 1 << 20, id="unblocked"),
        # 1,536-byte cap: 4-row activation chunks, single-head attention groups, 1-query-row blocks.
        pytest.param(4 * 96 * 4, 5, id="tiny-cap"),
        pytest.param(4096, 7, id="small-cap"),
    ],
)
def test_encode_matches_naive_float64(pooling: Pooling, cap: int, block_rows: int) -> None:
    config = BertConfig(**{**SMALL.__dict__, "pooling": pooling})
    tensors = random_weights(config)
    weights = DictWeights(config, tensors, block_rows)
    seqs = sequences(config, [1, 6, 33, 80, 2, 17])
    batch = TokenBatch.from_sequences(seqs, rows_per_chunk(config, cap))
    got = bert.encode(weights, batch, cap)
    expected = np.stack([naive_bert(config, tensors, s) for s in seqs])
    assert got.dtype == np.float32
    assert got.shape == (len(seqs), config.hidden)
    assert np.abs(got - expected).max() <= 2e-6


def test_encode_is_independent_of_blocking() -> None:
    tensors = random_weights(SMALL, seed=3)
    seqs = sequences(SMALL, [40, 3, 80, 11])
    results = []
    for cap in (1 << 20, 8192, 1536):
        weights = DictWeights(SMALL, tensors, max(1, cap // (SMALL.hidden * 4)))
        batch = TokenBatch.from_sequences(seqs, rows_per_chunk(SMALL, cap))
        results.append(bert.encode(weights, batch, cap))
    assert np.abs(results[0] - results[1]).max() <= 1e-6
    assert np.abs(results[0] - results[2]).max() <= 1e-6


def test_a_sequence_embeds_the_same_alone_and_in_a_batch() -> None:
    tensors = random_weights(SMALL, seed=4)
    weights = DictWeights(SMALL, tensors, 16)
    seqs = sequences(SMALL, [12, 30, 5])
    rows = rows_per_chunk(SMALL)
    together = bert.encode(weights, TokenBatch.from_sequences(seqs, rows))
    alone = np.stack([bert.encode(weights, TokenBatch.from_sequences([s], rows))[0] for s in seqs])
    assert np.abs(together - alone).max() <= 1e-6


def _one_sequence(length: int, hidden: int, seed: int) -> tuple[TokenBatch, list[F32], list[F32], list[F32]]:
    """A batch of one sequence of `length` tokens in chunks as a BERT with `hidden` (12 heads) cuts them,
    and random Q, K and V rows for it."""
    config = BertConfig(
        vocab_size=10, hidden=hidden, layers=1, heads=12, ffn=4 * hidden, context_length=length
    )
    rng = np.random.default_rng(seed)
    batch = TokenBatch.from_sequences([list(range(length))], rows_per_chunk(config))
    q, k, v = (
        [rng.standard_normal((hi - lo, hidden)).astype(np.float32) for lo, hi in batch.chunks] for _ in "qkv"
    )
    return batch, q, k, v


def test_attention_temporaries_stay_within_the_cap_at_512_tokens() -> None:
    """Peak traced memory inside attention(): q, k, v, ctx for 512 tokens plus blocks within the cap."""
    import tracemalloc

    batch, q, k, v = _one_sequence(512, 384, seed=5)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        bert.attention(q, k, v, batch, heads=12)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    ctx_bytes = 512 * 384 * 4
    # ctx itself, plus at most: one block of scores with its scaled queries and the head group's gathered K
    # and V, together within the cap, and small softmax rows.
    assert peak <= ctx_bytes + (1 << 20) + (96 << 10)


@pytest.mark.parametrize(
    ("length", "hidden", "threads", "most_blocks"),
    # 64-wide heads: chunks of 84 rows, each in blocks of 37, 37 and 10 rows, and 8 rows left: 19 per head.
    [(256, 384, 1, 6), (256, 384, 2, 12), (512, 384, 1, 24), (512, 768, 3, 12 * 19)],
    ids=["256-tokens", "256-tokens-2-threads", "512-tokens", "64-wide-heads-3-threads"],
)
def test_a_sequence_across_chunks_is_attended_in_few_blocks_within_the_cap(
    monkeypatch: pytest.MonkeyPatch, length: int, hidden: int, threads: int, most_blocks: int
) -> None:
    """Blocks of up to a chunk's query rows, with as many heads as the cap holds beside their gathered K
    and V: fewer numpy calls, which on 2 threads pass the GIL back and forth (a 256-token text on 2
    threads: 6 blocks a thread, where groups sized for every query row of one head made 12). With 64-wide
    heads on 3 threads one head's K and V take most of a task's share: its blocks shrink to fit beside them
    (37 rows), where e85d0c8 gave them half the share whatever K and V took."""
    head_dim = hidden // 12
    batch, q, k, v = _one_sequence(length, hidden, seed=8)
    assert len(batch.chunks) > 1
    serial = bert.attention(q, k, v, batch, heads=12)
    blocks: list[tuple[int, ...]] = []
    real = softmax.softmax_times_values

    def counting(scores: F32, values: F32, out: F32, mask: F32 | None = None) -> F32:
        blocks.append(scores.shape)
        return real(scores, values, out, mask)

    monkeypatch.setattr(bert, "softmax_times_values", counting)
    pool = CountingPool(threads)
    try:
        with use_pool(pool):
            got = bert.attention(q, k, v, batch, heads=12)
    finally:
        pool.close()
    assert len(blocks) <= most_blocks
    share = (1 << 20) // threads  # the cap, shared by the tasks running at once
    for group, rows, keys in blocks:
        assert keys == length
        assert 4 * group * (rows * (length + head_dim) + 2 * length * head_dim) <= share
    for g, w in zip(got, serial, strict=True):  # blocks of other shapes: float32 rounding differs a little
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("length", "most_running"), [(512, 3), (1024, 1)])
def test_attention_runs_no_more_tasks_at_once_than_their_gathered_k_and_v_leave_room_for(
    length: int, most_running: int
) -> None:
    """64-wide heads, 4 threads: one head's K and V gathered across chunks (2 L d floats) do not shrink with
    a task's share of the cap, so fewer tasks run at once; together they stay within the cap."""
    import tracemalloc

    batch, q, k, v = _one_sequence(length, 768, seed=9)
    serial = bert.attention(q, k, v, batch, heads=12)
    pool = CountingPool(4)
    tracemalloc.start()
    try:
        with use_pool(pool):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            got = bert.attention(q, k, v, batch, heads=12)
            peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
        pool.close()
    running = min(pool.threads, pool.largest_run)  # tasks running at once
    assert running <= most_running
    # ctx, the cap, and what the accounting leaves out: softmax rows and each running task's numpy call
    # temporaries and frames (beyond ctx + cap, 4 threads at 512 tokens: 38-39 KiB usually, up to ~100 KiB
    # over 30 runs, for 3 tasks; 1 thread: 66 KiB under).
    assert peak <= length * 768 * 4 + (1 << 20) + max(96 << 10, running * (64 << 10))
    for g, w in zip(got, serial, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("length", "shared"), [(25, False), (100, True), (256, True)], ids=["sentence", "paragraph", "long-text"]
)
def test_attention_shares_a_sequence_between_threads_only_when_worth_it(length: int, shared: bool) -> None:
    batch, q, k, v = _one_sequence(length, 384, seed=3)
    serial = bert.attention(q, k, v, batch, heads=12)
    pool = CountingPool(2)
    try:
        with use_pool(pool):
            split = bert.attention(q, k, v, batch, heads=12)
    finally:
        pool.close()
    assert pool.handoffs == int(shared)
    for got, want in zip(split, serial, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
