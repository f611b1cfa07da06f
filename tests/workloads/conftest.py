"""Shared by the workload tests: the model they run on and the workload options they pass."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

COUNT = 24


def options(**overrides: Any) -> argparse.Namespace:
    values = {"count": COUNT, "batch": 2, "threads": 4, "plan": "auto", "pooling": None}
    return argparse.Namespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def model(minilm_gguf: Callable[[str], Path]) -> Path:
    return minilm_gguf("q8_0")
