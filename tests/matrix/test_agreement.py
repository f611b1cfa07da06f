"""A peer's vectors against ours: cosines over the texts both reports carry, and the verdict they give."""

from __future__ import annotations

import json
import math

import pytest

from gguf_sandbox.matrix.agreement import PEER_MIN_COSINE, Agreement, agreement, sampled_vectors
from gguf_sandbox.matrix.verdicts import Outcome, Reference, Verdict, comparable, decide
from gguf_sandbox.sandbox.base import RunResult

OURS = {"0": [1.0, 0.0, 0.0], "5": [0.0, 1.0, 0.0]}


def tilted(angle: float) -> dict[str, list[float]]:
    """OURS with every vector turned by `angle` radians (cosine = cos(angle))."""
    return {"0": [math.cos(angle), math.sin(angle), 0.0], "5": [0.0, math.cos(angle), math.sin(angle)]}


def finished(vectors: object) -> RunResult:
    stdout = json.dumps({"workload": "llama-cpp", "vectors": vectors, "fingerprint": [0.5, 0.5]})
    return RunResult(0, False, False, 0, 80 << 20, 128 << 20, 3.0, stdout, "")


def judge(vectors: object, reference: Reference) -> Outcome:
    result = finished(vectors)
    return decide(result, json.loads(result.stdout), reference)


def test_identical_vectors_agree_to_one_and_a_turn_gives_its_cosine() -> None:
    assert agreement(OURS, OURS) == Agreement(1.0, 1.0, 2)
    found = agreement(tilted(0.01), OURS)
    assert found is not None and found.smallest == pytest.approx(math.cos(0.01)) and found.texts == 2
    # Only common texts count; scale does not matter.
    assert agreement({"5": [0.0, 3.0, 0.0], "7": [1.0, 1.0, 1.0]}, OURS) == Agreement(1.0, 1.0, 1)


@pytest.mark.parametrize(
    "vectors",
    [
        None,
        [],
        {},
        "vectors",
        {"0": [1.0, math.nan, 0.0]},
        {"0": [1.0, True, 0.0]},
        {"0": "1,0,0"},
        {"0": []},
        {"0": [0.0, 0.0, 0.0]},
        {"0": [1.0, 0.0]},
        {"9": [1.0, 0.0, 0.0]},
        {str(i): [1.0] for i in range(65)},
        {"0": [10**400, 0.0, 0.0]},
    ],
    ids=[
        "none",
        "list",
        "empty",
        "text",
        "nan",
        "bool",
        "string-vector",
        "empty-vector",
        "zero-vector",
        "other-dimension",
        "no-common-text",
        "too-many",
        "int-beyond-float",
    ],
)
def test_hostile_or_unmatched_vectors_give_no_agreement(vectors: object) -> None:
    assert agreement(vectors, OURS) is None


def test_sampled_vectors_are_checked_before_use() -> None:
    # JSON's 10**400 is an int no float holds: math.isfinite raised OverflowError, ending the whole run.
    assert sampled_vectors({"0": [1.0, 10**400]}) is None
    assert sampled_vectors({"0": [1, 2.5]}) == {"0": [1.0, 2.5]}
    assert sampled_vectors({0: [1.0]}) is None


def test_a_peer_agreeing_with_ours_passes_and_records_its_cosine() -> None:
    outcome = judge(tilted(0.01), Reference(OURS, min_cosine=PEER_MIN_COSINE))
    assert outcome.verdict is Verdict.PASS and "cosine to ours 0.99995" in outcome.reason
    data = outcome.to_json()
    assert data["cosine_to_ours"]["texts"] == 2
    again = Outcome.from_json(data)
    assert again.agreement is not None and again.agreement.smallest == pytest.approx(math.cos(0.01))


def test_a_peer_below_the_cosine_is_wrong_and_one_without_vectors_cannot_be_judged() -> None:
    outcome = judge(tilted(0.1), Reference(OURS, min_cosine=PEER_MIN_COSINE))
    assert outcome.verdict is Verdict.WRONG and "< 0.999" in outcome.reason
    assert judge(None, Reference(OURS, min_cosine=PEER_MIN_COSINE)).verdict is Verdict.ERROR
    failed = Reference(None, "its unconstrained reference run crashed", PEER_MIN_COSINE)
    assert judge(OURS, failed).verdict is Verdict.ERROR


def test_a_report_with_vectors_offers_them_for_comparison() -> None:
    assert comparable({"vectors": OURS, "fingerprint": [1.0]}) == OURS
    assert comparable({"fingerprint": [1.0]}) == [1.0]
    # Without min_cosine (not a peer) the comparison stays exact-within-tolerance.
    assert judge(OURS, Reference(OURS)).verdict is Verdict.PASS
    assert judge(tilted(0.01), Reference(OURS)).verdict is Verdict.WRONG


def test_a_damaged_recorded_cosine_reads_as_none() -> None:
    assert Agreement.from_json({"min": "high", "mean": 1.0, "texts": 2}) is None
    assert Agreement.from_json([1.0]) is None


@pytest.mark.parametrize(
    ("vectors", "verdict"),
    [
        ({"0": [1.7e308, 1.7e308]}, Verdict.WRONG),
        ({"0": [1e-200, 1e-200]}, Verdict.WRONG),
        ({"0": [1.2e308, 1.6e308]}, Verdict.PASS),
    ],
    ids=["overflowing-products", "underflowing-squares", "overflowing-but-agreeing"],
)
def test_the_scale_of_a_hostile_report_gives_the_true_cosine_never_nan(
    vectors: dict[str, list[float]], verdict: Verdict
) -> None:
    # A NaN cosine compares below nothing: taken for agreement, a wrong peer passed.
    ours = {"0": [0.6, 0.8]}
    found = agreement(vectors, ours)
    x, y = vectors["0"]
    expected = (0.6 * x / y + 0.8) / math.hypot(x / y, 1.0)
    assert found is not None and found.smallest == pytest.approx(expected, abs=1e-12)
    assert judge(vectors, Reference(ours, min_cosine=PEER_MIN_COSINE)).verdict is verdict


@pytest.mark.parametrize(
    "data",
    [
        {"min": math.nan, "mean": 1.0, "texts": 2},
        {"min": 1.0, "mean": math.inf, "texts": 2},
        {"min": 5.0, "mean": 1.0, "texts": 2},
        {"min": 1.0, "mean": 1.0, "texts": math.inf},
        {"min": 1.0, "mean": 1.0, "texts": 2.5},
        {"min": 1.0, "mean": 1.0, "texts": -3},
        {"min": 1.0, "mean": 1.0, "texts": 10**400},
    ],
    ids=[
        "nan-min",
        "inf-mean",
        "cosine-above-one",
        "inf-texts",
        "fractional-texts",
        "negative-texts",
        "huge-texts",
    ],
)
def test_a_hostile_recorded_cosine_reads_as_none(data: dict[str, object]) -> None:
    assert Agreement.from_json(data) is None
    record = judge(OURS, Reference(OURS, min_cosine=PEER_MIN_COSINE)).to_json()
    assert Outcome.from_json({**record, "cosine_to_ours": data}).agreement is None
