"""The deterministic corpus embedding workloads send: sentences of 3–40 words, some accents, CJK, emoji."""

from __future__ import annotations

import numpy as np

WORDS = (
    "memory",
    "limit",
    "model",
    "embedding",
    "vector",
    "server",
    "host",
    "container",
    "process",
    "kernel",
    "cgroup",
    "token",
    "sentence",
    "python",
    "numpy",
    "matrix",
    "layer",
    "attention",
    "cache",
    "swap",
    "page",
    "file",
    "stream",
    "block",
    "budget",
    "query",
    "document",
    "index",
    "search",
    "retrieval",
    "small",
    "large",
    "fast",
    "slow",
    "quiet",
    "noisy",
    "red",
    "green",
    "blue",
    "café",
    "naïve",
    "résumé",
    "東京",
    "数据",
    "🙂",
)


def corpus(count: int, seed: int = 1234) -> list[str]:
    """`count` deterministic sentences of 3–40 words, some with accents, CJK and emoji."""
    rng = np.random.default_rng(seed)
    sentences = []
    for index in range(count):
        length = int(rng.integers(3, 41))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=length)]
        sentences.append(f"{index}: " + " ".join(words) + ".")
    return sentences
