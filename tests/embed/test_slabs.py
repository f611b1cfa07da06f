"""The decoder's feed-forward slab by slab (streaming plans): the same vectors as the whole-width MLP, one
read of every weight per pass, temporaries within the cap and a pass within its reservation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import decoder, decoder_shapes, file_reads
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.embed.file_reads import (
    PAGE,
    column_piece_rows,
    column_read_cache,
    read_blocks,
    read_columns,
)
from gguf_sandbox.embed.plan import PLAN_ORDER, ModelSizes, Plan, PlanName, choose_plan, pass_bytes
from gguf_sandbox.embed.rows import DEFAULT_CAP, TokenBatch, aligned, rows_per_chunk
from gguf_sandbox.embed.weights import PlannedWeights, load_weights
from gguf_sandbox.errors import BudgetExceeded
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo
from gguf_sandbox.gguf.synth_decoder import NOMIC_CODE_CLASS, QWEN2_TINY, QWEN3_TINY, SyntheticDecoder
from tests.embed.conftest import traced_peak
from tests.models import cached_decoder

UNLIMITED = 1 << 40
# A qwen2 whose whole-width FFN rows outweigh attention's, in Q4_K and Q6_K like the 7B class (ffn_down
# columns are read in 256-wide blocks), small enough to build and run in seconds.
QWEN2_WIDE_FFN = dataclasses.replace(
    QWEN2_TINY,
    vocab_size=2048,
    hidden=256,
    heads=4,
    kv_heads=2,
    head_dim=64,
    ffn=2816,
    layers=2,
    tensor_type=GGMLQuantizationType.Q4_K,
    sensitive_type=GGMLQuantizationType.Q6_K,
    embedding_type=None,
    name="qwen2-wide-ffn",
)
SPECS = {"qwen2": QWEN2_TINY, "qwen3": QWEN3_TINY, "qwen2-wide-ffn": QWEN2_WIDE_FFN}
SEQUENCES = [[5, 300, 17, 400, 42, 77, 901, 12, 3, 600, 250, 8] * 3, [9, 8, 7], list(range(20, 61))]


def open_weights(gguf: GGUFFile, plan: PlanName, ffn_slab: int, cap: int = DEFAULT_CAP) -> PlannedWeights:
    layout = decoder_shapes.read_layout(gguf)
    layout = dataclasses.replace(layout, config=dataclasses.replace(layout.config, ffn_slab=ffn_slab))
    chosen = choose_plan(layout.config, ModelSizes.of(gguf, layout), UNLIMITED, requested=plan, cap=cap)
    return load_weights(gguf, layout, dataclasses.replace(chosen, uncached=True))


def encode(weights: PlannedWeights, cap: int = DEFAULT_CAP) -> np.ndarray:
    batch = TokenBatch.from_sequences(SEQUENCES, rows_per_chunk(weights.config, cap))
    return decoder.encode(weights, batch, cap, unit_length=False)


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def model(request: pytest.FixtureRequest) -> Iterator[GGUFFile]:
    spec: SyntheticDecoder = SPECS[request.param]
    with GGUFFile.open(cached_decoder(spec)) as gguf:
        yield gguf


def down_block(gguf: GGUFFile) -> int:
    """Columns per stored block of ffn_down, the widest over the layers (their types differ)."""
    layers = decoder_shapes.read_config(gguf).layers
    return max(GGML_QUANT_SIZES[gguf.tensor(f"blk.{n}.ffn_down.weight").type][0] for n in range(layers))


def slab_widths(gguf: GGUFFile) -> list[int]:
    """The width slabbed() picks, a narrow one of several slabs with a short last one, and the whole width."""
    config = decoder_shapes.read_config(gguf)
    return sorted({decoder.slab_width(config), down_block(gguf), config.ffn})


@pytest.mark.parametrize("plan", PLAN_ORDER, ids=lambda p: p.value)
def test_the_slabbed_mlp_gives_the_whole_width_vectors(model: GGUFFile, plan: PlanName) -> None:
    whole = open_weights(model, plan, 0)
    expected = encode(whole)
    whole.close()
    for width in slab_widths(model):
        slabbed = open_weights(model, plan, width)
        got = encode(slabbed)
        slabbed.close()
        # Only the order of the down projection's sums differs: float32 rounding, nothing more.
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6 * np.abs(expected).max())
        cosines = (
            (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        )
        assert cosines.min() > 1 - 1e-6, f"ffn_slab {width}: cosine {cosines.min()}"


def test_column_reads_are_the_columns_of_the_decoded_rows(model: GGUFFile) -> None:
    config = decoder_shapes.read_config(model)
    info = model.tensor("blk.0.ffn_down.weight")
    rows = np.concatenate([block for _, block in model.iter_rows(info.name)])  # [hidden, ffn]
    fd = os.open(model.path, os.O_RDONLY)
    try:
        step = down_block(model)
        for lo in range(0, config.ffn, step):
            hi = min(lo + step, config.ffn)
            pieces = list(read_columns(fd, info, lo, hi, 5))
            assert [first for first, _ in pieces] == list(range(0, info.n_rows, 5))
            got = np.concatenate([dequantize(raw, info.type).reshape(-1, hi - lo) for _, raw in pieces])
            np.testing.assert_array_equal(got, rows[:, lo:hi])
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="inside a"):
        next(read_columns(-1, info, down_block(model) // 2, config.ffn, 5))


class KernelPageCache:
    """The page cache of one file as the kernel keeps it for read_columns: a pread caches every page it
    touches, WILLNEED every page of its range, DONTNEED drops the whole pages inside its range."""

    def __init__(self) -> None:
        self.pages: set[int] = set()
        self.most = 0
        self.reads = 0

    def pread(self, fd: int, length: int, offset: int, what: str) -> bytes:
        fresh = set(range(offset // PAGE, (offset + length - 1) // PAGE + 1)) - self.pages
        self.reads += len(fresh)
        self._cache(fresh)
        return bytes(length)

    def advise(self, fd: int, advice: str, offset: int = 0, length: int = 0) -> None:
        if advice == "POSIX_FADV_WILLNEED":
            fresh = set(range(offset // PAGE, (offset + length - 1) // PAGE + 1)) - self.pages
            self.reads += len(fresh)
            self._cache(fresh)
        elif advice == "POSIX_FADV_DONTNEED":
            self.pages -= set(range(-(-offset // PAGE), (offset + length) // PAGE))

    def _cache(self, pages: set[int]) -> None:
        self.pages |= pages
        self.most = max(self.most, len(self.pages))


@pytest.mark.parametrize(
    ("kind", "ne", "slab"),
    [
        (GGMLQuantizationType.Q6_K, (18944, 3584), 512),  # the 7B class's ffn_down, its streaming slab
        (GGMLQuantizationType.Q4_K, (2816, 256), 512),
        (GGMLQuantizationType.F32, (1536, 96), 1024),  # slab rows wider than a page
        (GGMLQuantizationType.Q8_0, (4096, 7), 256),  # fewer rows than a piece
        (GGMLQuantizationType.Q4_1, (1536, 576), 256),  # SmolLM2's: rows shorter than a page
        (GGMLQuantizationType.Q6_K, (2048, 640), 512),  # gemma3-270m's
    ],
)
def test_column_slabs_hold_at_most_the_page_cache_the_plan_reserves(
    kind: GGMLQuantizationType, ne: tuple[int, int], slab: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass over every slab of a tensor, through a model of the kernel's page cache: the pages held at
    any moment stay within column_read_cache, every page is read from disk once, and none stay after."""
    block_elements, block_bytes = GGML_QUANT_SIZES[kind]
    nbytes = ne[0] // block_elements * block_bytes * ne[1]
    info = TensorInfo("blk.0.ffn_down.weight", kind, ne, offset=12_345, nbytes=nbytes)
    cache = KernelPageCache()
    monkeypatch.setattr(file_reads, "pread", cache.pread)
    monkeypatch.setattr(file_reads, "advise", cache.advise)
    for lo in range(0, info.row_len, slab):
        hi = min(lo + slab, info.row_len)
        for _ in read_columns(-1, info, lo, hi, column_piece_rows(hi - lo)):
            pass
    held = column_read_cache(info.n_rows, info.row_len, slab, block_bytes / block_elements)
    assert 0 < cache.most * PAGE <= held <= cache.most * PAGE * 9 // 8  # reserved, and not much more
    first, last = info.offset // PAGE, (info.offset + info.nbytes - 1) // PAGE
    assert cache.reads == last - first + 1
    assert cache.pages == set()


def test_row_blocks_read_each_page_once_and_leave_none_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks whose boundaries fall inside pages: each page is read once, and once the tensor has been
    read none of its pages (nor the partial ones at its ends) stay in page cache."""
    info = TensorInfo(
        "blk.0.ffn_up.weight", GGMLQuantizationType.Q4_K, (3584, 700), 1_000_001, 3584 // 256 * 144 * 700
    )
    cache = KernelPageCache()
    monkeypatch.setattr(file_reads, "pread", cache.pread)
    monkeypatch.setattr(file_reads, "advise", cache.advise)
    blocks = list(read_blocks(-1, info, 1 << 18))
    assert len(blocks) > 3 and info.row_nbytes * blocks[1][0] % PAGE  # boundaries inside pages
    first, last = info.offset // PAGE, (info.offset + info.nbytes - 1) // PAGE
    assert cache.reads == last - first + 1
    assert cache.pages == set()
    assert cache.most * PAGE <= (1 << 18) + 2 * PAGE


def test_a_streamed_pass_reads_every_weight_byte_once(
    model: GGUFFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted at os.pread: a pass over several chunks reads each matrix once, slabbed or whole."""
    layout = decoder_shapes.read_layout(model)
    sizes = ModelSizes.of(model, layout)
    table = model.tensor("token_embd.weight")
    real_pread = os.pread
    read: list[int] = []

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        read.append(len(data))
        return data

    for width in [0, *slab_widths(model)]:
        # A small cap: many chunks, many weight blocks and column pieces.
        weights = open_weights(model, PlanName.STREAMING, width, cap=16 << 10)
        batch = TokenBatch.from_sequences(SEQUENCES, rows_per_chunk(weights.config, 16 << 10))
        assert len(batch.chunks) > 1
        # Token rows are read per chunk, each distinct id once.
        token_rows = sum(np.unique(batch.ids[lo:hi]).size for lo, hi in batch.chunks) * table.row_nbytes
        read.clear()
        with monkeypatch.context() as patched:
            patched.setattr(os, "pread", counting_pread)
            encode(weights, 16 << 10)
        assert weights.streamed.total == sizes.matrices_raw
        assert sum(read) == sizes.matrices_raw + token_rows
        weights.close()


def test_a_7b_class_row_shrinks_to_what_attention_holds() -> None:
    """nomic-embed-code's geometry: 180 KB per token row with the whole ffn of 18,944, 47 KB in slabs."""
    spec = NOMIC_CODE_CLASS
    config = decoder.DecoderConfig(
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        hidden=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        ffn=spec.ffn,
        context_length=1024,
        trained_context=spec.context_length,
        rms_eps=spec.rms_eps,
        rope=decoder.RopeStyle.NEOX,
        rope_dims=spec.head_dim,
        rope_base=spec.rope_freq_base,
        activation=decoder.Activation.SILU,
    )
    slabbed = decoder.slabbed(config)
    assert (config.row_bytes, slabbed.row_bytes, slabbed.ffn_slab) == (180_224, 47_104, 512)
    assert slabbed.row_bytes == 4 * config.attention_row  # the slabs fit in the row attention holds anyway
    assert rows_per_chunk(slabbed) > 5 * rows_per_chunk(config)


@pytest.fixture(scope="module")
def wide() -> Path:
    return cached_decoder(QWEN2_WIDE_FFN)


def test_slabs_shrink_a_streaming_row_and_a_batch_runs_in_one_pass(wide: Path) -> None:
    with GGUFFile.open(wide) as gguf:
        layout = decoder_shapes.read_layout(gguf)
        sizes = ModelSizes.of(gguf, layout)
    config = layout.config
    slabbed = decoder.slabbed(config)
    assert slabbed.ffn_slab and slabbed.row_bytes < config.row_bytes
    assert decoder.slabbed(slabbed) == slabbed
    texts = [" ".join(["word"] * 60)] * 8
    # Room for one 8-text pass of slabbed rows and the page cache its column reads hold, about two thirds
    # of one pass of whole rows.
    tokens = 8 * 64
    held = column_read_cache(*slabbed.column_slabs, sizes.densest)  # the plan reserves the pages slabs share
    room = sizes.vectors + held + pass_bytes(slabbed, tokens) * 4 // 3 + (2 << 20)
    assert room < sizes.vectors + pass_bytes(config, tokens)
    with Embedder.open(wide, plan="streaming", budget=MemoryBudget(room), batch_size=8) as embedder:
        assert embedder.config.ffn_slab == slabbed.ffn_slab
        embedder.embed(texts)
        assert embedder.streamed_bytes == sizes.matrices_raw  # one pass
    with Embedder.open(wide, plan="resident-quant", budget=MemoryBudget(UNLIMITED)) as resident:
        assert resident.config.ffn_slab == 0  # resident plans multiply the whole width at once


def test_an_uncached_streaming_plan_reserves_its_column_slabs_page_cache(wide: Path) -> None:
    """Weights too large to stay cached are read uncached, yet column slabs hold pages meanwhile: the plan
    holds them as cached_bytes, so its passes grow only into the room left beside them."""
    with GGUFFile.open(wide) as gguf:
        layout = decoder_shapes.read_layout(gguf)
        sizes = ModelSizes.of(gguf, layout)
    config = layout.config
    slabbed = decoder.slabbed(config)
    held = column_read_cache(*slabbed.column_slabs, sizes.densest)
    assert 0 < held < sizes.matrices_raw // 2
    min_tokens = aligned(config.context_length)
    smallest = sizes.vectors + pass_bytes(slabbed, min_tokens)  # a full-context pass, nothing cached

    def streaming(available: int) -> Plan:
        return choose_plan(config, sizes, available, requested="streaming", streaming=slabbed)

    # Room for the pass and the slabs' pages, not for the weights in page cache too.
    plan = streaming(smallest + held + sizes.matrices_raw // 2)
    assert plan.uncached and plan.cached_bytes == held
    grown = (sizes.matrices_raw // 2 + slabbed.row_bytes * min_tokens) * 3 // 4
    assert plan.max_tokens == max(min_tokens, grown // slabbed.row_bytes)
    assert streaming(smallest + held).max_tokens == min_tokens
    with pytest.raises(BudgetExceeded):  # one row short once the slabs' pages are held
        streaming(smallest + held - slabbed.row_bytes)
    assert config.column_slabs == (0, 0, 0)  # whole-width rows read no columns, so hold no such pages
    assert choose_plan(config, sizes, UNLIMITED, requested="streaming").cached_bytes == sizes.matrices_raw


def test_no_allocation_over_the_cap_and_the_pass_within_its_reservation(wide: Path, tmp_path: Path) -> None:
    memray = pytest.importorskip("memray")
    texts = [" ".join(["word"] * 200), *(" ".join(["ab", "cd"] * n) for n in range(5, 40, 5))]
    with Embedder.open(wide, plan="streaming", budget=MemoryBudget(UNLIMITED)) as opened:
        assert opened.config.ffn_slab
        opened.embed(texts)
        capture = tmp_path / "slabs.bin"
        with memray.Tracker(capture, native_traces=False):
            opened.embed(texts)
        sizes = [r.size for r in memray.FileReader(capture).get_allocation_records() if r.size]
        assert len(sizes) > 1000, "memray saw too few allocations to mean anything"
        assert max(sizes) <= DEFAULT_CAP, f"an allocation of {max(sizes):,} bytes"
        tokens = sum(aligned(len(opened.tokenize(t))) for t in texts)
        peak = traced_peak(lambda: opened.embed(texts))
        reserved = pass_bytes(opened.config, tokens)
        assert peak <= reserved, f"traced peak {peak:,} over the reserved {reserved:,}"
