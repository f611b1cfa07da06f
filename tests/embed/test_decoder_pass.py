"""The decoder forward pass's parts (rotary positions, causal and sliding-window masks), its config checks
on hostile metadata, and the engine's decoder choices (pooling override, shorter texts in a small budget)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import decoder, decoder_shapes
from gguf_sandbox.embed.decoder import DecoderConfig, RopeStyle, rotate
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.embed.plan import TRANSIENT_CAPS, ModelSizes, choose_plan
from gguf_sandbox.embed.rows import DEFAULT_CAP, TokenBatch, rows_per_chunk
from gguf_sandbox.embed.weights import PlannedWeights, load_weights
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth_decoder import QWEN2_TINY, QWEN3_TINY
from tests.embed.conftest import traced_peak
from tests.models import cached_decoder

UNLIMITED = 1 << 40


@pytest.fixture(scope="module")
def qwen2() -> Iterator[GGUFFile]:
    with GGUFFile.open(cached_decoder(QWEN2_TINY)) as gguf:
        yield gguf


@pytest.fixture(scope="module")
def weights(qwen2: GGUFFile) -> Iterator[PlannedWeights]:
    layout = decoder_shapes.read_layout(qwen2)
    plan = choose_plan(layout.config, ModelSizes.of(qwen2, layout), UNLIMITED, requested="resident-f32")
    loaded = load_weights(qwen2, layout, plan)
    yield loaded
    loaded.close()


class Reconfigured:
    """Another config over the same weights (a test's view: causal off, a window, one layer)."""

    def __init__(self, weights: PlannedWeights, **changes: Any) -> None:
        self._weights = weights
        self.config: DecoderConfig = dataclasses.replace(weights.config, **changes)

    def vector(self, name: str) -> np.ndarray:
        return self._weights.vector(name)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._weights.rows(name, ids)

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        return self._weights.blocks(name)


def hidden_rows(weights: Any, sequences: list[list[int]]) -> list[np.ndarray]:
    """The last layer's output rows of each sequence (before the final norm and pooling)."""
    batch = TokenBatch.from_sequences(sequences, rows_per_chunk(weights.config))
    x = decoder.token_embeddings(weights, batch)
    for layer in range(weights.config.layers):
        x = decoder.feed_forward(decoder.self_attention(x, weights, layer, batch, 1 << 20), weights, layer)
    rows = []
    for pieces in batch.pieces:
        rows.append(np.concatenate([x[chunk][lo:hi] for chunk, lo, hi in pieces]))
    return rows


TOKENS = [5, 300, 17, 4000, 42, 77, 901, 12, 3, 600, 250, 8]


def test_causal_attention_leaves_earlier_rows_as_they_were(weights: PlannedWeights) -> None:
    prefix, full = hidden_rows(weights, [TOKENS[:6], TOKENS])
    np.testing.assert_allclose(full[:6], prefix, rtol=1e-5, atol=1e-5)


def test_bidirectional_attention_lets_later_tokens_change_earlier_rows(weights: PlannedWeights) -> None:
    """The check above can fail: without the causal mask the same rows differ."""
    prefix, full = hidden_rows(Reconfigured(weights, causal=False), [TOKENS[:6], TOKENS])
    assert np.abs(full[:6] - prefix).max() > 1e-3


def test_a_sliding_window_sees_only_the_last_window_of_tokens(weights: PlannedWeights) -> None:
    """One layer, window 3: row t depends on tokens t-2..t only, and rotary scores only on their distance,
    so it equals the last row of those three tokens alone."""
    window = Reconfigured(weights, layers=1, sliding_window=3, global_every=0)
    full = hidden_rows(window, [TOKENS])[0]
    for t in range(2, len(TOKENS)):
        alone = hidden_rows(window, [TOKENS[t - 2 : t + 1]])[0]
        np.testing.assert_allclose(full[t], alone[-1], rtol=1e-4, atol=1e-5)
    unwindowed = hidden_rows(Reconfigured(weights, layers=1), [TOKENS])[0]
    assert np.abs(unwindowed[-1] - full[-1]).max() > 1e-4


def _config(rope: RopeStyle) -> DecoderConfig:
    return DecoderConfig(
        architecture="test",
        vocab_size=8,
        hidden=16,
        layers=1,
        heads=2,
        kv_heads=1,
        head_dim=8,
        ffn=16,
        context_length=16,
        trained_context=16,
        rms_eps=1e-6,
        rope=rope,
        rope_dims=8,
        rope_base=10000.0,
        activation=decoder.Activation.SILU,
    )


@pytest.mark.parametrize("style", list(RopeStyle))
def test_rotary_positions_rotate_each_pair_by_position_times_frequency(style: RopeStyle) -> None:
    config = _config(style)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    positions = np.arange(5)
    cos, sin = decoder.rope_angles(positions, 8, 10000.0)
    rotated = x.copy()
    rotate(rotated, 2, config, cos, sin)
    heads = x.reshape(5, 2, 8).astype(np.float64)
    pairs = (
        [(i, i + 4) for i in range(4)] if style is RopeStyle.NEOX else [(2 * i, 2 * i + 1) for i in range(4)]
    )
    expected = heads.copy()
    for i, (a, b) in enumerate(pairs):
        theta = positions[:, None] * 10000.0 ** (-2 * i / 8)
        expected[..., a] = heads[..., a] * np.cos(theta) - heads[..., b] * np.sin(theta)
        expected[..., b] = heads[..., b] * np.cos(theta) + heads[..., a] * np.sin(theta)
    np.testing.assert_allclose(rotated.reshape(5, 2, 8), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rotated[0], x[0])  # position 0 is not rotated


# -- hostile metadata ------------------------------------------------------------------------------------
class Patched:
    """A real decoder file's reader with some metadata replaced (None removes a key)."""

    def __init__(self, real: GGUFFile, **metadata: Any) -> None:
        self._real = real
        self._metadata = metadata
        self.path = real.path
        self.tensors = real.tensors
        self.tensor = real.tensor

    @property
    def architecture(self) -> Any:
        return self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._metadata:
            value = self._metadata[key]
            return default if value is None else value
        return self._real.get(key, default)


HOSTILE = {
    "unknown architecture": ({"general.architecture": "mamba"}, "not a decoder the engine runs"),
    "heads not sharing kv heads": ({"qwen2.attention.head_count_kv": 3}, "evenly"),
    "zero heads": ({"qwen2.attention.head_count": 0}, "must be > 0"),
    "missing hidden size": ({"qwen2.embedding_length": None}, "qwen2.embedding_length is missing"),
    "a string for the layers": ({"qwen2.block_count": "2"}, "needs it as an integer"),
    "more layers than tensors": ({"qwen2.block_count": 2**31}, "inconsistent or hostile"),
    "fewer layers than tensors": ({"qwen2.block_count": 1}, "belongs to a layer past"),
    "hidden size contradicting the tensors": ({"qwen2.embedding_length": 96}, "expected"),
    "infinite rms epsilon": ({"qwen2.attention.layer_norm_rms_epsilon": float("inf")}, "finite positive"),
    "negative rope base": ({"qwen2.rope.freq_base": -1.0}, "finite positive"),
    "odd rope dimensions": ({"qwen2.rope.dimension_count": 7}, "must be even"),
    "rope dimensions past the head": ({"qwen2.rope.dimension_count": 64}, "at most the head size"),
    "yarn rope scaling": ({"qwen2.rope.scaling.type": "yarn"}, "rope scaling 'yarn' is not supported"),
    "value length differing": ({"qwen2.attention.value_length": 16}, "differ"),
    "causal as a number": ({"qwen2.attention.causal": 1}, "not a bool"),
    "pooling NONE": ({"qwen2.pooling_type": 0}, "one vector per token"),
    "unknown pooling": ({"qwen2.pooling_type": 9}, "not supported"),
    # Was read as 0 (no window): a hostile value passed for a valid one.
    "negative sliding window": ({"qwen2.attention.sliding_window": -5}, "never negative"),
    "zero kv heads": ({"qwen2.attention.head_count_kv": 0}, "kv_heads is 0"),
    "zero rope dimensions": ({"qwen2.rope.dimension_count": 0}, "rope_dims is 0"),
    "zero rope base": ({"qwen2.rope.freq_base": 0.0}, "finite positive"),
    "NaN rope base": ({"qwen2.rope.freq_base": float("nan")}, "finite positive"),
    "zero context": ({"qwen2.context_length": 0}, "context length must be positive"),
    "negative key length": ({"qwen2.attention.key_length": -32, "qwen2.attention.value_length": -32}, "> 0"),
    "huge key length": (
        {"qwen2.attention.key_length": 2**40, "qwen2.attention.value_length": 2**40},
        "expected",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata_is_one_clear_error(qwen2: GGUFFile, case: str) -> None:
    metadata, message = HOSTILE[case]
    with pytest.raises(GGUFError, match=message) as raised:
        decoder_shapes.read_config(Patched(qwen2, **metadata))  # type: ignore[arg-type]
    assert "\n" not in str(raised.value) and str(raised.value).startswith(qwen2.path.name)


def test_hostile_but_harmless_metadata_is_read_within_bounds(qwen2: GGUFFile) -> None:
    huge = decoder_shapes.read_config(Patched(qwen2, **{"qwen2.context_length": 2**63}))  # type: ignore[arg-type]
    assert huge.context_length == decoder.DEFAULT_SEQUENCE_LIMIT
    bidirectional = decoder_shapes.read_config(
        Patched(qwen2, **{"qwen2.attention.causal": False})  # type: ignore[arg-type]
    )
    assert (bidirectional.causal, bidirectional.pooling.name) == (False, "MEAN")


# -- hostile tensors -------------------------------------------------------------------------------------
def rewritten(source: Path, target: Path, tensors: dict[str, np.ndarray | None]) -> Path:
    """A copy of `source` with tensors replaced (as F32), added, or dropped (None); metadata as it was."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.constants import GGMLQuantizationType

    reader = GGUFReader(source)
    writer = GGUFWriter(target, arch=str(reader.fields["general.architecture"].contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name not in tensors:
            raw = GGMLQuantizationType(tensor.tensor_type)
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=raw)
    for name, array in tensors.items():
        if array is not None:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _nan_at(shape: tuple[int, ...]) -> np.ndarray:
    array = np.full(shape, 0.01, dtype=np.float32)
    array.flat[3] = np.nan
    return array


HOSTILE_TENSORS: dict[str, tuple[dict[str, np.ndarray | None], str]] = {
    "q norm of the wrong length": (
        {"blk.0.attn_q_norm.weight": np.ones(16)},
        "has shape \\(16,\\), expected",
    ),
    "a missing ffn_gate": ({"blk.1.ffn_gate.weight": None}, "no tensor 'blk.1.ffn_gate.weight'"),
    "a bias of the wrong size": ({"blk.0.attn_q.bias": np.zeros(7)}, "has shape \\(7,\\), expected"),
    # Was skipped (attention_bias is read from blk.0.attn_q.bias): a silently different model.
    "a bias the graph does not read": ({"blk.1.attn_k.bias": np.zeros(64)}, "not one the qwen3 graph reads"),
    "a table short of the vocabulary": ({"token_embd.weight": np.zeros((3000, 64))}, "only 3,000 rows"),
    "a NaN in a norm": ({"blk.0.attn_norm.weight": _nan_at((64,))}, "NaN or infinite"),
    "a NaN in a matrix": ({"blk.1.attn_q.weight": _nan_at((128, 64))}, "NaN or infinite"),
    "a NaN final norm": ({"output_norm.weight": _nan_at((64,))}, "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TENSORS))
def test_hostile_tensors_are_one_clear_error(tmp_path: Path, case: str) -> None:
    tensors, message = HOSTILE_TENSORS[case]
    path = rewritten(cached_decoder(QWEN3_TINY), tmp_path / "hostile.gguf", tensors)
    with pytest.raises(GGUFError, match=message) as raised, Embedder.open(path) as embedder:
        embedder.embed(["hello world"])
    assert "\n" not in str(raised.value)


def test_the_rewritten_copy_embeds_like_its_source(tmp_path: Path) -> None:
    """The check above can fail: an untouched copy gives the same vectors."""
    source = cached_decoder(QWEN3_TINY)
    with Embedder.open(source) as a, Embedder.open(rewritten(source, tmp_path / "copy.gguf", {})) as b:
        np.testing.assert_array_equal(a.embed(["hello world"]), b.embed(["hello world"]))


def test_huge_and_odd_texts_are_cut_to_the_limit_quickly_and_concurrently() -> None:
    with Embedder.open(cached_decoder(QWEN3_TINY)) as embedder:
        texts = ["word " * 200_000, "a" * (1 << 20), "<|endoftext|><s></s><unk>" * 50, " \t\n"]
        started = time.monotonic()
        vectors = embedder.embed(texts)
        assert time.monotonic() - started < 60 and np.isfinite(vectors).all()
        assert len(embedder.tokenize(texts[0])) == embedder.context_length
        results: list[np.ndarray] = []
        threads = [
            threading.Thread(target=lambda: results.append(embedder.embed(texts[2:]))) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 8 and all(np.array_equal(r, vectors[2:]) for r in results)


# -- the engine's decoder choices ------------------------------------------------------------------------
def test_pooling_defaults_to_last_for_causal_models_and_can_be_overridden() -> None:
    path = cached_decoder(QWEN3_TINY)
    with Embedder.open(path) as last, Embedder.open(path, pooling="mean") as mean:
        assert (last.pooling, mean.pooling) == ("last", "mean")
        texts = ["a short text", "another, longer text with more words in it"]
        assert not np.allclose(last.embed(texts), mean.embed(texts))
    with pytest.raises(GGUFError, match="unknown pooling 'max'; choose one of mean, cls, last"):
        Embedder.open(path, pooling="max")


def test_an_empty_text_without_bos_is_refused_by_name() -> None:
    with (
        Embedder.open(cached_decoder(QWEN2_TINY)) as embedder,
        pytest.raises(GGUFError, match="no tokens cannot be embedded"),
    ):
        embedder.embed(["fine", ""])


def config_limit(gguf: GGUFFile) -> int:
    return decoder_shapes.read_config(gguf).context_length


def test_a_small_budget_runs_shorter_texts_degraded_rather_than_refusing(qwen2: GGUFFile) -> None:
    path = Path(qwen2.path)
    with Embedder.open(path, plan="streaming", budget=MemoryBudget(UNLIMITED)) as roomy:
        full = roomy.context_length
        assert full == config_limit(qwen2)
    config = decoder_shapes.read_config(qwen2)
    # Three caps of transients, the norms, and rows for a few hundred tokens: not a full-length pass.
    room = (3 << 20) + (256 << 10) + config.row_bytes * 200
    with Embedder.open(path, plan="streaming", budget=MemoryBudget(room)) as tight:
        assert tight.context_length < full
        assert tight.degraded and tight.plan_details["sequence_limit"] == tight.context_length
        long_text = " ".join(["word"] * 2000)
        assert len(tight.tokenize(long_text)) == tight.context_length
        assert np.isfinite(tight.embed([long_text])).all()
    with pytest.raises(BudgetExceeded):
        Embedder.open(path, plan="streaming", budget=MemoryBudget(1 << 20))


def test_streaming_counts_the_weight_bytes_it_reads_and_resident_plans_read_none(qwen2: GGUFFile) -> None:
    path = Path(qwen2.path)
    layout = decoder_shapes.read_layout(qwen2)
    matrices = ModelSizes.of(qwen2, layout).matrices_raw
    with Embedder.open(path, plan="streaming", batch_size=1) as streaming:
        streaming.embed(["one pass", "and a second"])
        assert streaming.streamed_bytes == 2 * matrices
    with Embedder.open(path, plan="resident-quant") as resident:
        resident.embed(["no file reads"])
        assert resident.streamed_bytes == 0


def test_a_window_key_in_an_architecture_without_sliding_layers_is_ignored_as_llama_cpp_does(
    qwen2: GGUFFile,
) -> None:
    config = decoder_shapes.read_config(Patched(qwen2, **{"qwen2.attention.sliding_window": 4}))  # type: ignore[arg-type]
    assert config.sliding_window == 0 and not any(config.slides(layer) for layer in range(config.layers))


@pytest.mark.parametrize(
    ("hidden", "heads", "kv_heads", "head_dim", "window"),
    [(640, 4, 1, 256, 512), (2560, 8, 4, 256, 0), (896, 14, 2, 64, 0)],
    ids=["gemma3-270m-like-window", "4b-like", "qwen2-0.5b-like"],
)
def test_attention_of_1024_tokens_stays_within_the_transients_a_pass_reserves(
    hidden: int, heads: int, kv_heads: int, head_dim: int, window: int
) -> None:
    """Gathered K and V, a block of scores with its mask and its scaled queries: within TRANSIENT_CAPS caps
    beyond the context itself (a previous KV head's K and V held while the next was gathered: 3.58)."""
    config = DecoderConfig(
        architecture="test",
        vocab_size=8,
        hidden=hidden,
        layers=1,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=4 * hidden,
        context_length=4096,
        trained_context=4096,
        rms_eps=1e-6,
        rope=RopeStyle.NEOX,
        rope_dims=head_dim,
        rope_base=1e4,
        activation=decoder.Activation.SILU,
        sliding_window=window,
    )
    rng = np.random.default_rng(0)
    batch = TokenBatch.from_sequences([list(range(1024))], rows_per_chunk(config))
    assert len(batch.chunks) > 1  # K and V are gathered from several chunks

    def rows(width: int) -> list[NDArray[np.float32]]:
        return [rng.standard_normal((hi - lo, width)).astype(np.float32) for lo, hi in batch.chunks]

    q, k, v = rows(heads * head_dim), rows(kv_heads * head_dim), rows(kv_heads * head_dim)
    context_bytes = sum(chunk.nbytes for chunk in q)
    peak = traced_peak(
        lambda: decoder.grouped_attention(q, k, v, batch, config=config, layer=0, cap=DEFAULT_CAP)
    )
    assert peak - context_bytes <= TRANSIENT_CAPS * DEFAULT_CAP + (64 << 10)
