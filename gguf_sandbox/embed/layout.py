"""What plans and weights know of any model: its tensors by role, and the metadata checks every family shares.

A ModelLayout names every tensor a forward pass reads with its numpy shape, and which of them are looked up
by row (tables) or multiplied block by block (matrices); the rest are vectors, always decoded. BERT
(shapes.py) and the decoders (decoder_shapes.py) build one from the file after checking it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from gguf.constants import Keys

from gguf_sandbox.embed.bert import Pooling
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo


class ModelConfig(Protocol):
    """What planning needs of a model's config (BertConfig, DecoderConfig)."""

    @property
    def hidden(self) -> int: ...

    @property
    def layers(self) -> int: ...

    @property
    def context_length(self) -> int:
        """Tokens per text the engine runs (longer texts are cut)."""
        ...

    @property
    def pooling(self) -> Pooling: ...

    @property
    def widest(self) -> int: ...

    @property
    def row_bytes(self) -> int:
        """Activation bytes one token row needs at the peak of a layer."""
        ...

    @property
    def column_slabs(self) -> tuple[int, int, int]:
        """(rows, row length, slab width) of the largest weight a pass reads column slab by column slab;
        (0, 0, 0): none."""
        ...


@dataclass(frozen=True)
class ModelLayout:
    """A checked model: its config and every tensor its forward pass reads, by role."""

    config: Any  # the family's config (BertConfig, DecoderConfig): its forward pass reads it
    shapes: Mapping[str, tuple[int, ...]]
    tables: frozenset[str]
    matrices: frozenset[str]

    @property
    def model(self) -> ModelConfig:
        config: ModelConfig = self.config
        return config


def int_key(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    """An integer metadata value (booleans are not integers here), else a GGUFError naming the key."""
    value = gguf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        found = "missing" if value is None else f"{value!r}"
        raise GGUFError(f"{gguf.path.name}: metadata {key} is {found}; the model needs it as an integer")
    return value


def float_key(gguf: GGUFFile, key: str, default: float) -> float:
    """A finite positive number as float32 holds it, else a GGUFError naming the key."""
    value = gguf.get(key, default)
    number = positive_float32(value)
    if number is None:
        raise GGUFError(
            f"{gguf.path.name}: metadata {key} is {value!r}; it must be a finite positive number that "
            f"float32 can hold (e.g. {default})"
        )
    return number


def positive_float32(value: object) -> float | None:
    """`value` as float32 holds it when it is a finite positive number there (an epsilon, a scale), else
    None: true/false, NaN, ±inf, ≤ 0, or beyond float32 either way (1e-50 becomes 0, 1e39 inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        with np.errstate(over="ignore"):
            number = np.float32(float(value))
    except OverflowError:  # an int beyond float64, such as JSON's 10**400
        return None
    return float(number) if 0 < number < np.inf else None


def read_pooling(gguf: GGUFFile, arch: str, default: Pooling) -> Pooling:
    """{arch}.pooling_type when present, else `default`; NONE and unknown values are refused by name."""
    key = Keys.LLM.POOLING_TYPE.format(arch=arch)
    raw = int_key(gguf, key, int(default))
    try:
        return Pooling(raw)
    except ValueError:
        supported = ", ".join(p.name for p in Pooling if p is not Pooling.NONE)
        raise GGUFError(f"{gguf.path.name}: {key} {raw} is not supported (supported: {supported})") from None


def check_vocabulary(gguf: GGUFFile, token_table: TensorInfo) -> None:
    """Every token id must have a row in token_embd (a padded table may have more rows than tokens)."""
    tokens = gguf.get(Keys.Tokenizer.LIST)
    count = len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else 0
    if count > token_table.n_rows:
        raise GGUFError(
            f"{gguf.path.name}: {Keys.Tokenizer.LIST} has {count:,} tokens but token_embd.weight only "
            f"{token_table.n_rows:,} rows; the file is inconsistent, re-convert it"
        )


def check_layer_count(gguf: GGUFFile, key: str, layers: int, per_layer: int) -> None:
    """block_count against the tensor table, before anything is sized by it (2^31 layers would be 2^35
    tensor names)."""
    most = len(gguf.tensors) // per_layer
    if layers > most:
        raise GGUFError(
            f"{gguf.path.name}: metadata {key} is {layers:,}, but its {len(gguf.tensors):,} tensors hold at "
            f"most {most:,} layers of {per_layer}; the file is inconsistent or hostile"
        )
    beyond = f"blk.{layers}."
    extra = next((name for name in gguf.tensors if name.startswith(beyond)), None)
    if extra is not None:
        raise GGUFError(
            f"{gguf.path.name}: tensor {extra} belongs to a layer past {key} = {layers}; the file is "
            f"inconsistent, re-convert it"
        )


def check_shapes(gguf: GGUFFile, shapes: Mapping[str, tuple[int, ...]], context: str) -> None:
    """Every named tensor exists with the expected shape (-1: any size); `context` says where it came from."""
    for name, shape in shapes.items():
        actual = gguf.tensor(name).shape
        if len(actual) != len(shape) or any(e not in (-1, a) for e, a in zip(shape, actual, strict=True)):
            raise GGUFError(
                f"{gguf.path.name}: tensor {name} has shape {actual}, expected {shape} from the metadata "
                f"({context}); the file is inconsistent, re-convert it"
            )


def prefixed(gguf: GGUFFile, error: GGUFError) -> GGUFError:
    """`error` with the file's name in front, once."""
    message, prefix = str(error), f"{gguf.path.name}: "
    return GGUFError(message if message.startswith(prefix) else prefix + message)
