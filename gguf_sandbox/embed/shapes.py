"""A BERT model's shape from its GGUF metadata: its config, the tensors it must hold and their shapes."""

from __future__ import annotations

from typing import Final

from gguf_sandbox.embed.bert import BertConfig, Pooling
from gguf_sandbox.embed.layout import (
    ModelLayout,
    check_layer_count,
    check_shapes,
    check_vocabulary,
    float_key,
    int_key,
    prefixed,
    read_pooling,
)
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile

SUPPORTED_ARCHITECTURES: Final = ("bert",)
TABLES: Final = ("token_embd.weight", "position_embd.weight", "token_types.weight")
MATRICES: Final = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")
NORMS: Final = ("attn_output_norm", "layer_output_norm")
# Tensors of one encoder layer: a weight and a bias per matrix and per layer norm.
TENSORS_PER_LAYER: Final = 2 * (len(MATRICES) + len(NORMS))
DEFAULT_LAYER_NORM_EPS: Final = 1e-12


def _epsilon(gguf: GGUFFile, arch: str) -> float:
    """layer_norm_epsilon as the float32 the forward pass adds: finite and positive, else refused."""
    return float_key(gguf, f"{arch}.attention.layer_norm_epsilon", DEFAULT_LAYER_NORM_EPS)


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
    check_vocabulary(gguf, token_table)
    try:
        config = BertConfig(
            vocab_size=token_table.n_rows,
            hidden=int_key(gguf, f"{arch}.embedding_length"),
            layers=int_key(gguf, f"{arch}.block_count"),
            heads=int_key(gguf, f"{arch}.attention.head_count"),
            ffn=int_key(gguf, f"{arch}.feed_forward_length"),
            context_length=int_key(gguf, f"{arch}.context_length"),
            layer_norm_eps=_epsilon(gguf, arch),
            pooling=read_pooling(gguf, arch, Pooling.MEAN),
            has_token_types="token_types.weight" in gguf.tensors,
        )
    except GGUFError as error:
        raise prefixed(gguf, error) from None
    where = f"hidden {config.hidden}, ffn {config.ffn}, context {config.context_length}"
    check_shapes(gguf, _outer_shapes(config), where)
    check_layer_count(gguf, f"{arch}.block_count", config.layers, TENSORS_PER_LAYER)
    for layer in range(config.layers):
        check_shapes(gguf, layer_shapes(config.hidden, config.ffn, layer), where)
    return config


def read_layout(gguf: GGUFFile) -> ModelLayout:
    """The BERT model of a file: its checked config and tensors by role."""
    config = read_config(gguf)
    shapes = expected_shapes(config)
    matrices = frozenset(name for name in shapes if is_matrix(name))
    return ModelLayout(config, shapes, frozenset(n for n in TABLES if n in shapes), matrices)


def is_matrix(name: str) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and name.split(".")[2] in MATRICES


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
