"""The sentence-transformers reference for all-MiniLM-L6-v2, and helpers the engine tests share: a pass's
traced peak, a compute pool that counts its hand-offs (the model fixtures are in tests/conftest.py)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.embed.threads import ComputePool, Task

# Its checks are shared by the converter's test modules: pytest explains a failed assert there too.
pytest.register_assert_rewrite("tests.embed.tiny_checkpoint")
REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.json"


def load_reference() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="session")
def minilm_reference() -> dict[str, Any]:
    """tests/embed/fixtures/minilm_reference.json: sentences, HF ids, sentence-transformers vectors."""
    return load_reference()


def traced_peak(run: Callable[[], object]) -> int:
    """Bytes Python allocated at most while `run()` ran, above what was allocated before it."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


class CountingPool(ComputePool):
    """A compute pool that counts its hand-offs (run() calls with more than one task) and the most tasks
    one run() was given."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.handoffs = 0
        self.largest_run = 0

    def run(self, tasks: Sequence[Task]) -> None:
        self.handoffs += len(tasks) > 1
        self.largest_run = max(self.largest_run, len(tasks))
        super().run(tasks)
