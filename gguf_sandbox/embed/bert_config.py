"""A BERT checkpoint's config.json: its architecture, and the bounded hyperparameters a GGUF header holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf_sandbox.embed.checkpoint_reads import json_field, read_json, shown
from gguf_sandbox.embed.layout import positive_float32
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.units import clip

DEFAULT_LAYER_NORM_EPS = 1e-12  # BertConfig's
CHECKPOINT_HINT = "pass the directory that holds config.json, model.safetensors and vocab.txt"
CONFIG_HINT = "fix the file"  # config.json cannot be removed
# Architectures llama.cpp converts as BertModel that carry no extra head we would have to map.
BERT_ARCHITECTURES = frozenset({"BertModel", "BertForMaskedLM"})
REQUIRED_HPARAMS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
)
# Upper bounds far above any released BERT encoder (BERT-large: 1,024 wide, 16 heads, 24 layers, 4,096 ffn,
# 512 positions; LaBSE: 501,153 tokens) that keep what is sized by them small — the token list (~70 bytes a
# token), the tensor-name map (~35 KB a layer) — and every count within the uint32 GGUF stores it in.
HPARAM_LIMITS: Mapping[str, int] = MappingProxyType(
    {
        "hidden_size": 1 << 16,
        "num_hidden_layers": 256,
        "num_attention_heads": 1 << 10,
        "intermediate_size": 1 << 18,
        "max_position_embeddings": 1 << 20,
        "vocab_size": 1 << 21,
        "type_vocab_size": 1 << 10,
    }
)


@dataclass(frozen=True)
class BertHParams:
    """The config.json fields the GGUF header needs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    type_vocab_size: int
    layer_norm_eps: float


def read_config(hf_dir: Path) -> dict[str, Any]:
    """config.json, if it names a BERT encoder (BertModel, BertForMaskedLM, or model_type bert)."""
    if not hf_dir.is_dir():
        raise GGUFSandboxError(f"{hf_dir} is not a directory; {CHECKPOINT_HINT}")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise GGUFSandboxError(
            f"{hf_dir} is not a Hugging Face checkpoint: config.json is missing; {CHECKPOINT_HINT}"
        )
    config: dict[str, Any] = read_json(path, CHECKPOINT_HINT)
    architectures = json_field(path, config, "architectures", list, hint=CONFIG_HINT) or []
    if not all(isinstance(name, str) for name in architectures):
        raise GGUFSandboxError(f"{path}: architectures must be an array of strings; {CONFIG_HINT}")
    model_type = json_field(path, config, "model_type", str, hint=CONFIG_HINT)
    if not (BERT_ARCHITECTURES & set(architectures)) and not (not architectures and model_type == "bert"):
        described = clip(", ".join(architectures)) if architectures else f"model_type {shown(model_type)}"
        raise GGUFSandboxError(
            f"{path}: architecture {described} is not a BERT encoder; only "
            f"{', '.join(sorted(BERT_ARCHITECTURES))} checkpoints (model_type 'bert') can be converted"
        )
    return config


def read_hparams(config: Mapping[str, Any], hf_dir: Path) -> BertHParams:
    """The counts, each bounded, and layer_norm_eps; absolute positions only."""
    path = hf_dir / "config.json"
    missing = [key for key in REQUIRED_HPARAMS if not _is_int(config.get(key))]
    if missing:
        raise GGUFSandboxError(
            f"{path}: missing or non-integer {', '.join(missing)}; a BERT config.json "
            f"defines {', '.join(REQUIRED_HPARAMS)}"
        )
    type_vocab_size = json_field(path, config, "type_vocab_size", int, 1, hint=CONFIG_HINT)
    counts = {**{key: config[key] for key in REQUIRED_HPARAMS}, "type_vocab_size": type_vocab_size}
    for key, value in counts.items():
        limit = HPARAM_LIMITS[key]
        if not 1 <= value <= limit:
            raise GGUFSandboxError(
                f"{path}: {key} {shown(value)} is out of range; a BERT encoder's is 1 to {limit:,}"
            )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise GGUFSandboxError(
            f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    positions = json_field(path, config, "position_embedding_type", str, "absolute", hint=CONFIG_HINT)
    if positions != "absolute":
        raise GGUFSandboxError(
            f"{path}: position_embedding_type {shown(positions)} is not supported; llama.cpp's bert "
            f"architecture has absolute position embeddings only"
        )
    return BertHParams(
        hidden_size=hidden,
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        vocab_size=config["vocab_size"],
        type_vocab_size=type_vocab_size,
        layer_norm_eps=_layer_norm_eps(path, config),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_norm_eps(path: Path, config: Mapping[str, Any]) -> float:
    """layer_norm_eps as the float32 GGUF stores: finite and > 0 (`embed` refuses any other)."""
    key = next((k for k in ("layer_norm_eps", "layer_norm_epsilon") if k in config), "layer_norm_eps")
    value = config.get(key, DEFAULT_LAYER_NORM_EPS)
    number = positive_float32(value)
    if number is None:
        raise GGUFSandboxError(
            f"{path}: {key} is {shown(value)}; it must be a finite positive number that float32 can hold "
            f"(BERT's is {DEFAULT_LAYER_NORM_EPS})"
        )
    return number
