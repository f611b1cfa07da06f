"""Deterministic synthetic decoder GGUFs (llama, qwen2, qwen3, gemma3) that llama.cpp loads, streamed out."""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGUFWriter
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    LlamaFileType,
    TokenType,
)

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.synth_quant import RANDOM_TYPES, random_pieces
from gguf_sandbox.gguf.writer import TensorPlan, write_streamed
from gguf_sandbox.tokenizers.bpe import BYTE_TO_CHAR

F32 = GGMLQuantizationType.F32
WEIGHT_STD = 0.02  # of every matrix, like a trained model's init; norms are ~1, biases ~0.02


class Role(enum.Enum):
    """What a tensor is, which decides its storage type and its values."""

    EMBEDDING = "embedding"  # token_embd: embedding_type
    MATRIX = "matrix"  # tensor_type
    SENSITIVE = "sensitive"  # attn_v, ffn_down: sensitive_type on llama.cpp's "use more bits" layers
    NORM = "norm"  # F32, ~1
    BIAS = "bias"  # F32, ~0


@dataclass(frozen=True)
class LayerTensor:
    """One per-layer tensor of an architecture: its gguf-py tensor, suffix, numpy shape and role."""

    tensor: MODEL_TENSOR
    suffix: str
    shape: Callable[[SyntheticDecoder], tuple[int, ...]]
    role: Role


def _layer(
    tensor: MODEL_TENSOR, shape: Callable[[SyntheticDecoder], tuple[int, ...]], role: Role
) -> LayerTensor:
    return LayerTensor(tensor, "bias" if role is Role.BIAS else "weight", shape, role)


# What llama.cpp's llama/qwen2/qwen3/gemma3 graphs read per layer (numpy shapes: output rows first).
_COMMON = (
    _layer(MODEL_TENSOR.ATTN_NORM, lambda s: (s.hidden,), Role.NORM),
    _layer(MODEL_TENSOR.ATTN_Q, lambda s: (s.heads * s.head_dim, s.hidden), Role.MATRIX),
    _layer(MODEL_TENSOR.ATTN_K, lambda s: (s.kv_heads * s.head_dim, s.hidden), Role.MATRIX),
    _layer(MODEL_TENSOR.ATTN_V, lambda s: (s.kv_heads * s.head_dim, s.hidden), Role.SENSITIVE),
    _layer(MODEL_TENSOR.ATTN_OUT, lambda s: (s.hidden, s.heads * s.head_dim), Role.MATRIX),
    _layer(MODEL_TENSOR.FFN_NORM, lambda s: (s.hidden,), Role.NORM),
    _layer(MODEL_TENSOR.FFN_GATE, lambda s: (s.ffn, s.hidden), Role.MATRIX),
    _layer(MODEL_TENSOR.FFN_UP, lambda s: (s.ffn, s.hidden), Role.MATRIX),
    _layer(MODEL_TENSOR.FFN_DOWN, lambda s: (s.hidden, s.ffn), Role.SENSITIVE),
)
_QK_NORMS = (
    _layer(MODEL_TENSOR.ATTN_Q_NORM, lambda s: (s.head_dim,), Role.NORM),
    _layer(MODEL_TENSOR.ATTN_K_NORM, lambda s: (s.head_dim,), Role.NORM),
)
_BIASES = (
    _layer(MODEL_TENSOR.ATTN_Q, lambda s: (s.heads * s.head_dim,), Role.BIAS),
    _layer(MODEL_TENSOR.ATTN_K, lambda s: (s.kv_heads * s.head_dim,), Role.BIAS),
    _layer(MODEL_TENSOR.ATTN_V, lambda s: (s.kv_heads * s.head_dim,), Role.BIAS),
)
_POST_NORMS = (
    _layer(MODEL_TENSOR.ATTN_POST_NORM, lambda s: (s.hidden,), Role.NORM),
    _layer(MODEL_TENSOR.FFN_POST_NORM, lambda s: (s.hidden,), Role.NORM),
)
ARCH_LAYERS: Mapping[MODEL_ARCH, tuple[LayerTensor, ...]] = MappingProxyType(
    {
        MODEL_ARCH.LLAMA: _COMMON,
        MODEL_ARCH.QWEN2: (*_COMMON, *_BIASES),
        MODEL_ARCH.QWEN3: (*_COMMON, *_QK_NORMS),
        MODEL_ARCH.GEMMA3: (*_COMMON, *_QK_NORMS, *_POST_NORMS),
    }
)
ARCHITECTURES: Mapping[str, MODEL_ARCH] = MappingProxyType({MODEL_ARCH_NAMES[a]: a for a in ARCH_LAYERS})
# general.file_type by matrix type, as llama.cpp's quantizer would record it (K-quants: the _M mixes).
FILE_TYPES: Mapping[GGMLQuantizationType, LlamaFileType] = MappingProxyType(
    {
        GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
        GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
        GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
        GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
        GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
        GGMLQuantizationType.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
        GGMLQuantizationType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
    }
)


@dataclass(frozen=True)
class SyntheticDecoder:
    """Shape and storage of a synthetic decoder; the same spec always yields the same bytes."""

    architecture: str = "qwen2"
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 384
    context_length: int = 4096
    rope_freq_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    tensor_type: GGMLQuantizationType = GGMLQuantizationType.Q8_0
    # attn_v and ffn_down on the layers llama.cpp's Q4_K_M gives more bits (None: tensor_type everywhere).
    sensitive_type: GGMLQuantizationType | None = None
    embedding_type: GGMLQuantizationType | None = None  # token_embd (None: tensor_type)
    sliding_window: int = 512  # gemma3's local-attention window
    seed: int = 0
    name: str = "synthetic-decoder"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        counts = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "context_length")
        for field in counts:
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if field == "layers" else 1)
            ):
                raise GGUFError(f"{field} must be a positive whole number, got {value!r}")
        if self.heads % self.kv_heads:
            raise GGUFError(f"{self.heads} query heads cannot share {self.kv_heads} KV heads evenly")
        if not (math.isfinite(self.rope_freq_base) and self.rope_freq_base > 0):
            raise GGUFError(f"rope_freq_base must be finite and positive, got {self.rope_freq_base!r}")
        if not (math.isfinite(self.rms_eps) and 0 < self.rms_eps < 1):
            raise GGUFError(f"rms_eps must be in (0, 1), got {self.rms_eps!r}")
        for qtype in (self.tensor_type, self.sensitive_type, self.embedding_type):
            if qtype is not None and qtype not in RANDOM_TYPES:
                names = ", ".join(sorted(t.name for t in RANDOM_TYPES))
                raise GGUFError(f"cannot synthesize {qtype.name} tensors; choose one of {names}")
        for plan in self._layer_plans(0, sensitive=True):
            _check_rows(plan)
        _check_rows(self._embedding_plan())
        if self.vocab_size < MIN_VOCAB:
            raise GGUFError(f"vocab_size {self.vocab_size} is too small; the tokenizer needs {MIN_VOCAB}")

    def sensitive(self, layer: int) -> bool:
        """llama.cpp's use_more_bits(): the first and last eighth of the layers and every third between."""
        n = self.layers
        return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2

    def _type(self, role: Role, sensitive: bool) -> GGMLQuantizationType:
        if role in (Role.NORM, Role.BIAS):
            return F32
        if role is Role.EMBEDDING and self.embedding_type is not None:
            return self.embedding_type
        if role is Role.SENSITIVE and sensitive and self.sensitive_type is not None:
            return self.sensitive_type
        return self.tensor_type

    def _embedding_plan(self) -> TensorPlan:
        name = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        return TensorPlan(name, (self.vocab_size, self.hidden), self._type(Role.EMBEDDING, False))

    def _layer_plans(self, layer: int, sensitive: bool) -> Iterator[TensorPlan]:
        for entry in self._ordered_layer():
            name = f"{TENSOR_NAMES[entry.tensor].format(bid=layer)}.{entry.suffix}"
            yield TensorPlan(name, entry.shape(self), self._type(entry.role, sensitive))

    def _ordered_layer(self) -> list[LayerTensor]:
        # gguf-py's order for the architecture (a tensor it does not list for the arch is a bug: ValueError).
        arch = ARCHITECTURES[self.architecture]
        # By name: gguf-py lists gemma3's ffn_norm as FFN_PRE_NORM, the same "blk.{bid}.ffn_norm".
        listed = [TENSOR_NAMES[tensor] for tensor in MODEL_TENSORS[arch]]
        return sorted(
            ARCH_LAYERS[arch], key=lambda e: (listed.index(TENSOR_NAMES[e.tensor]), e.suffix != "weight")
        )

    def tensor_plans(self) -> Iterator[tuple[TensorPlan, Role]]:
        """Every tensor in file order with its role: token_embd, each layer's, output_norm (no output.weight:
        the head is tied to the embeddings, and embedding models do not use it)."""
        yield self._embedding_plan(), Role.EMBEDDING
        roles = [entry.role for entry in self._ordered_layer()]
        for layer in range(self.layers):
            yield from zip(self._layer_plans(layer, self.sensitive(layer)), roles, strict=True)
        yield TensorPlan(TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight", (self.hidden,), F32), Role.NORM

    def layer_nbytes(self, sensitive: bool) -> int:
        """Bytes of one layer's tensors (sensitive: one of the layers that get sensitive_type)."""
        return sum(plan.nbytes for plan in self._layer_plans(0, sensitive))

    def nbytes(self) -> int:
        """Bytes of tensor data the file will hold (the header and vocabulary add a little more)."""
        return sum(plan.nbytes for plan, _ in self.tensor_plans())


def _check_rows(plan: TensorPlan) -> None:
    block = GGML_QUANT_SIZES[plan.qtype][0]
    if plan.shape[-1] % block:
        raise GGUFError(
            f"{plan.name}: rows of {plan.shape[-1]} values are not whole {plan.qtype.name} blocks of "
            f"{block}; choose sizes that are multiples of it or another type"
        )


# ------------------------------------------------------------------------------------------- tokenizer

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Words whose merges the vocabulary carries (as word starts "Ġword" and inside words), so common text
# tokenizes into whole words and the merge ranks matter.
WORDS = (
    "the", "and", "hello", "world", "def", "return", "import", "class", "self", "print",
    "model", "token", "embed", "code", "for", "in", "is", "of", "to", "int",
)  # fmt: skip


@dataclass(frozen=True)
class ByteLevelVocabulary:
    """A GPT-2-style vocabulary: the 256 byte tokens, merged words, special tokens, reserved padding."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]
    eos: int


def _merges() -> tuple[list[str], list[str]]:
    merged: dict[str, None] = {}
    merges: dict[str, None] = {}
    space = BYTE_TO_CHAR[ord(" ")]
    # Every word-start chain ranks before the mid-word ones: " world" merges to "Ġworld", not "Ġ" + "world".
    for spelled in [space + word for word in WORDS] + list(WORDS):
        for end in range(2, len(spelled) + 1):
            merges.setdefault(f"{spelled[: end - 1]} {spelled[end - 1]}")
            merged.setdefault(spelled[:end])
    return list(merged), list(merges)


def byte_level_vocabulary(size: int) -> ByteLevelVocabulary:
    """`size` distinct tokens llama.cpp's and our gpt2 tokenizers accept: bytes (ids 0-255 = the byte),
    words, the special tokens, then "[PAD<id>]" (unused) as Hugging Face pads Qwen's vocabulary."""
    words, merges = _merges()
    tokens = [BYTE_TO_CHAR[byte] for byte in range(256)] + words + list(SPECIAL)
    types = [TokenType.NORMAL] * (256 + len(words)) + [TokenType.CONTROL] * len(SPECIAL)
    if size < len(tokens):
        raise GGUFError(f"vocab_size {size} is too small; the tokenizer needs {len(tokens)}")
    padding = range(len(tokens), size)
    tokens += [f"[PAD{index}]" for index in padding]
    types += [TokenType.UNUSED] * len(padding)
    return ByteLevelVocabulary(tuple(tokens), tuple(int(t) for t in types), tuple(merges), 256 + len(words))


MIN_VOCAB = 256 + len(_merges()[0]) + len(SPECIAL)


# Small enough to test with, the architecture and head layout of the real thing (GQA; qwen3 with
# head_dim · heads ≠ hidden, as in Qwen3).
QWEN2_TINY = SyntheticDecoder(
    architecture="qwen2",
    vocab_size=8192,
    hidden=128,
    heads=4,
    kv_heads=2,
    head_dim=32,
    ffn=384,
    tensor_type=GGMLQuantizationType.Q4_0,
    sensitive_type=GGMLQuantizationType.Q8_0,
    embedding_type=GGMLQuantizationType.F16,
    name="qwen2-tiny",
)
QWEN3_TINY = SyntheticDecoder(
    architecture="qwen3",
    vocab_size=4096,
    hidden=64,
    heads=4,
    kv_heads=2,
    head_dim=32,
    ffn=192,
    tensor_type=GGMLQuantizationType.Q8_0,
    embedding_type=GGMLQuantizationType.F16,
    name="qwen3-tiny",
)
# nomic-embed-code's geometry (Qwen2.5-Coder-7B: 28 layers of 3584, 28 query / 4 KV heads, ffn 18944, a
# 152,064-row embedding), stored like Q4_K_M: ~4.2 GB, larger than any memory limit of the matrix.
NOMIC_CODE_CLASS = SyntheticDecoder(
    architecture="qwen2",
    vocab_size=152064,
    hidden=3584,
    layers=28,
    heads=28,
    kv_heads=4,
    head_dim=128,
    ffn=18944,
    context_length=32768,
    tensor_type=GGMLQuantizationType.Q4_K,
    sensitive_type=GGMLQuantizationType.Q6_K,
    embedding_type=GGMLQuantizationType.Q4_K,
    name="nomic-code-class",
)


def synthetic_decoder_for_size(
    target_bytes: int, base: SyntheticDecoder, max_layers: int = 1 << 16
) -> SyntheticDecoder:
    """`base` with the smallest layer count whose tensor data reaches `target_bytes` (at most `max_layers`).

    Layers differ (attn_v and ffn_down hold more bits on some), so the count is bisected between what
    layers all as large as the dearest and all as small as the cheapest would need: a few walks over the
    layers, never a search one layer at a time.
    """

    def size(layers: int) -> int:
        return replace(base, layers=layers).nbytes()

    fixed = size(0)
    costs = [base.layer_nbytes(sensitive) for sensitive in (False, True)]
    low, high = (max(1, -(-(target_bytes - fixed) // cost)) for cost in (max(costs), min(costs)))
    if low > max_layers:
        raise GGUFError(f"needs {low:,} layers or more, at most {max_layers:,} are allowed")
    high = min(high, max_layers)
    layers = low + bisect.bisect_left(range(low, high + 1), target_bytes, key=size)
    return replace(base, layers=min(layers, max_layers), name=f"{base.name}-{target_bytes >> 20}m")


# ------------------------------------------------------------------------------------------------ write


def _values(spec: SyntheticDecoder, index: int, plan: TensorPlan, role: Role) -> Iterator[np.ndarray]:
    seed = (spec.seed, index)
    if role is Role.NORM:
        rng = np.random.default_rng(seed)
        yield (1.0 + 0.05 * rng.standard_normal(plan.shape, dtype=np.float32)).astype(np.float32)
        return
    yield from random_pieces(plan.qtype, math.prod(plan.shape), WEIGHT_STD, seed)


def write_synthetic_decoder(path: str | Path, spec: SyntheticDecoder) -> Path:
    """Write `spec` as a GGUF at `path`, its tensor data in pieces of at most 1 MiB (never held whole)."""
    out = Path(path)
    writer = GGUFWriter(out, spec.architecture)
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_block_count(spec.layers)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_freq_base)
    if spec.architecture == MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA3]:
        writer.add_sliding_window(spec.sliding_window)
    writer.add_file_type(int(FILE_TYPES[spec.tensor_type]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    vocabulary = byte_level_vocabulary(spec.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(vocabulary.eos)
    writer.add_eos_token_id(vocabulary.eos)
    writer.add_pad_token_id(vocabulary.eos)
    writer.add_add_bos_token(False)
    del vocabulary
    planned = list(spec.tensor_plans())
    roles = [role for _, role in planned]
    write_streamed(
        writer,
        [plan for plan, _ in planned],
        lambda index, plan: _values(spec, index, plan, roles[index]),
    )
    return out
