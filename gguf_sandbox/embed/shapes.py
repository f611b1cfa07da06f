"""A BERT model's shape from its GGUF metadata: its config, the tensors it must hold and their shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
from gguf.constants import Keys

from gguf_sandbox.embed.bert import BertConfig, Pooling
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo

SUPPORTED_ARCHITECTURES: Final = ("bert",)
TABLES: Final = ("token_embd.weight", "position_embd.weight", "token_types.weight")
MATRICES: Final = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")
NORMS: Final = ("attn_output_norm", "layer_output_norm")
# Tensors of one encoder layer: a weight and a bias per matrix and per layer norm.
TENSORS_PER_LAYER: Final = 2 * (len(MATRICES) + len(NORMS))
DEFAULT_LAYER_NORM_EPS: Final = 1e-12


def _int_key(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    value = gguf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        found = "missing" if value is None else f"{value!r}"
        raise GGUFError(f"{gguf.path.name}: metadata {key} is {found}; a BERT GGUF needs it as an integer")
    return value


def _check_layer_count(gguf: GGUFFile, key: str, layers: int) -> None:
    """block_count against the tensor table, before anything is sized by it (2^31 layers would be 2^35
    tensor names)."""
    most = len(gguf.tensors) // TENSORS_PER_LAYER
    if layers > most:
        raise GGUFError(
            f"{gguf.path.name}: metadata {key} is {layers:,}, but its {len(gguf.tensors):,} tensors hold at "
            f"most {most:,} layers of {TENSORS_PER_LAYER}; the file is inconsistent or hostile"
        )
    beyond = f"blk.{layers}."
    extra = next((name for name in gguf.tensors if name.startswith(beyond)), None)
    if extra is not None:
        raise GGUFError(
            f"{gguf.path.name}: tensor {extra} belongs to a layer past {key} = {layers}; the file is "
            f"inconsistent, re-convert it"
        )


def _epsilon(gguf: GGUFFile, arch: str) -> float:
    """layer_norm_epsilon as the float32 the forward pass adds: finite and positive, else refused."""
    key = f"{arch}.attention.layer_norm_epsilon"
    value = gguf.get(key, DEFAULT_LAYER_NORM_EPS)
    eps = np.float32(np.nan)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with np.errstate(over="ignore"):  # GGUF numbers are at most 64 bits: float() cannot overflow
            eps = np.float32(float(value))
    if not 0 < eps < np.inf:
        raise GGUFError(
            f"{gguf.path.name}: metadata {key} is {value!r}; layer norm needs a finite positive epsilon "
            f"that float32 can hold (e.g. {DEFAULT_LAYER_NORM_EPS})"
        )
    return float(eps)


def _pooling(gguf: GGUFFile, arch: str) -> Pooling:
    key = f"{arch}.pooling_type"
    raw = _int_key(gguf, key, int(Pooling.MEAN))
    try:
        return Pooling(raw)
    except ValueError:
        supported = ", ".join(p.name for p in Pooling if p is not Pooling.NONE)
        raise GGUFError(f"{gguf.path.name}: {key} {raw} is not supported (supported: {supported})") from None


def _check_vocabulary(gguf: GGUFFile, token_table: TensorInfo) -> None:
    """Every token id must have a row in token_embd (a padded table may have more rows than tokens)."""
    tokens = gguf.get(Keys.Tokenizer.LIST)
    count = len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else 0
    if count > token_table.n_rows:
        raise GGUFError(
            f"{gguf.path.name}: {Keys.Tokenizer.LIST} has {count:,} tokens but token_embd.weight only "
            f"{token_table.n_rows:,} rows; the file is inconsistent, re-convert it"
        )


def read_config(gguf: GGUFFile) -> BertConfig:
    """The encoder's shape from the GGUF metadata, checked against the tensor table; refuses non-BERTs.

    Every count is checked against what the file holds before anything is sized by it: the tensors outside
    the layers against the metadata, block_count against the tensor table, then each layer's tensors.
    """
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{gguf.path.name}: architecture {arch!r} is not supported by the embedding engine (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); convert a BERT checkpoint with `gguf-sandbox convert`"
        )
    token_table = gguf.tensor("token_embd.weight")
    _check_vocabulary(gguf, token_table)
    try:
        config = BertConfig(
            vocab_size=token_table.n_rows,
            hidden=_int_key(gguf, f"{arch}.embedding_length"),
            layers=_int_key(gguf, f"{arch}.block_count"),
            heads=_int_key(gguf, f"{arch}.attention.head_count"),
            ffn=_int_key(gguf, f"{arch}.feed_forward_length"),
            context_length=_int_key(gguf, f"{arch}.context_length"),
            layer_norm_eps=_epsilon(gguf, arch),
            pooling=_pooling(gguf, arch),
            has_token_types="token_types.weight" in gguf.tensors,
        )
    except GGUFError as error:
        message = str(error)
        prefix = f"{gguf.path.name}: "
        raise GGUFError(message if message.startswith(prefix) else prefix + message) from None
    _check_shapes(gguf, config, _outer_shapes(config))
    _check_layer_count(gguf, f"{arch}.block_count", config.layers)
    for layer in range(config.layers):
        _check_shapes(gguf, config, layer_shapes(config.hidden, config.ffn, layer))
    return config


def layer_shapes(hidden: int, ffn: int, layer: int) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor of one BERT encoder layer, in llama.cpp's file order."""
    per_part = {
        "attn_q": (hidden, hidden),
        "attn_k": (hidden, hidden),
        "attn_v": (hidden, hidden),
        "attn_output": (hidden, hidden),
        "attn_output_norm": (hidden,),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
        "layer_output_norm": (hidden,),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for part, shape in per_part.items():
        shapes[f"blk.{layer}.{part}.weight"] = shape
        shapes[f"blk.{layer}.{part}.bias"] = (shape[0],)
    return shapes


def bert_shapes(
    *, hidden: int, ffn: int, vocab_size: int, context: int, layers: int, token_types: int | None
) -> dict[str, tuple[int, ...]]:
    """The one BERT tensor table: numpy shape of every tensor of a BERT GGUF, in llama.cpp's file order
    (what convert writes, synth makes and the reader checks). token_types: None when the model has no
    token type table, -1 when any count is accepted."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab_size, hidden),
        "position_embd.weight": (context, hidden),
    }
    if token_types is not None:
        shapes["token_types.weight"] = (token_types, hidden)
    shapes["token_embd_norm.weight"] = (hidden,)
    shapes["token_embd_norm.bias"] = (hidden,)
    for layer in range(layers):
        shapes.update(layer_shapes(hidden, ffn, layer))
    return shapes


def _outer_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor outside the encoder layers (-1: any size)."""
    return bert_shapes(
        hidden=config.hidden,
        ffn=config.ffn,
        vocab_size=config.vocab_size,
        context=config.context_length,
        layers=0,
        token_types=-1 if config.has_token_types else None,
    )


def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor the forward pass reads (for a config read_config has checked)."""
    return bert_shapes(
        hidden=config.hidden,
        ffn=config.ffn,
        vocab_size=config.vocab_size,
        context=config.context_length,
        layers=config.layers,
        token_types=-1 if config.has_token_types else None,
    )


def _check_shapes(gguf: GGUFFile, config: BertConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        actual = gguf.tensor(name).shape
        if len(actual) != len(shape) or any(e not in (-1, a) for e, a in zip(shape, actual, strict=True)):
            raise GGUFError(
                f"{gguf.path.name}: tensor {name} has shape {actual}, expected {shape} from the metadata "
                f"(hidden {config.hidden}, ffn {config.ffn}, context {config.context_length}); the file is "
                f"inconsistent, re-convert it"
            )
