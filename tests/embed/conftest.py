"""The sentence-transformers reference for all-MiniLM-L6-v2, and helpers the engine tests share: the plans
as the engine runs them (resident-f32 packed or for numpy), a pass's traced peak, a compute pool that
counts its hand-offs (the model fixtures are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.embed import ort_bert, ort_kernel
from gguf_sandbox.embed.engine import Embedder
from gguf_sandbox.embed.plan import PLAN_ORDER, PlanName
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


@contextlib.contextmanager
def kernels_hidden() -> Iterator[None]:
    """onnxruntime's kernels looked up as not installed: an Embedder opened meanwhile holds resident-f32
    for numpy, as where the `fast` extra is not installed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort_kernel, "available", lambda: False)
        yield


def holds_whole() -> bool:
    """Whether packed resident-f32 holds a BERT whole in one session here: the kernel is installed and its
    layer norm is numpy's where squares overflow (ort_bert.numpys_layer_norm: not on onnxruntime 1.23)."""
    return ort_kernel.available() and ort_bert.numpys_layer_norm(1)


@dataclass(frozen=True)
class Variant:
    """A plan as the engine runs it; `numpy`: resident-f32 multiplied by numpy even where onnxruntime's
    float32 kernel would hold it packed."""

    plan: PlanName
    numpy: bool = False

    def __str__(self) -> str:
        return self.plan.value + ("/numpy" if self.numpy else "")

    def open(self, model: Path, **options: Any) -> Embedder:
        with kernels_hidden() if self.numpy else contextlib.nullcontext():
            return Embedder.open(model, plan=self.plan, **options)


# auto's plans, with resident-f32 both packed and for numpy and resident-int8 where the kernels are
# installed (the `fast` extra; minilm_shaped and small_model are Q8_0 throughout, so int8 runs them).
EVERY_PLAN = [
    *(Variant(plan) for plan in PLAN_ORDER),
    *(
        [Variant(PlanName.RESIDENT_F32, numpy=True), Variant(PlanName.RESIDENT_INT8)]
        if ort_kernel.available()
        else []
    ),
]


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
