"""Shared fixtures: skip cleanly where the machine lacks what a test needs; cached synthetic models."""

from __future__ import annotations

import os

# Before anything imports numpy: the engine's small matmuls run several times slower with a BLAS thread
# pool on a shared 2-core runner (the CLI makes the same choice for workloads).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gguf_sandbox.sandbox.cgroup import cgroups_writable  # noqa: E402
from tests.models import BIG_300MB, BIG_300MB_NARROW, VOCAB_262K, cached_synthetic  # noqa: E402


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
