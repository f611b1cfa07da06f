"""Real decoder-family GGUFs from PyPI (SmolLM2, gemma-3) and the llama.cpp token-id reference for them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.gguf.reader import GGUFFile
from tests.models import GEMMA3, SMOLLM2, PackagedGGUF, packaged_gguf

REFERENCE = Path(__file__).parent / "fixtures" / "llama_cpp_token_ids.json"
MODELS: dict[str, PackagedGGUF] = {"smollm2": SMOLLM2, "gemma3": GEMMA3}


def load_reference() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return loaded


def real_model(name: str) -> Path:
    """The cached file of a MODELS entry; skip (with the pip command) when it cannot be fetched."""
    found = packaged_gguf(MODELS[name])
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture(scope="session")
def smollm2_gguf() -> Iterator[GGUFFile]:
    with GGUFFile.open(real_model("smollm2")) as gguf:
        yield gguf


@pytest.fixture(scope="session")
def gemma3_gguf() -> Iterator[GGUFFile]:
    with GGUFFile.open(real_model("gemma3")) as gguf:
        yield gguf
