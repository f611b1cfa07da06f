"""The committed llama.cpp decoder reference (tests/embed/make_decoder_reference.py) is well formed.

The engine's comparison against it lives with the decoder forward pass; this file checks only the fixture:
every model has every sentence (pooled MEAN and LAST, raw and normalized, of the model's width) or says why
not, and its token ids agree with the tokenizer reference where both hold the same text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.embed.make_decoder_reference import FIXTURE, N_CTX, POOLINGS, SENTENCES

TOKEN_FIXTURE = Path(__file__).parents[1] / "tokenizers" / "fixtures" / "llama_cpp_token_ids.json"
REFERENCE: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
TOKEN_REFERENCE: dict[str, Any] = json.loads(TOKEN_FIXTURE.read_text(encoding="utf-8"))
MODELS: dict[str, Any] = REFERENCE["models"]
KINDS = tuple(kind for pooling in POOLINGS for kind in (pooling, f"{pooling}_normalized"))
CASES = [(name, label) for name in MODELS for label in REFERENCE["texts"]]
# (model, label) pairs whose text the tokenizer reference also holds, for the same model.
SHARED = [
    (name, label, other)
    for name, label in CASES
    if name in TOKEN_REFERENCE["models"]
    for other, text in TOKEN_REFERENCE["texts"].items()
    if text == REFERENCE["texts"][label]
]


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_fixture_matches_the_script() -> None:
    assert REFERENCE["texts"] == dict(SENTENCES)
    assert REFERENCE["generator"] == "tests/embed/make_decoder_reference.py"
    assert {"smollm2", "gemma3"} <= set(MODELS)
    assert set(REFERENCE["notes"]) >= {"causal", "sliding_window", "rope", "pooling", "empty"}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_header(name: str) -> None:
    model = MODELS[name]
    assert len(model["sha256"]) == 64 and int(model["sha256"], 16) >= 0
    assert model["n_embd"] == int(model["metadata"][f"{model['architecture']}.embedding_length"])
    assert model["llama_log"]["arch"] == model["architecture"]
    assert set(model["ids"]) == set(REFERENCE["texts"])
    assert set(model["embeddings"]) | set(model["not_embeddable"]) == set(REFERENCE["texts"])
    assert not set(model["embeddings"]) & set(model["not_embeddable"])


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n}-{label}" for n, label in CASES])
def test_sentence_entry(name: str, label: str) -> None:
    model = MODELS[name]
    ids = model["ids"][label]
    assert all(isinstance(token, int) and token >= 0 for token in ids)
    if label in model["not_embeddable"]:
        # Recorded with its reason, never dropped: a text llama.cpp gets no tokens for, or more than n_ctx.
        reason = model["not_embeddable"][label]
        if ids:
            assert len(ids) > N_CTX and f"more than n_ctx {N_CTX}" in reason
        else:
            assert "llama_decode returned -1" in reason
        return
    assert ids, "a sentence with no tokens must be listed in not_embeddable"
    if model["metadata"].get("tokenizer.ggml.add_bos_token") == "true":
        assert ids[0] == int(model["metadata"]["tokenizer.ggml.bos_token_id"])
    vectors = model["embeddings"][label]
    assert set(vectors) == set(KINDS)
    for kind in KINDS:
        assert len(vectors[kind]) == model["n_embd"]
        assert all(math.isfinite(x) for x in vectors[kind])
    for pooling in POOLINGS:
        raw, normalized = vectors[pooling], vectors[f"{pooling}_normalized"]
        assert norm(normalized) == pytest.approx(1.0, abs=1e-5)
        scale = norm(raw)
        assert scale > 0
        assert max(abs(r / scale - n) for r, n in zip(raw, normalized, strict=True)) < 1e-5


@pytest.mark.parametrize(("name", "label", "other"), SHARED, ids=[f"{n}-{lab}" for n, lab, _ in SHARED])
def test_ids_match_tokenizer_reference(name: str, label: str, other: str) -> None:
    assert MODELS[name]["ids"][label] == TOKEN_REFERENCE["models"][name]["ids"][other]


def test_ids_comparison_covers_the_real_models() -> None:
    """The comparison above is not vacuous: most sentences of both real models are in both fixtures."""
    for name in ("smollm2", "gemma3"):
        assert MODELS[name]["sha256"] == TOKEN_REFERENCE["models"][name]["sha256"]
        assert sum(1 for n, _, _ in SHARED if n == name) >= len(SENTENCES) - 3


@pytest.mark.parametrize("name", list(MODELS))
def test_probes_recorded(name: str) -> None:
    checks = MODELS[name]["checks"]
    causal = checks["causal_probe"]
    # Causal attention: a different tail of the same length leaves the prefix's per-token outputs alone.
    assert causal["same_length_other_tail_max_abs_diff_prefix_rows"] <= 1e-6 * causal["max_abs_of_those_rows"]
    assert len(causal["prefix_alone_max_abs_diff_per_row"]) == causal["prefix_tokens"]
    pooling = checks["pooling_probe"]
    assert pooling["mean_minus_mean_of_rows_max_abs"] < 1e-3
    assert pooling["last_minus_last_row_max_abs"] < 1e-3
    for kind in POOLINGS:
        assert checks[f"{kind}_normalize_true_vs_normalize_embedding_max_abs"] < 1e-6
