"""Shared synthetic models for the reader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import BIG_300MB, VOCAB_262K, cached_synthetic


@pytest.fixture(scope="session")
def vocab262k_model() -> Path:
    return cached_synthetic(VOCAB_262K)


@pytest.fixture(scope="session")
def big_model() -> Path:
    return cached_synthetic(BIG_300MB)
