"""The metadata checks every model family shares."""

from __future__ import annotations

import pytest

from gguf_sandbox.embed.layout import positive_float32

KEPT = {"bert-eps": 1e-12, "rms-eps": 1e-6, "int-rope-base": 10000, "float-rope-base": 500000.0}
REFUSED = {
    "true": True,
    "null": None,
    "string": "1e-12",
    "nan": float("nan"),
    "inf": float("inf"),
    "minus-inf": -float("inf"),
    "int-zero": 0,
    "zero": 0.0,
    "negative": -1e-5,
    "below-float32": 1e-50,
    "above-float32": 1e39,
    "400-digit-int": 10**400,
}


@pytest.mark.parametrize("label", list(KEPT))
def test_positive_float32_keeps_what_float32_holds(label: str) -> None:
    assert positive_float32(KEPT[label]) == pytest.approx(KEPT[label], rel=1e-7)


@pytest.mark.parametrize("label", list(REFUSED))
def test_positive_float32_refuses_the_rest(label: str) -> None:
    assert positive_float32(REFUSED[label]) is None
