"""The Embedder: plans, refusals, the single-allocation cap, concurrency, and real MiniLM vectors."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from gguf_sandbox.budget import MemoryBudget
from gguf_sandbox.embed import command, ort_bert, ort_kernel
from gguf_sandbox.embed import engine as engine_module
from gguf_sandbox.embed import plan as plan_module
from gguf_sandbox.embed.engine import SUB_BATCH_PLANS, Embedder
from gguf_sandbox.embed.plan import PLAN_ORDER, PlanName, pass_bytes
from gguf_sandbox.embed.rows import aligned
from gguf_sandbox.embed.threads import usable_cpus, weighted_spans
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.synth import SyntheticBert, vocabulary, write_synthetic_bert
from tests.embed.conftest import EVERY_PLAN, Variant, holds_whole, traced_peak
from tests.models import cached_synthetic

CAP = 1 << 20
UNLIMITED = 1 << 40
# all-MiniLM-L6-v2's shapes with synthetic weights: the real model's memory and blocking behaviour.
MINILM_SHAPED = SyntheticBert(
    vocab_size=30522,
    hidden=384,
    layers=6,
    heads=12,
    ffn=1536,
    context=512,
    tensor_type=GGMLQuantizationType.Q8_0,
    name="minilm-shaped",
)


def synthetic_texts(count: int, seed: int = 0, vocab_size: int = 400) -> list[str]:
    """Texts made of the synthetic vocabulary's words, 1 to 60 words long."""
    words = [t.lstrip("\u2581") for t in vocabulary(vocab_size)[5:] if t.startswith("\u2581")]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 61)))) for _ in range(count)]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticBert(vocab_size=400, hidden=64, layers=2, heads=4, ffn=128, context=128, seed=3,
                         tensor_type=GGMLQuantizationType.Q8_0)  # fmt: skip
    return write_synthetic_bert(tmp_path_factory.mktemp("engine") / "small.gguf", spec)


@pytest.fixture(scope="module")
def minilm_shaped() -> Path:
    return cached_synthetic(MINILM_SHAPED)


@pytest.fixture
def embedder(small_model: Path) -> Iterator[Embedder]:
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED)) as opened:
        yield opened


# -- the API ----------------------------------------------------------------------------------------------
def test_open_reports_what_it_chose(embedder: Embedder) -> None:
    assert embedder.plan == "resident-f32" == embedder.preferred_plan
    assert not embedder.degraded
    assert (embedder.dimension, embedder.context_length, embedder.pooling) == (64, 128, "mean")
    assert embedder.model_name == "synthetic-bert"
    assert embedder.plan_details["plan"] == "resident-f32"
    assert "resident-f32" in repr(embedder)


def test_embed_returns_unit_float32_rows_in_order(embedder: Embedder) -> None:
    texts = synthetic_texts(5)
    vectors = embedder.embed(texts)
    assert vectors.shape == (5, 64)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # Alone or in a batch: the same vector up to float32 rounding (BLAS blocks rows differently).
    assert np.abs(vectors[3] - embedder.embed([texts[3]])[0]).max() <= 1e-6


def test_embed_of_nothing_and_of_a_bare_string(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, 64)
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("one text")
    with pytest.raises(TypeError, match="must be str"):
        embedder.embed([b"bytes"])  # type: ignore[list-item]


def test_empty_and_overlong_texts_embed(embedder: Embedder) -> None:
    long_text = " ".join(["ab"] * 1000)
    vectors = embedder.embed(["", "   ", long_text])
    assert np.isfinite(vectors).all()
    assert len(embedder.tokenize(long_text)) == embedder.context_length


@pytest.mark.parametrize("batch_size", [1, 3, 32], ids=lambda b: f"batch{b}")
def test_batch_size_does_not_change_the_vectors(small_model: Path, batch_size: int) -> None:
    texts = synthetic_texts(10, seed=1)
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED), batch_size=1) as one:
        expected = one.embed(texts)
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED), batch_size=batch_size) as other:
        assert np.abs(other.embed(texts) - expected).max() <= 1e-6


def test_every_plan_gives_the_same_vectors_through_the_embedder(small_model: Path) -> None:
    texts = synthetic_texts(12, seed=2)
    results = {}
    for plan in PLAN_ORDER:
        with Embedder.open(small_model, plan=plan, budget=MemoryBudget(UNLIMITED)) as opened:
            assert opened.plan == plan.value
            assert opened.degraded == (plan is not PlanName.RESIDENT_F32)
            results[plan] = opened.embed(texts)
    for plan, vectors in results.items():
        assert np.abs(vectors - results[PlanName.RESIDENT_F32]).max() <= 1e-6, plan


def test_closed_embedder_refuses_work(small_model: Path) -> None:
    opened = Embedder.open(small_model, budget=MemoryBudget(UNLIMITED))
    opened.close()
    opened.close()
    with pytest.raises(GGUFError, match="closed"):
        opened.embed(["ab"])


# -- the budget -------------------------------------------------------------------------------------------
def test_a_budget_too_small_for_any_plan_is_refused(small_model: Path) -> None:
    budget = MemoryBudget(256 << 10)
    with pytest.raises(BudgetExceeded, match="streaming") as refused:
        Embedder.open(small_model, budget=budget)
    assert refused.value.available == budget.available
    assert budget.in_use == 0


def test_a_tight_budget_degrades_to_streaming(small_model: Path) -> None:
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED)) as free:
        config = free.config
        expected = free.embed(synthetic_texts(4, seed=3))
    budget = MemoryBudget(pass_bytes(config, config.context_length) + (64 << 10))
    with Embedder.open(small_model, budget=budget) as tight:
        assert tight.plan == "streaming"
        assert tight.degraded
        assert np.abs(tight.embed(synthetic_texts(4, seed=3)) - expected).max() <= 1e-6
        assert budget.peak <= budget.limit
    assert budget.in_use == 0


def test_resident_weights_and_passes_are_reserved(small_model: Path) -> None:
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(small_model, budget=budget) as opened:
        resident = budget.in_use
        assert resident == opened.plan_details["resident_bytes"]
        opened.embed(synthetic_texts(3))
        assert budget.peak > resident
        assert budget.in_use == resident
    assert budget.in_use == 0


# -- memory: the single-allocation cap and the working-set estimate ----------------------------------------
def test_no_single_allocation_over_the_cap_while_embedding(minilm_shaped: Path, tmp_path: Path) -> None:
    """memray records every allocation made while embedding, after a warm-up call: a batch, and texts one
    at a time up to the longest a BERT held whole in one session runs in one call (its allocations are
    onnxruntime's, which memray sees too)."""
    memray = pytest.importorskip("memray")
    texts = [*synthetic_texts(31, seed=4, vocab_size=30522), " ".join(["ab"] * 600)]
    for plan in EVERY_PLAN:
        with plan.open(minilm_shaped, budget=MemoryBudget(UNLIMITED)) as opened:
            opened.embed(texts)
            longest = ort_bert.whole_tokens(opened.config, CAP)
            word = next(w for w in (*"abcdefgh", "ab") if len(opened.tokenize(w)) == 3)  # [CLS] w [SEP]
            singles = [texts[0], " ".join([word] * (longest - 2))]
            assert len(opened.tokenize(singles[-1])) == longest
            capture = tmp_path / f"{plan.plan.value}-{plan.numpy}.bin"
            with memray.Tracker(capture, native_traces=False):
                opened.embed(texts)
                for text in singles:
                    opened.embed([text])
        sizes = [r.size for r in memray.FileReader(capture).get_allocation_records() if r.size]
        assert len(sizes) > 1000, "memray saw too few allocations to mean anything"
        assert max(sizes) <= CAP, f"{plan}: an allocation of {max(sizes):,} bytes"


@pytest.mark.parametrize("threads", [1, 2])
def test_traced_peak_of_a_pass_stays_within_its_reservation(
    minilm_shaped: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pass allocates (both sub-batches' at once when they run on two threads) stays within what
    the budget reserved for it, and that is within the single-pass estimate plus a pass's transients per
    extra thread."""
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)  # two threads even on a 1-CPU runner
    texts = [" ".join(["ab"] * 600), *synthetic_texts(40, seed=5, vocab_size=30522)]
    for plan in EVERY_PLAN:
        budget = MemoryBudget(UNLIMITED)
        with plan.open(minilm_shaped, budget=budget, batch_size=32, threads=threads) as opened:
            opened.embed(texts)
            resident = budget.in_use
            assert budget.in_use == resident
            tokens = max(sum(len(opened.tokenize(t)) for t in texts[:32]), len(opened.tokenize(texts[0])))
            passes = _record_reservations(budget)  # not the load's, which came and went before
            peak = traced_peak(lambda: opened.embed(texts))
            reserved = max(passes)
            assert peak <= reserved, f"{plan}: traced peak {peak:,} over the reserved {reserved:,}"
            rows = max(sum(aligned(len(opened.tokenize(t))) for t in texts[:32]), aligned(tokens))
            held = opened._weights.plan  # a BERT held whole in one session reserves its activations too
            sub_batches = plan.plan in SUB_BATCH_PLANS and not held.fused
            extra = (threads - 1) * (pass_bytes(opened.config, 0) if sub_batches else 0)
            assert reserved <= held.pass_bytes(opened.config, rows) + extra


# -- concurrency ------------------------------------------------------------------------------------------
def test_eight_threads_match_sequential_calls(minilm_shaped: Path) -> None:
    texts = synthetic_texts(400, seed=6, vocab_size=30522)
    batches = [texts[i : i + 50] for i in range(0, 400, 50)]
    with Embedder.open(minilm_shaped, plan="resident-quant", budget=MemoryBudget(UNLIMITED)) as opened:
        config = opened.config
        sequential = [opened.embed(batch) for batch in batches]
        resident = opened.budget.in_use
    # Room for the weights and about two passes of 32 texts: most callers must queue.
    budget = MemoryBudget(resident + 2 * pass_bytes(config, config.context_length) + (1 << 20))
    with Embedder.open(minilm_shaped, plan="resident-quant", budget=budget) as shared:
        started = threading.Barrier(8)

        def run(batch: list[str]) -> np.ndarray:
            started.wait()
            return shared.embed(batch)

        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(run, batches))
        assert budget.peak <= budget.limit - budget.baseline
    for alone, together in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(alone, together)


def test_no_more_passes_run_at_once_than_there_are_cpus(
    minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread that ever called BLAS keeps a packing buffer of its own: 8 concurrent passes held 8 of
    them and starved a 64 MiB cell (tests/embed/test_limits.py has the real cell)."""
    from gguf_sandbox.embed import architectures, engine

    running, most = 0, 0
    lock = threading.Lock()
    real_encode: Callable[..., np.ndarray] = architectures.BERT.encode

    def counting_encode(*args: Any, **kwargs: Any) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real_encode(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    counting = dataclasses.replace(architectures.BERT, encode=counting_encode)
    monkeypatch.setattr(engine, "family_of", lambda gguf: counting)
    cpus = len(os.sched_getaffinity(0))
    texts = synthetic_texts(64, seed=7, vocab_size=30522)
    with (
        Embedder.open(minilm_shaped, plan="resident-quant", budget=MemoryBudget(UNLIMITED)) as shared,
        ThreadPoolExecutor(max_workers=cpus + 6) as pool,
    ):
        list(pool.map(lambda text: shared.embed([text]), texts))
    assert 1 <= most <= cpus


# -- real all-MiniLM-L6-v2 against sentence-transformers -----------------------------------------------------
THRESHOLDS = {"f32": 0.99999, "f16": 0.9999, "q8_0": 0.999, "q4_0": 0.99}


def _fixture_rows(reference: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    texts = [entry["text"] for entry in reference["sentences"]]
    return texts, np.asarray([entry["embedding"] for entry in reference["sentences"]], dtype=np.float64)


@pytest.mark.parametrize("kind", list(THRESHOLDS))
def test_minilm_matches_sentence_transformers(
    minilm_gguf: Callable[[str], Path], minilm_reference: dict[str, Any], kind: str
) -> None:
    texts, expected = _fixture_rows(minilm_reference)
    with Embedder.open(minilm_gguf(kind), budget=MemoryBudget(UNLIMITED)) as opened:
        assert (opened.dimension, opened.pooling) == (384, "mean")
        got = opened.embed(texts).astype(np.float64)
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    worst = int(cosines.argmin())
    assert cosines.min() >= THRESHOLDS[kind], f"{kind}: cosine {cosines.min():.7f} on {texts[worst]!r}"


def test_minilm_tokens_are_the_reference_ids(
    minilm_gguf: Callable[[str], Path], minilm_reference: dict[str, Any]
) -> None:
    with Embedder.open(minilm_gguf("q8_0"), budget=MemoryBudget(UNLIMITED)) as opened:
        for entry in minilm_reference["sentences"]:
            assert opened.tokenize(entry["text"]) == entry["ids"], entry["label"]


def test_minilm_plans_agree_on_the_real_model(
    minilm_gguf: Callable[[str], Path], minilm_reference: dict[str, Any]
) -> None:
    texts, _ = _fixture_rows(minilm_reference)
    results = []
    for plan in PLAN_ORDER:
        with Embedder.open(minilm_gguf("q8_0"), plan=plan, budget=MemoryBudget(UNLIMITED)) as opened:
            results.append(opened.embed(texts))
    assert max(float(np.abs(r - results[0]).max()) for r in results) <= 1e-6


# -- the command line ---------------------------------------------------------------------------------------
def test_embed_command_prints_json_vectors_in_input_order(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("ab cd\n\nef gh\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(small_model), "--plan", "streaming", "--input", str(texts), "ij"]
    )
    assert command.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"] == "streaming"
    assert [row["text"] for row in report["data"]] == ["ab cd", "ef gh", "ij"]
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED)) as opened:
        expected = opened.embed(["ab cd", "ef gh", "ij"])
    got = np.array([row["embedding"] for row in report["data"]])
    assert np.abs(got - expected).max() <= 1e-6


def test_embed_command_without_texts_fails(small_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--model", str(small_model)])) == 2
    assert "no texts" in capsys.readouterr().err


def test_embed_command_refuses_zero_threads(small_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--model", str(small_model), "--threads", "0", "ab"])) == 2
    assert "--threads" in capsys.readouterr().err


# -- threads: a pass split over the compute pool gives the serial pass's vectors ---------------------------
@pytest.mark.parametrize("plan", EVERY_PLAN, ids=str)
def test_vectors_do_not_depend_on_the_thread_count(
    minilm_shaped: Path, plan: Variant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)  # a pool of 3 even on a 1-CPU runner
    texts = [" ".join(["ab"] * 600), *synthetic_texts(9, seed=8, vocab_size=30522)]
    results = []
    for threads in (1, 2, 3):
        with plan.open(minilm_shaped, budget=MemoryBudget(UNLIMITED), threads=threads) as opened:
            results.append((opened.embed(texts), opened.embed(texts[1:2])))
    for batch, single in results[1:]:
        assert np.abs(batch - results[0][0]).max() <= 1e-6
        assert np.abs(single - results[0][1]).max() <= 1e-6


def _pass_reservations(opened: Embedder, budget: MemoryBudget, texts: list[str]) -> list[int]:
    """Sizes of the reservations one embed() call makes beside the resident weights, in order."""
    sizes = _record_reservations(budget)
    opened.embed(texts)
    return sizes


def _record_reservations(budget: MemoryBudget) -> list[int]:
    """A list that every reservation `budget` grants from now on appends its size to."""
    sizes: list[int] = []
    for name in ("reserve", "reserve_blocking"):
        granted = getattr(budget, name)

        def recording(purpose: str, nbytes: int, *args: Any, _granted: Any = granted, **kwargs: Any) -> Any:
            reservation = _granted(purpose, nbytes, *args, **kwargs)
            sizes.append(nbytes)
            return reservation

        setattr(budget, name, recording)
    return sizes


def test_a_held_batch_runs_as_one_sub_batch_per_thread(
    minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resident-f32 and resident-int8 on two threads: the pass is reserved as two sub-batches of near-equal
    tokens (each with its own transients); the decoding plans, and a BERT held whole in one session (whose
    own pool runs every product on both threads), keep one batch whose products the pool shares."""
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    texts = synthetic_texts(12, seed=9, vocab_size=30522)
    for plan in EVERY_PLAN:
        budget = MemoryBudget(UNLIMITED)
        with plan.open(minilm_shaped, budget=budget, threads=2) as opened:
            rows = [aligned(len(opened.tokenize(t))) for t in texts]
            halves = weighted_spans([len(opened.tokenize(t)) for t in texts], 2)
            assert len(halves) == 2
            held = opened._weights.plan
            if plan.plan in SUB_BATCH_PLANS and not held.fused:
                expected = sum(pass_bytes(opened.config, sum(rows[lo:hi])) for lo, hi in halves)
            else:
                expected = held.pass_bytes(opened.config, sum(rows))
            assert held.fused == (plan == Variant(PlanName.RESIDENT_F32) and holds_whole())
            assert _pass_reservations(opened, budget, texts) == [expected], plan


def test_sub_batches_that_do_not_fit_run_as_one_batch(
    minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for one pass but not for a second sub-batch's transients (other work holds the rest of the
    budget): the pass runs as one batch, with the same vectors, within the limit (resident-f32 multiplied
    by numpy, which runs sub-batches; a BERT held whole in one session never does)."""
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    monkeypatch.setattr(ort_kernel, "available", lambda: False)
    texts = synthetic_texts(12, seed=9, vocab_size=30522)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(minilm_shaped, plan="resident-f32", budget=budget, threads=2) as opened:
        two_threads = opened.embed(texts)
        one_pass = pass_bytes(opened.config, sum(aligned(len(opened.tokenize(t))) for t in texts))
        room = one_pass + pass_bytes(opened.config, 0) // 2
        with budget.reserve("other work", budget.available - room, cap=UNLIMITED):
            assert _pass_reservations(opened, budget, texts) == [one_pass]
            assert np.abs(opened.embed(texts) - two_threads).max() <= 1e-6
        assert budget.peak <= budget.limit


@pytest.mark.parametrize("poison", ["nan-weights", "inf-bias", "overflowing-weights"])
def test_corrupt_weights_on_sub_batches_raise_one_error_and_release_the_pass(
    poison: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile weights on resident-f32 with two threads: both sub-batches fail; the caller gets one
    GGUFError, the pass's memory is released, and the Embedder answers the next call the same way."""
    from tests.gguf.hostile import CORPUS

    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(
        CORPUS[poison].make(tmp_path), plan="resident-f32", budget=budget, threads=2
    ) as opened:
        resident = budget.in_use
        texts = ["a b c", "b c a b", "c", "a a b b c c"]
        lengths = [len(opened.tokenize(t)) for t in texts]
        halves = [sum(aligned(n) for n in lengths[lo:hi]) for lo, hi in weighted_spans(lengths, 2)]
        reserved = _record_reservations(budget)
        for _ in range(2):
            with pytest.raises(GGUFError, match="NaN or infinite"):
                opened.embed(texts)
            assert budget.in_use == resident
        assert reserved == [sum(pass_bytes(opened.config, rows) for rows in halves)] * 2  # ran as sub-batches


@pytest.mark.parametrize("poison", ["nan-weights", "inf-bias", "overflowing-weights"])
@pytest.mark.parametrize("plan", ["resident-f32", "streaming"])
def test_corrupt_weights_on_one_text_over_two_threads_raise_one_error_and_no_warning(
    poison: str, plan: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile weights, one text, a pass split over two threads (GELU per chunk after the products'
    tasks, attention's head spans): one GGUFError in words, no numpy warning from any thread, the pass's
    memory released."""
    from tests.gguf.hostile import CORPUS

    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(CORPUS[poison].make(tmp_path), plan=plan, budget=budget, threads=2) as opened:
        assert opened.threads == 2
        resident = budget.in_use
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                with pytest.raises(GGUFError, match="NaN or infinite"):
                    opened.embed(["a b c a b c a b"])
                assert budget.in_use == resident


def test_threads_never_exceed_the_usable_cpus(small_model: Path) -> None:
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED), threads=10_000) as opened:
        assert opened.threads == usable_cpus()
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED), threads=1) as opened:
        assert opened.threads == 1
    with pytest.raises(ValueError, match="threads"):
        Embedder.open(small_model, budget=MemoryBudget(UNLIMITED), threads=0)


# -- hardening: bounded waits, the preferred plan, page cache, failing reads -----------------------------
def test_embed_waits_for_room_in_a_shared_budget_only_so_long(small_model: Path) -> None:
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(small_model, budget=budget, wait_s=0.3) as opened:
        budget.reserve("another user of the budget", budget.available, cap=UNLIMITED)
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                opened.embed(["ab cd"])
            except BaseException as error:
                outcome.append(error)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "embed() still waits for room after 30 s"
    assert len(outcome) == 1 and isinstance(outcome[0], BudgetExceeded)
    assert "waited 0.3 s" in str(outcome[0])


def test_a_host_too_small_for_float32_weights_does_not_count_quantized_as_degraded(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Embedder.open(small_model, plan="resident-quant", budget=MemoryBudget(UNLIMITED)) as opened:
        assert opened.degraded
        resident = opened.budget.in_use
    # A machine whose RAM holds the quantized weights and a pass, but not the float32 weights.
    ram = resident + pass_bytes(opened.config, opened.context_length) + 1
    monkeypatch.setattr(plan_module, "physical_memory", lambda: ram)
    with Embedder.open(small_model, plan="resident-quant", budget=MemoryBudget(UNLIMITED)) as opened:
        assert opened.preferred_plan == "resident-quant"
        assert not opened.degraded


def test_streaming_reserves_the_page_cache_it_keeps_unless_told_to_drop_it(small_model: Path) -> None:
    texts = synthetic_texts(6, seed=8)
    budget = MemoryBudget(UNLIMITED)
    with Embedder.open(small_model, plan="streaming", budget=budget) as cached:
        details = cached.plan_details
        held = [details["resident_bytes"], details["cached_bytes"]]
        assert all(isinstance(n, int) for n in held) and held[1] and not details["uncached"]
        assert budget.in_use == sum(n for n in held if isinstance(n, int))
        expected = cached.embed(texts)
    with Embedder.open(small_model, plan="streaming", budget=budget, drop_cache=True) as dropped:
        assert dropped.plan_details["uncached"] and dropped.plan_details["cached_bytes"] == 0
        assert budget.in_use == dropped.plan_details["resident_bytes"]
        np.testing.assert_array_equal(dropped.embed(texts), expected)


def test_a_vocabulary_too_big_for_the_budget_is_refused_before_it_is_built(small_model: Path) -> None:
    with pytest.raises(BudgetExceeded, match=r"tokenizer vocabulary of small.gguf: needs [\d,]+ bytes"):
        Embedder.open(small_model, budget=MemoryBudget(16 << 10))


def test_a_read_failing_with_eio_is_a_gguf_error(small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_preadv(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(GGUFError, match=r"small.gguf: header|failed: Input/output error"):
        Embedder.open(small_model, budget=MemoryBudget(UNLIMITED))


# -- the command line: streamed input, clean errors ------------------------------------------------------
def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_embed_command_streams_any_number_of_lines_in_batches(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = synthetic_texts(70, seed=9)
    source = tmp_path / "many.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calls: list[int] = []
    original = Embedder.embed

    def counting(self: Embedder, texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return original(self, texts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Embedder, "embed", counting)
        assert run_command(["--model", str(small_model), "--input", str(source), "--batch-size", "16"]) == 0
    assert calls == [16, 16, 16, 16, 6]
    report = json.loads(capsys.readouterr().out)
    assert [row["text"] for row in report["data"]] == lines


def test_embed_command_cuts_an_overlong_line_with_a_note(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "long.txt"
    source.write_text("ab " * 100_000 + "\nef gh\n", encoding="utf-8")
    assert run_command(["--model", str(small_model), "--input", str(source)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [len(row["text"]) for row in report["data"]] == [command.MAX_LINE_BYTES, 5]
    assert captured.err.count("\n") == 1 and "line 1 is longer than 65,536 bytes" in captured.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"fine\n\xff\xfe broken\n", r"line 2 is not valid UTF-8"),
        (None, r"cannot read --input .*missing.txt: No such file or directory"),
    ],
    ids=["invalid-utf8", "missing-file"],
)
def test_unreadable_input_is_exit_4_in_one_line(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    source = tmp_path / ("missing.txt" if content is None else "input.txt")
    if content is not None:
        source.write_bytes(content)
    assert run_command(["--model", str(small_model), "--input", str(source)]) == 4
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and re.search(message, captured.err), captured.err


def test_a_text_argument_that_is_not_utf8_is_exit_4_before_any_output(
    small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    undecodable = os.fsdecode(b"ok \xff")  # what Python makes of such bytes in argv
    assert run_command(["--model", str(small_model), "fine", undecodable]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "TEXT argument 2 is not valid UTF-8 (invalid start byte at byte 3)" in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("precision", ["-1", "0", "18"])
def test_a_precision_that_would_round_vectors_away_is_exit_2(
    small_model: Path, capsys: pytest.CaptureFixture[str], precision: str
) -> None:
    assert run_command(["--model", str(small_model), "--precision", precision, "ab"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--precision must be 1–17 decimals" in captured.err


def test_non_finite_vectors_are_exit_4_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.gguf.hostile import CORPUS

    model = CORPUS["nan-weights"].make(tmp_path)
    assert run_command(["--model", str(model), "a b c"]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "NaN or infinite" in captured.err and captured.err.count("\n") == 1


def test_a_budget_refusal_is_exit_3(small_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MemoryBudget, "detect", classmethod(lambda cls: MemoryBudget(16 << 10)))
        assert run_command(["--model", str(small_model), "ab"]) == 3
    assert "refused" in capsys.readouterr().err


def test_a_line_cut_inside_a_character_is_not_a_decoding_error(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "accents.txt"
    source.write_text("a" + "é" * 40_000 + "\nab\n", encoding="utf-8")  # byte 65,536 is inside an "é"
    assert run_command(["--model", str(small_model), "--input", str(source)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["text"] for row in report["data"]] == ["a" + "é" * 32_767, "ab"]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("plan", EVERY_PLAN, ids=str)
@pytest.mark.parametrize("scale", [np.float16(np.nan), np.float16(np.inf), np.float16(-np.inf)], ids=str)
def test_a_poisoned_q8_0_scale_is_one_error_on_every_plan(
    small_model: Path, tmp_path: Path, plan: Variant, scale: np.float16
) -> None:
    """A Q8_0 block whose fp16 scale is NaN or infinite, in a matrix every plan decodes its own way (split
    in column order for resident-quant, row order for streaming): one GGUFError, no numpy warning before
    it, the pass released."""
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(small_model) as opened:
        info = opened.tensor("blk.1.ffn_up.weight")
    assert info.type is GGMLQuantizationType.Q8_0
    data = bytearray(small_model.read_bytes())
    block = info.offset + 34 * (info.nbytes // 34 // 2)  # a block in the middle of the matrix
    data[block : block + 2] = scale.tobytes()
    poisoned = tmp_path / "poisoned-scale.gguf"
    poisoned.write_bytes(bytes(data))
    _assert_one_error_per_call(poisoned, plan, threads=1)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("plan", EVERY_PLAN, ids=str)
def test_poisoned_q8_0_scales_on_two_threads_are_one_error_and_no_warning(
    minilm_shaped: Path, tmp_path: Path, plan: Variant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every block of a 1536x384 matrix with an infinite scale (inf x 0 quants is invalid), decoded in
    several pieces on two threads: the helper thread's decodes and products warn no more than the caller's
    (numpy's error state is per thread)."""
    from gguf_sandbox.gguf.reader import GGUFFile

    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    with GGUFFile.open(minilm_shaped) as opened:
        info = opened.tensor("blk.0.ffn_up.weight")
    data = np.frombuffer(bytearray(minilm_shaped.read_bytes()), dtype=np.uint8)
    blocks = data[info.offset : info.offset + info.nbytes].reshape(-1, 34)
    assert (blocks[:, 2:] == 0).any()  # some quants are 0: inf x 0
    blocks[:, :2] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)
    poisoned = tmp_path / "poisoned-scales.gguf"
    poisoned.write_bytes(data.tobytes())
    _assert_one_error_per_call(poisoned, plan, threads=2)


def _assert_one_error_per_call(model: Path, plan: Variant, *, threads: int) -> None:
    budget = MemoryBudget(UNLIMITED)
    if plan.plan is PlanName.RESIDENT_INT8:
        # The int8 kernel would carry a poisoned scale into finite, wrong products: refused at load.
        with pytest.raises(GGUFError, match="NaN or infinite"):
            plan.open(model, budget=budget, threads=threads)
        assert budget.in_use == 0
        return
    with plan.open(model, budget=budget, threads=threads) as embedder:
        resident = budget.in_use
        for _ in range(2):
            with pytest.raises(GGUFError, match="NaN or infinite"):
                embedder.embed(["a b c", "b c a b", synthetic_texts(1)[0]])
            assert budget.in_use == resident


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "setting", [("resident-f32", 2, 32), ("streaming", 1, 2)], ids=["sub-batches", "passes-of-2"]
)
def test_a_non_finite_vector_is_named_among_the_callers_texts(
    small_model: Path, tmp_path: Path, setting: tuple[str, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One token's embedding row poisoned, so only the text holding it goes NaN: the error names it by
    its index among the caller's texts, whether it ran in the second of two sub-batches or in a later
    pass (a sub-batch used to count from its own first text: "sequence 0 of the batch, 1 of 1")."""
    from gguf_sandbox.gguf.reader import GGUFFile

    plan, threads, batch_size = setting
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 8)
    words = [token[1:] for token in vocabulary(400) if token.startswith("\u2581") and len(token) > 2][-3:]
    texts = [f"{words[0]} {words[1]}", words[1], words[0], f"{words[1]} {words[2]}"]  # text 3 holds words[2]
    with Embedder.open(small_model, budget=MemoryBudget(UNLIMITED)) as clean:
        poisoned_id = clean.tokenize(words[2])[1]
        assert all(poisoned_id not in clean.tokenize(text) for text in texts[:3])
    with GGUFFile.open(small_model) as opened:
        table = opened.tensor("token_embd.weight")
    row_bytes = table.nbytes // table.ne[1]
    data = bytearray(small_model.read_bytes())
    start = table.offset + poisoned_id * row_bytes
    data[start : start + 2] = np.float16(np.nan).tobytes()  # the row's first block scale
    poisoned = tmp_path / "poisoned-row.gguf"
    poisoned.write_bytes(bytes(data))
    with Embedder.open(
        poisoned, plan=plan, budget=MemoryBudget(UNLIMITED), threads=threads, batch_size=batch_size
    ) as embedder:
        assert embedder.embed(texts[:3]).shape == (3, embedder.dimension)  # the others are fine
        with pytest.raises(GGUFError) as raised:
            embedder.embed(texts)
    expected = f"for 1 of the {2 if batch_size == 2 else 4} texts embedded together (the first is text 3)"
    assert expected in str(raised.value)
