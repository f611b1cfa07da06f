"""A decoder model's shape from its GGUF metadata (llama, qwen2, qwen3, gemma3): config and tensor table.

What differs between the architectures is one row of ARCHITECTURES (how llama.cpp builds each graph);
what the file states (sizes, heads, rope base, window, pooling, causal) is read and checked against
the tensor table before anything is sized by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from gguf.constants import Keys

from gguf_sandbox.embed.bert import Pooling
from gguf_sandbox.embed.decoder import DEFAULT_SEQUENCE_LIMIT, Activation, DecoderConfig, RopeStyle
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

TABLES: Final = ("token_embd.weight",)
MATRICES: Final = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
DEFAULT_RMS_EPS: Final = 1e-5
DEFAULT_ROPE_BASE: Final = 10000.0


@dataclass(frozen=True)
class Traits:
    """What llama.cpp's graph of an architecture does that its metadata does not say."""

    rope: RopeStyle
    activation: Activation = Activation.SILU
    qk_norm: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False  # by sqrt(hidden)
    # Sliding-window layers when the file names a window: every n-th layer global (gemma3: 6). 0: the
    # architecture has none, and llama.cpp ignores a window key in its files (qwen2's HF config has one).
    global_every: int = 0
    local_rope_base: float = 0.0  # rope base of sliding layers


ARCHITECTURES: Mapping[str, Traits] = MappingProxyType(
    {
        "llama": Traits(RopeStyle.NORM),
        "qwen2": Traits(RopeStyle.NEOX),
        "qwen3": Traits(RopeStyle.NEOX, qk_norm=True),
        "gemma3": Traits(
            RopeStyle.NEOX,
            Activation.GELU_TANH,
            qk_norm=True,
            post_norms=True,
            scale_embeddings=True,
            global_every=6,
            local_rope_base=10000.0,
        ),
    }
)
# Rope scalings the forward pass computes; llama.cpp's others (yarn, longrope) are refused by name.
ROPE_SCALINGS: Final = ("none", "linear")


def layer_shapes(config: DecoderConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor of one decoder layer ([out, in] for matrices)."""
    h, q, kv, f, d = config.hidden, config.query_width, config.kv_width, config.ffn, config.head_dim
    prefix = f"blk.{layer}"
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.attn_norm.weight": (h,),
        f"{prefix}.attn_q.weight": (q, h),
        f"{prefix}.attn_k.weight": (kv, h),
        f"{prefix}.attn_v.weight": (kv, h),
        f"{prefix}.attn_output.weight": (h, q),
    }
    if config.attention_bias:
        shapes |= {
            f"{prefix}.attn_q.bias": (q,),
            f"{prefix}.attn_k.bias": (kv,),
            f"{prefix}.attn_v.bias": (kv,),
        }
    if config.qk_norm:
        shapes |= {f"{prefix}.attn_q_norm.weight": (d,), f"{prefix}.attn_k_norm.weight": (d,)}
    if config.post_norms:
        shapes[f"{prefix}.post_attention_norm.weight"] = (h,)
    shapes |= {
        f"{prefix}.ffn_norm.weight": (h,),
        f"{prefix}.ffn_gate.weight": (f, h),
        f"{prefix}.ffn_up.weight": (f, h),
        f"{prefix}.ffn_down.weight": (h, f),
    }
    if config.post_norms:
        shapes[f"{prefix}.post_ffw_norm.weight"] = (h,)
    return shapes


def outer_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """The tensors outside the layers; an LM head (output.weight), if any, is never read."""
    return {"token_embd.weight": (config.vocab_size, config.hidden), "output_norm.weight": (config.hidden,)}


def decoder_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor the forward pass reads."""
    shapes = outer_shapes(config)
    for layer in range(config.layers):
        shapes |= layer_shapes(config, layer)
    return shapes


def _rope_scale(gguf: GGUFFile, arch: str) -> None:
    kind = gguf.get(Keys.Rope.SCALING_TYPE.format(arch=arch), "none")
    factor = gguf.get(Keys.Rope.SCALING_FACTOR.format(arch=arch), 1.0)
    if kind not in ROPE_SCALINGS or (kind == "linear" and factor != 1.0):
        raise GGUFError(
            f"{gguf.path.name}: rope scaling {kind!r} is not supported by the embedding engine (it runs "
            f"texts of up to {DEFAULT_SEQUENCE_LIMIT} tokens without scaling)"
        )


def read_config(gguf: GGUFFile) -> DecoderConfig:
    """The decoder's config from the metadata and its architecture's traits, checked for consistency."""
    arch = gguf.architecture
    traits = ARCHITECTURES.get(arch or "")
    if arch is None or traits is None:
        raise GGUFError(
            f"{gguf.path.name}: architecture {arch!r} is not a decoder the engine runs (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    token_table = gguf.tensor("token_embd.weight")
    check_vocabulary(gguf, token_table)
    try:
        hidden = int_key(gguf, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
        heads = int_key(gguf, Keys.Attention.HEAD_COUNT.format(arch=arch))
        head_dim = int_key(gguf, Keys.Attention.KEY_LENGTH.format(arch=arch), hidden // max(heads, 1))
        value_dim = int_key(gguf, Keys.Attention.VALUE_LENGTH.format(arch=arch), head_dim)
        if value_dim != head_dim:
            raise GGUFError(f"key length {head_dim} and value length {value_dim} differ; not supported")
        trained = int_key(gguf, Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
        window = int_key(gguf, Keys.Attention.SLIDING_WINDOW.format(arch=arch), 0)
        if window < 0:
            raise GGUFError(
                f"metadata {Keys.Attention.SLIDING_WINDOW.format(arch=arch)} is {window}; a window is never "
                f"negative (0: none)"
            )
        causal = gguf.get(Keys.Attention.CAUSAL.format(arch=arch), True)
        if not isinstance(causal, bool):
            raise GGUFError(f"metadata {Keys.Attention.CAUSAL.format(arch=arch)} is {causal!r}, not a bool")
        _rope_scale(gguf, arch)
        config = DecoderConfig(
            architecture=arch,
            vocab_size=token_table.n_rows,
            hidden=hidden,
            layers=int_key(gguf, Keys.LLM.BLOCK_COUNT.format(arch=arch)),
            heads=heads,
            kv_heads=int_key(gguf, Keys.Attention.HEAD_COUNT_KV.format(arch=arch), heads),
            head_dim=head_dim,
            ffn=int_key(gguf, Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)),
            context_length=min(trained, DEFAULT_SEQUENCE_LIMIT),
            trained_context=trained,
            rms_eps=float_key(gguf, Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), DEFAULT_RMS_EPS),
            rope=traits.rope,
            rope_dims=int_key(gguf, Keys.Rope.DIMENSION_COUNT.format(arch=arch), head_dim),
            rope_base=float_key(gguf, Keys.Rope.FREQ_BASE.format(arch=arch), DEFAULT_ROPE_BASE),
            activation=traits.activation,
            causal=causal,
            pooling=read_pooling(gguf, arch, Pooling.LAST if causal else Pooling.MEAN),
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            qk_norm=traits.qk_norm,
            post_norms=traits.post_norms,
            embedding_scale=math.sqrt(hidden) if traits.scale_embeddings else 1.0,
            sliding_window=window if traits.global_every else 0,
            global_every=traits.global_every,
            local_rope_base=traits.local_rope_base,
        )
    except GGUFError as error:
        raise prefixed(gguf, error) from None
    where = f"{arch}: hidden {config.hidden}, heads {config.heads}/{config.kv_heads} of {config.head_dim}"
    check_shapes(gguf, outer_shapes(config), where)
    check_layer_count(gguf, Keys.LLM.BLOCK_COUNT.format(arch=arch), config.layers, len(MATRICES) + 2)
    expected: dict[str, tuple[int, ...]] = {}
    for layer in range(config.layers):
        shapes = layer_shapes(config, layer)
        check_shapes(gguf, shapes, where)
        expected |= shapes
    # A layer tensor the graph does not read (a bias on one layer only, a k bias without a q bias) would be
    # silently skipped: llama.cpp refuses such a file (wrong number of tensors), and so does the engine.
    unread = next((name for name in gguf.tensors if name.startswith("blk.") and name not in expected), None)
    if unread is not None:
        raise GGUFError(
            f"{gguf.path.name}: tensor {unread} is not one the {arch} graph reads ({where}); the file is "
            f"inconsistent, re-convert it"
        )
    return config


def read_layout(gguf: GGUFFile) -> ModelLayout:
    """The decoder model of a file: its checked config and tensors by role."""
    config = read_config(gguf)
    shapes = decoder_shapes(config)
    matrices = frozenset(
        name for name in shapes if name.endswith(".weight") and name.split(".")[-2] in MATRICES
    )
    return ModelLayout(config, shapes, frozenset(TABLES), matrices)
