"""model.safetensors' tensors as llama.cpp's BERT GGUF holds them: named, checked against config.json, typed,
and their data read one tensor at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import MODEL_ARCH, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape, quantize
from gguf.tensor_mapping import get_tensor_name_map

from gguf_sandbox.embed.bert_config import BertHParams
from gguf_sandbox.embed.convert_types import OutType, tensor_type
from gguf_sandbox.embed.shapes import bert_shapes
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.units import clip

ARCH = MODEL_ARCH.BERT
SAFETENSORS = "model.safetensors"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
LAYER_TENSOR = re.compile(r"encoder\.layer\.(\d+)\.")
# Checkpoint tensors llama.cpp drops for an embedding model (the MLM/NSP heads, the pooler).
DROPPED_PREFIXES = ("cls.predictions", "cls.seq_relationship")
DROPPED_NAMES = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of model.safetensors as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, I64, ...


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from and how it is stored."""

    source: str
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype)))


def read_header(weights: Path) -> list[SourceTensor]:
    """The tensors model.safetensors holds, from its header alone (safetensors checks it against the size)."""
    if not weights.is_file():
        others = sorted(p.name for p in weights.parent.glob("*.safetensors")) + sorted(
            p.name for p in weights.parent.glob("pytorch_model*.bin")
        )
        found = f" (found {clip(', '.join(others), 200)})" if others else ""
        raise GGUFSandboxError(
            f"{weights} is missing{found}; only a single-file model.safetensors can be converted — "
            f"re-save the model with safetensors (no torch is used here)"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            views = ((name, handle.get_slice(name)) for name in handle.keys())  # noqa: SIM118 (not a mapping)
            return [
                SourceTensor(name, tuple(int(d) for d in v.get_shape()), v.get_dtype()) for name, v in views
            ]
    except Exception as error:  # safetensors raises its own types for a corrupt header
        raise GGUFSandboxError(
            f"{weights}: cannot read safetensors header ({clip(str(error), 200)}); is the file complete?"
        ) from error


def check_counts(hparams: BertHParams, tensors: list[SourceTensor], hf_dir: Path) -> None:
    """config.json's vocab_size, hidden_size and num_hidden_layers against the tensors the weights hold,
    before anything is sized by them (the token list, the tensor-name map)."""
    config, weights = hf_dir / "config.json", hf_dir / SAFETENSORS
    disagree = "the weights and config.json belong to different models"
    shapes = {tensor.name.removeprefix("bert."): tensor.shape for tensor in tensors}
    embedding = shapes.get(WORD_EMBEDDINGS)
    if embedding is None:
        raise GGUFSandboxError(
            f"{weights} has no {WORD_EMBEDDINGS}; the checkpoint is incomplete or not a BERT encoder"
        )
    if embedding != (hparams.vocab_size, hparams.hidden_size):
        raise GGUFSandboxError(
            f"{config}: vocab_size {hparams.vocab_size} and hidden_size {hparams.hidden_size}, but "
            f"{weights}'s {WORD_EMBEDDINGS} has shape {clip(str(list(embedding)))}; {disagree}"
        )
    layers = {match[1] for name in shapes if (match := LAYER_TENSOR.match(name))}
    if layers != {str(layer) for layer in range(hparams.num_hidden_layers)}:
        numbers = clip(", ".join(sorted(layers, key=lambda number: (len(number), number))))
        raise GGUFSandboxError(
            f"{config}: num_hidden_layers {hparams.num_hidden_layers}, but {weights} holds "
            f"{len(layers)} encoder layer(s) ({numbers or 'none'}); {disagree}"
        )


def _gguf_name(source: str, tensor_map: Any) -> str | None:
    """llama.cpp's BertModel.filter_tensors + map_tensor_name: the GGUF name, None when dropped."""
    name = source.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    if name in DROPPED_NAMES or name.startswith(DROPPED_PREFIXES):
        return None
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise GGUFSandboxError(
            f"tensor {source!r} has no llama.cpp bert name; the checkpoint is not a plain BERT encoder "
            f"(heads other than MLM/NSP/pooler cannot be converted)"
        )
    return str(mapped)


def plan_tensors(
    weights: Path, tensors: list[SourceTensor], hparams: BertHParams, spec: OutType
) -> list[PlannedTensor]:
    """Every output tensor, named, shaped and typed, from the safetensors header alone."""
    tensor_map = get_tensor_name_map(ARCH, hparams.num_hidden_layers)
    expected = bert_shapes(
        hidden=hparams.hidden_size,
        ffn=hparams.intermediate_size,
        vocab_size=hparams.vocab_size,
        context=hparams.max_position_embeddings,
        layers=hparams.num_hidden_layers,
        token_types=hparams.type_vocab_size,
    )
    plan: list[PlannedTensor] = []
    for source in tensors:
        name = _gguf_name(source.name, tensor_map)
        if name is None:
            continue
        if source.dtype not in ("F32", "F16", "F64"):
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} is {source.dtype}; only F32/F16/F64 checkpoints "
                f"can be converted without torch"
            )
        want = expected.get(name)
        if want is None:
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} maps to llama.cpp's {name}, which a plain BERT "
                f"encoder lacks; classification heads are not supported, convert the base encoder"
            )
        if source.shape != want:
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} ({name}) has shape {clip(str(list(source.shape)))}, "
                f"config.json implies {list(want)}; the weights and config.json disagree"
            )
        plan.append(PlannedTensor(source.name, name, source.shape, tensor_type(name, source.shape, spec)))
    missing = sorted(set(expected) - {tensor.name for tensor in plan})
    if missing:
        raise GGUFSandboxError(
            f"{weights} lacks {len(missing)} tensor(s) a BERT encoder needs, e.g. {', '.join(missing[:4])}; "
            f"the checkpoint is incomplete or not a BERT encoder"
        )
    return plan


def tensor_data(weights: Path, plan: list[PlannedTensor]) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes as GGUF stores them, reading one source tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as handle:
        for tensor in plan:
            with np.errstate(over="ignore"):  # an F64 value beyond float32 becomes inf, refused below
                data = np.ascontiguousarray(handle.get_tensor(tensor.source), dtype=np.float32)
            # NaN propagates through min and max and ±inf shows in them: two passes, no temporary array.
            if data.size and not (np.isfinite(data.min()) and np.isfinite(data.max())):
                raise GGUFSandboxError(
                    f"{weights}: tensor {tensor.source!r} holds NaN or infinite values (or F64 values beyond "
                    f"float32); the checkpoint is corrupt"
                )
            yield quantize(data, tensor.qtype)
