"""Weight plans: every plan gives the same vectors, the chooser follows the budget, refusals are clean."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType

from gguf_sandbox.embed import bert
from gguf_sandbox.embed.bert import BertConfig
from gguf_sandbox.embed.plan import (
    PLAN_ORDER,
    Q8_KEPT_BYTES,
    ModelSizes,
    PlanName,
    TableMode,
    choose_plan,
    parse_plan,
    pass_bytes,
    preferred_plan,
)
from gguf_sandbox.embed.rows import DECODE_BYTES, FLOAT_BYTES, TokenBatch, rows_per_chunk
from gguf_sandbox.embed.shapes import read_config, read_layout
from gguf_sandbox.embed.weights import load_weights, piece_bounds
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo
from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert
from tests.embed.test_bert import naive_bert

TYPES = [
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
]
# Small enough that every matrix spans several blocks and long sequences span several chunks.
SMALL_CAP = 16 << 10
UNLIMITED = 1 << 40


def spec_for(qtype: GGMLQuantizationType) -> SyntheticBert:
    return SyntheticBert(
        vocab_size=300, hidden=64, layers=2, heads=4, ffn=128, context=96, tensor_type=qtype, seed=7
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[GGMLQuantizationType, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {q: write_synthetic_bert(folder / f"bert-{q.name}.gguf", spec_for(q)) for q in TYPES}


@pytest.fixture
def q8(models: dict[GGMLQuantizationType, Path]) -> Iterator[GGUFFile]:
    with GGUFFile.open(models[GGMLQuantizationType.Q8_0]) as gguf:
        yield gguf


def token_sequences(config: BertConfig) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, config.vocab_size, size=n).tolist() for n in (1, 4, 96, 9, 50, 2)]


def embed_with(
    gguf: GGUFFile, plan_name: PlanName, tables: TableMode | None = None, *, uncached: bool = False
) -> np.ndarray:
    config = read_config(gguf)
    sizes = ModelSizes.of(gguf, read_layout(gguf))
    plan = choose_plan(config, sizes, UNLIMITED, requested=plan_name, cap=SMALL_CAP)
    plan = dataclasses.replace(plan, tables=tables or plan.tables, uncached=uncached)
    weights = load_weights(gguf, read_layout(gguf), plan)
    try:
        batch = TokenBatch.from_sequences(token_sequences(config), rows_per_chunk(config, SMALL_CAP))
        return bert.encode(weights, batch, SMALL_CAP)
    finally:
        weights.close()


# -- config ------------------------------------------------------------------------------------------------
def test_read_config_takes_the_shape_from_metadata(q8: GGUFFile) -> None:
    config = read_config(q8)
    assert (config.vocab_size, config.hidden, config.layers, config.heads) == (300, 64, 2, 4)
    assert (config.ffn, config.context_length, config.pooling) == (128, 96, bert.Pooling.MEAN)
    assert config.layer_norm_eps == pytest.approx(1e-12)
    assert config.has_token_types


def test_read_config_refuses_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile.open(path) as gguf, pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        read_config(gguf)


def test_read_config_refuses_tensors_that_contradict_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    spec = spec_for(GGMLQuantizationType.F32)
    writer = GGUFWriter(path, "bert")
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_block_count(1)
    writer.add_head_count(spec.heads)
    writer.add_tensor("token_embd.weight", np.zeros((10, spec.hidden), dtype=np.float32))
    writer.add_tensor("position_embd.weight", np.zeros((spec.context, spec.hidden + 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile.open(path) as gguf, pytest.raises(GGUFError, match=r"position_embd.weight has shape"):
        read_config(gguf)


# -- every plan, the same vectors ----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_every_plan_gives_the_same_vectors(
    models: dict[GGMLQuantizationType, Path], qtype: GGMLQuantizationType
) -> None:
    with GGUFFile.open(models[qtype]) as gguf:
        results: dict[str, np.ndarray] = {name.value: embed_with(gguf, name) for name in PLAN_ORDER}
        results["file-tables"] = embed_with(gguf, PlanName.RESIDENT_F32, TableMode.FILE)
        results["raw-tables"] = embed_with(gguf, PlanName.RESIDENT_QUANT, TableMode.RAW)
        results["uncached"] = embed_with(gguf, PlanName.STREAMING, uncached=True)
    reference = results[PlanName.RESIDENT_F32.value]
    for name, vectors in results.items():
        assert np.abs(vectors - reference).max() <= 1e-6, name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_plans_match_a_naive_float64_forward_pass_of_the_decoded_file(
    models: dict[GGMLQuantizationType, Path], qtype: GGMLQuantizationType
) -> None:
    with GGUFFile.open(models[qtype]) as gguf:
        config = read_config(gguf)
        tensors = {n: gguf.read_tensor(n, max_bytes=UNLIMITED).astype(np.float64) for n in gguf.tensors}
        streamed = embed_with(gguf, PlanName.STREAMING)
    expected = np.stack([naive_bert(config, tensors, s) for s in token_sequences(config)])
    assert np.abs(streamed - expected).max() <= 2e-6


@pytest.mark.parametrize("mode", list(TableMode), ids=lambda m: m.value)
def test_table_rows_equal_the_readers_rows(q8: GGUFFile, mode: TableMode) -> None:
    config = read_config(q8)
    name = {
        TableMode.F32: PlanName.RESIDENT_F32,
        TableMode.RAW: PlanName.RESIDENT_QUANT,
        TableMode.FILE: PlanName.STREAMING,
    }[mode]
    plan = choose_plan(config, ModelSizes.of(q8, read_layout(q8)), UNLIMITED, requested=name, cap=SMALL_CAP)
    plan = dataclasses.replace(plan, tables=mode)
    weights = load_weights(q8, read_layout(q8), plan)
    ids = np.array([299, 0, 5, 5, 128, 64, 63, 299], dtype=np.intp)
    try:
        got = weights.rows("token_embd.weight", ids)
        with pytest.raises(GGUFError, match="out of range"):
            weights.rows("token_embd.weight", np.array([300], dtype=np.intp))
    finally:
        weights.close()
    np.testing.assert_array_equal(got, q8.read_rows("token_embd.weight", ids.tolist()))


def test_resident_quant_keeps_q8_0_as_quants_and_float32_scales(q8: GGUFFile) -> None:
    sizes = ModelSizes.of(q8, read_layout(q8))
    blocks = sizes.matrices_f32 // 4 // 32
    assert sizes.matrices_raw == blocks * 34
    assert sizes.matrices_kept == blocks * Q8_KEPT_BYTES
    quant = sizes.resident(PlanName.RESIDENT_QUANT, TableMode.FILE)
    assert quant == sizes.resident(PlanName.STREAMING, TableMode.FILE) + sizes.matrices_kept


@pytest.mark.parametrize(
    ("plan_name", "held"),
    [(PlanName.RESIDENT_F32, True), (PlanName.RESIDENT_QUANT, True), (PlanName.STREAMING, False)],
    ids=lambda p: p.value if isinstance(p, PlanName) else str(p),
)
def test_only_resident_plans_say_their_matrices_are_held(
    q8: GGUFFile, plan_name: PlanName, held: bool
) -> None:
    """held() lets a pass line up several matrices' tasks at once: true only where that reads nothing."""
    layout = read_layout(q8)
    plan = choose_plan(read_config(q8), ModelSizes.of(q8, layout), UNLIMITED, requested=plan_name)
    weights = load_weights(q8, layout, plan)
    try:
        assert {weights.held(name) for name in layout.matrices} == {held}
    finally:
        weights.close()


# -- choosing ------------------------------------------------------------------------------------------------
def test_chooser_prefers_f32_then_quant_then_streaming_as_memory_shrinks(q8: GGUFFile) -> None:
    config = read_config(q8)
    sizes = ModelSizes.of(q8, read_layout(q8))
    work = pass_bytes(config, config.context_length)
    f32_all = sizes.resident(PlanName.RESIDENT_F32, TableMode.F32)
    quant_file = sizes.resident(PlanName.RESIDENT_QUANT, TableMode.FILE)
    streaming = sizes.resident(PlanName.STREAMING, TableMode.FILE)
    assert streaming < quant_file < f32_all

    def chosen(available: int) -> tuple[PlanName, TableMode]:
        plan = choose_plan(config, sizes, available)
        assert plan.resident_bytes + pass_bytes(config, plan.max_tokens) <= available
        assert plan.max_tokens >= config.context_length
        return plan.name, plan.tables

    assert chosen(UNLIMITED) == (PlanName.RESIDENT_F32, TableMode.F32)
    # Tables stay in memory only when passes can still grow to their full size.
    assert chosen(f32_all + work) == (PlanName.RESIDENT_F32, TableMode.FILE)
    assert chosen(f32_all + 2 * pass_bytes(config, 4096)) == (PlanName.RESIDENT_F32, TableMode.F32)
    assert chosen(quant_file + work)[0] == PlanName.RESIDENT_QUANT
    assert chosen(streaming + work) == (PlanName.STREAMING, TableMode.FILE)
    # Streaming with no room for the file beside a pass: its pages are dropped as they are read.
    assert choose_plan(config, sizes, streaming + work).uncached
    roomy = choose_plan(config, sizes, streaming + work + sizes.matrices_raw, requested=PlanName.STREAMING)
    assert not roomy.uncached
    assert roomy.resident_bytes + pass_bytes(config, roomy.max_tokens) + sizes.matrices_raw <= (
        streaming + work + sizes.matrices_raw
    )
    with pytest.raises(BudgetExceeded, match="streaming") as refused:
        choose_plan(config, sizes, streaming + work - 1)
    assert refused.value.needed == streaming + work


def test_chooser_skips_resident_quant_for_a_float32_file(models: dict[GGMLQuantizationType, Path]) -> None:
    with GGUFFile.open(models[GGMLQuantizationType.F32]) as gguf:
        config = read_config(gguf)
        sizes = ModelSizes.of(gguf, read_layout(gguf))
    work = pass_bytes(config, config.context_length)
    just_short = sizes.resident(PlanName.RESIDENT_F32, TableMode.FILE) + work - 1
    assert choose_plan(config, sizes, just_short).name is PlanName.STREAMING


def test_a_requested_plan_that_does_not_fit_is_refused_with_a_hint(q8: GGUFFile) -> None:
    config = read_config(q8)
    sizes = ModelSizes.of(q8, read_layout(q8))
    available = sizes.resident(PlanName.RESIDENT_QUANT, TableMode.FILE) + pass_bytes(config, 512)
    with pytest.raises(BudgetExceeded, match=r"resident-f32.*--plan streaming"):
        choose_plan(config, sizes, available // 4, requested="resident-f32")


def test_pass_tokens_grow_with_the_budget_but_never_below_the_context(q8: GGUFFile) -> None:
    config = read_config(q8)
    sizes = ModelSizes.of(q8, read_layout(q8))
    small = choose_plan(config, sizes, 64 << 20, requested=PlanName.STREAMING, pass_tokens=10)
    large = choose_plan(config, sizes, 1 << 30, requested=PlanName.STREAMING, pass_tokens=100_000)
    assert small.max_tokens == config.context_length
    assert large.max_tokens > 10 * config.context_length


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("auto", None, id="auto"),
        pytest.param(None, None, id="none"),
        pytest.param("streaming", PlanName.STREAMING, id="streaming"),
        pytest.param("resident-quant", PlanName.RESIDENT_QUANT, id="resident-quant"),
        pytest.param("resident-int8", PlanName.RESIDENT_INT8, id="resident-int8"),
    ],
)
def test_parse_plan(text: str | None, expected: PlanName | None) -> None:
    assert parse_plan(text) is expected


def test_parse_plan_names_the_choices() -> None:
    with pytest.raises(GGUFError, match="auto, resident-int8, resident-f32, resident-quant, streaming"):
        parse_plan("mmap")


# -- the preferred plan, the page-cache margin and drop_cache ----------------------------------------------
def test_preferred_plan_is_what_this_models_auto_choice_would_be_with_all_of_ram(
    models: dict[GGMLQuantizationType, Path],
) -> None:
    with GGUFFile.open(models[GGMLQuantizationType.Q8_0]) as gguf:
        config = read_config(gguf)
        q8_sizes = ModelSizes.of(gguf, read_layout(gguf))
    with GGUFFile.open(models[GGMLQuantizationType.F32]) as gguf:
        f32_sizes = ModelSizes.of(gguf, read_layout(gguf))
    work = pass_bytes(config, config.context_length)
    f32_all = q8_sizes.resident(PlanName.RESIDENT_F32, TableMode.F32)
    quant = q8_sizes.resident(PlanName.RESIDENT_QUANT, TableMode.FILE)
    assert preferred_plan(config, q8_sizes) is PlanName.RESIDENT_F32  # this machine's RAM
    assert preferred_plan(config, q8_sizes, f32_all + 2 * pass_bytes(config, 4096)) is PlanName.RESIDENT_F32
    # A host whose RAM cannot hold the float32 weights prefers them quantized; float32 files stream.
    assert preferred_plan(config, q8_sizes, quant + work) is PlanName.RESIDENT_QUANT
    assert preferred_plan(config, f32_sizes, quant + work) is PlanName.STREAMING
    assert preferred_plan(config, q8_sizes, 1 << 10) is PlanName.STREAMING


def test_cached_streaming_holds_its_page_cache_and_drop_cache_reads_uncached(q8: GGUFFile) -> None:
    config = read_config(q8)
    sizes = ModelSizes.of(q8, read_layout(q8))
    roomy = 1 << 30
    cached = choose_plan(config, sizes, roomy, requested=PlanName.STREAMING)
    assert (cached.uncached, cached.cached_bytes) == (False, sizes.matrices_raw)
    dropped = choose_plan(config, sizes, roomy, requested=PlanName.STREAMING, drop_cache=True)
    assert (dropped.uncached, dropped.cached_bytes) == (True, 0)
    # What the dropped pages leave is room for passes.
    assert dropped.max_tokens >= cached.max_tokens
    assert choose_plan(config, sizes, roomy, drop_cache=True).uncached
    assert not choose_plan(config, sizes, roomy).uncached


@pytest.mark.parametrize("plan_name", PLAN_ORDER, ids=lambda p: p.value)
def test_a_failing_read_is_a_gguf_error(
    q8: GGUFFile, plan_name: PlanName, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pread(fd: int, length: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    config = read_config(q8)
    sizes = ModelSizes.of(q8, read_layout(q8))
    plan = choose_plan(config, sizes, UNLIMITED, requested=plan_name, cap=SMALL_CAP)
    plan = dataclasses.replace(plan, tables=TableMode.FILE)
    if plan_name is PlanName.STREAMING:
        weights = load_weights(q8, read_layout(q8), plan)
        monkeypatch.setattr(os, "pread", failing_pread)
        batch = TokenBatch.from_sequences(token_sequences(config), rows_per_chunk(config, SMALL_CAP))
        with pytest.raises(
            GGUFError, match=r"reading [\d,]+ bytes at offset [\d,]+ failed: Input/output error"
        ):
            bert.encode(weights, batch, SMALL_CAP)
        weights.close()
        return
    monkeypatch.setattr(os, "pread", failing_pread)
    with pytest.raises(GGUFError, match="failed: Input/output error"):
        load_weights(q8, read_layout(q8), plan)


@pytest.mark.parametrize(
    ("rows", "row_len"),
    [(0, 384), (1, 384), (1, 262_144), (3, 262_144), (5, 65_536), (384, 384), (1536, 384), (384, 1536)],
)
def test_piece_bounds_cover_the_rows_in_non_empty_pieces_near_decode_bytes(rows: int, row_len: int) -> None:
    info = TensorInfo("w", GGMLQuantizationType.Q8_0, (row_len, max(rows, 1)), 0, row_len // 32 * 34)
    bounds = piece_bounds(info, rows)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(bounds))
    if rows:
        assert all(hi > lo for lo, hi in bounds)
    row_bytes = row_len * FLOAT_BYTES
    assert all((hi - lo) * row_bytes <= max(1.5 * DECODE_BYTES, row_bytes) for lo, hi in bounds)
