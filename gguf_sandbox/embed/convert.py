"""Hugging Face BERT checkpoint → GGUF, the way llama.cpp's convert_hf_to_gguf.py writes BertModel."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_VERSION, MODEL_ARCH_NAMES

from gguf_sandbox.atomic import path_argument
from gguf_sandbox.embed.bert_config import BertHParams, read_config, read_hparams
from gguf_sandbox.embed.checkpoint_reads import require_utf8
from gguf_sandbox.embed.checkpoint_tensors import (
    ARCH,
    SAFETENSORS,
    check_counts,
    plan_tensors,
    read_header,
    tensor_data,
)
from gguf_sandbox.embed.checkpoint_vocab import add_vocabulary, read_tokenizer_files, read_vocabulary
from gguf_sandbox.embed.convert_output import check_out, write_replacing
from gguf_sandbox.embed.convert_types import OUT_TYPES, OutType
from gguf_sandbox.embed.sentence_bert import max_seq_length, pooling_dir, pooling_type
from gguf_sandbox.embed.tokenizer import KEY_MAX_SEQ_LENGTH
from gguf_sandbox.errors import GGUFSandboxError

# Every file of the checkpoint convert reads besides the pooling config (whose folder modules.json names).
CHECKPOINT_FILES = (
    "config.json",
    SAFETENSORS,
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
)


def convert(hf_dir: Path, out: Path, out_type: str = "f16", *, name: str | None = None) -> None:
    """Write `out` as a llama.cpp-style GGUF of the BERT checkpoint in `hf_dir`, weights as `out_type`.

    `out` must be absent or an earlier GGUF, and no file of the checkpoint (anything else is refused, never
    replaced); it may be inside `hf_dir`. Tensors are read one at a time and streamed to the file; a
    failure leaves no partial `out`.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    spec = OUT_TYPES.get(str(out_type).lower())
    if spec is None:
        raise GGUFSandboxError(f"unknown output type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    config = read_config(hf_dir)
    pooling = pooling_dir(hf_dir)
    inputs = (*(hf_dir / file_name for file_name in CHECKPOINT_FILES), pooling / "config.json")
    check_out(out, inputs)
    hparams = read_hparams(config, hf_dir)
    weights = hf_dir / SAFETENSORS
    tensors = read_header(weights)
    check_counts(hparams, tensors, hf_dir)
    files = read_tokenizer_files(hf_dir)
    vocabulary = read_vocabulary(hf_dir, hparams, files)
    plan = plan_tensors(weights, tensors, hparams, spec)

    writer = GGUFWriter(path=None, arch=MODEL_ARCH_NAMES[ARCH])
    _add_model(writer, hparams, spec=spec, name=_name(name, hf_dir), pooling=pooling)
    writer.add_token_type_count(hparams.type_vocab_size)
    add_vocabulary(writer, hf_dir, config=config, files=files, vocabulary=vocabulary)
    # Our own key, sentence-transformers' truncation length, which llama.cpp ignores.
    truncation = max_seq_length(hf_dir)
    if truncation is not None:
        writer.add_uint32(KEY_MAX_SEQ_LENGTH, min(truncation, hparams.max_position_embeddings))
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, tensor.qtype)
    write_replacing(out, inputs, writer, tensor_data(weights, plan))


def _add_model(writer: GGUFWriter, hparams: BertHParams, *, spec: OutType, name: str, pooling: Path) -> None:
    """The general.* and bert.* keys of llama.cpp's BERT GGUF."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(spec.file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_block_count(hparams.num_hidden_layers)
    writer.add_context_length(hparams.max_position_embeddings)
    writer.add_embedding_length(hparams.hidden_size)
    writer.add_feed_forward_length(hparams.intermediate_size)
    writer.add_head_count(hparams.num_attention_heads)
    writer.add_layer_norm_eps(hparams.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling_type(pooling))


def _name(name: str | None, hf_dir: Path) -> str:
    """general.name: --name (UTF-8, as GGUF strings are), else the checkpoint's folder name."""
    if name:
        require_utf8("--name", name, "pass a name in UTF-8")
        return name
    resolved = hf_dir.resolve()
    # A model shipped inside a Python package often sits in a folder called "model".
    folder = resolved.parent.name if resolved.name == "model" and resolved.parent.name else resolved.name
    return folder.encode("utf-8", "replace").decode("utf-8")  # bytes of a non-UTF-8 name become "?"


# -- command line ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="checkpoint directory: config.json, model.safetensors, vocab.txt (+ sentence-transformers)",
    )
    parser.add_argument(
        "out",
        metavar="OUT.gguf",
        help="GGUF file to write, e.g. HF_DIR/model.gguf (an earlier GGUF is replaced; any other file and "
        "the checkpoint's own files are refused)",
    )
    parser.add_argument(
        "--type",
        dest="out_type",
        choices=list(OUT_TYPES),
        default="f16",
        help="storage type of the weight matrices (default: f16): "
        + "; ".join(f"{name} = {spec.describe()}" for name, spec in OUT_TYPES.items()),
    )
    parser.add_argument("--name", default=None, help="general.name to record (default: the directory name)")


def run(args: argparse.Namespace) -> int:
    out = path_argument(args.out, "OUT")
    convert(path_argument(args.hf_dir, "HF_DIR"), out, args.out_type, name=args.name)
    # A path's non-UTF-8 bytes as \xNN: a UTF-8 stdout cannot print them as they are.
    shown = os.fsencode(out).decode("utf-8", "backslashreplace")
    print(f"wrote {shown} ({out.stat().st_size:,} bytes, {args.out_type})")
    return 0
