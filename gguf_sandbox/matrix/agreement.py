"""How close a peer's vectors are to ours: cosines over the texts both reports carry whole (`vectors`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A peer on the same GGUF agrees with ours to ~0.9997 (llama.cpp quantizes activations to 8 bits, keeps K/V
# in f16; sentence-transformers runs the float32 checkpoint our Q8_0 file was made from): below this the
# peer, or ours, computed something else.
PEER_MIN_COSINE = 0.999
# Reports are untrusted: at most this many vectors of at most this many components are compared.
MAX_TEXTS = 64
MAX_DIMENSION = 1 << 16


@dataclass(frozen=True)
class Agreement:
    """Cosines of one report's vectors to another's over the texts both carry."""

    smallest: float
    mean: float
    texts: int

    def describe(self) -> str:
        return f"cosine to ours {self.smallest:.6f} (smallest of {self.texts} texts, mean {self.mean:.6f})"

    def to_json(self) -> dict[str, Any]:
        return {"min": round(self.smallest, 7), "mean": round(self.mean, 7), "texts": self.texts}

    @classmethod
    def from_json(cls, data: object) -> Agreement | None:
        """The agreement a record holds, or None when it holds none (or a damaged one)."""
        if not isinstance(data, Mapping):
            return None
        smallest, mean, texts = (data.get(key) for key in ("min", "mean", "texts"))
        if not (_cosine(smallest) and _cosine(mean)):
            return None
        if isinstance(texts, bool) or not isinstance(texts, int) or not 0 < texts <= MAX_TEXTS:
            return None
        return cls(float(smallest), float(mean), texts)  # type: ignore[arg-type]


def _cosine(value: object) -> bool:
    """Whether `value` is a number a cosine can be (finite, from -1 to 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and -1.0 <= value <= 1.0


def sampled_vectors(value: object) -> dict[str, list[float]] | None:
    """A report's `vectors` ({text index: components}) when well-formed and finite, else None."""
    if not isinstance(value, Mapping) or not value or len(value) > MAX_TEXTS:
        return None
    out: dict[str, list[float]] = {}
    for key, vector in value.items():
        if not isinstance(key, str) or not isinstance(vector, list) or not 0 < len(vector) <= MAX_DIMENSION:
            return None
        if not all(_finite(x) for x in vector):
            return None
        out[key] = [float(x) for x in vector]
    return out


def _scaled(vector: list[float]) -> list[float]:
    """`vector` divided by its largest magnitude: its squares and products can neither overflow (a NaN
    cosine) nor underflow (a zero norm), whatever the report's scale."""
    largest = max(abs(x) for x in vector)
    return [x / largest for x in vector] if largest > 0 else vector


def _finite(value: object) -> bool:
    """Whether `value` is a number with a finite float (JSON's 10**400 is an int no float holds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def agreement(actual: object, reference: object) -> Agreement | None:
    """Cosines of `actual`'s vectors to `reference`'s over their common texts; None when either carries
    none, they share no text, or a pair differs in dimension or has a zero vector."""
    ours, theirs = sampled_vectors(reference), sampled_vectors(actual)
    if ours is None or theirs is None:
        return None
    common = sorted(set(ours) & set(theirs))
    cosines = []
    for key in common:
        a, b = _scaled(theirs[key]), _scaled(ours[key])
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        if len(a) != len(b) or norms == 0:
            return None
        cosine = sum(x * y for x, y in zip(a, b, strict=True)) / norms
        cosines.append(min(1.0, max(-1.0, cosine)))
    if not cosines:
        return None
    return Agreement(min(cosines), sum(cosines) / len(cosines), len(cosines))
