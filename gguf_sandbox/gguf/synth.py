"""Deterministic synthetic BERT-architecture GGUF files for tests, benchmarks and the matrix."""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, PoolingType, TokenType
from gguf.quants import quantize

from gguf_sandbox.embed.shapes import bert_shapes
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.writer import TensorPlan, write_streamed

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"  # llama.cpp marks WordPiece word starts with U+2581 and strips "##"
# Types gguf-py can quantize to (it can only read K-quants), with the file type llama.cpp records for each.
FILE_TYPES = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
}
WRITABLE_TYPES = frozenset(FILE_TYPES)


@dataclass(frozen=True)
class SyntheticBert:
    """Shape and storage of a synthetic BERT; the same spec always yields the same bytes."""

    vocab_size: int = 1024
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    context: int = 512
    tensor_type: GGMLQuantizationType = GGMLQuantizationType.F32
    seed: int = 0
    name: str = "synthetic-bert"

    def __post_init__(self) -> None:
        if self.tensor_type not in WRITABLE_TYPES:
            writable = ", ".join(sorted(t.name for t in WRITABLE_TYPES))
            raise GGUFError(f"cannot synthesize {self.tensor_type.name} tensors; choose one of {writable}")
        if self.hidden % self.heads:
            raise GGUFError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        block = GGML_QUANT_SIZES[self.tensor_type][0]
        if self.hidden % block or self.ffn % block:
            raise GGUFError(
                f"hidden ({self.hidden}) and ffn ({self.ffn}) must be multiples of the "
                f"{self.tensor_type.name} block size {block}"
            )
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise GGUFError(f"vocab_size {self.vocab_size} is too small; it needs at least 6 tokens")

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...], bool]]:
        """(name, numpy shape, is_matrix) in file order; matrices use tensor_type, the rest F32."""
        shapes = bert_shapes(
            hidden=self.hidden,
            ffn=self.ffn,
            vocab_size=self.vocab_size,
            context=self.context,
            layers=self.layers,
            token_types=2,
        )
        for name, shape in shapes.items():
            yield name, shape, len(shape) == 2 and name != "token_types.weight"

    def nbytes(self) -> int:
        """Bytes of tensor data the file will hold (the header adds a little more)."""
        return sum(
            TensorPlan(name, shape, self.tensor_type if is_matrix else GGMLQuantizationType.F32).nbytes
            for name, shape, is_matrix in self.tensor_shapes()
        )


def synthetic_bert_for_size(
    target_bytes: int,
    tensor_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    hidden: int = 1024,
    vocab_size: int = 30522,
    seed: int = 0,
) -> SyntheticBert:
    """The smallest layer count (at `hidden` width) whose tensor data reaches `target_bytes`.

    Tensor bytes grow linearly with the layer count, so it is computed, not searched (a search over
    layers costs O(layers²), hours for a terabyte target, and never ends when a layer holds no bytes).
    """

    def shaped(layers: int) -> SyntheticBert:
        return SyntheticBert(
            vocab_size=vocab_size,
            hidden=hidden,
            layers=layers,
            heads=max(1, hidden // 64),
            ffn=4 * hidden,
            tensor_type=tensor_type,
            seed=seed,
            name=f"synthetic-bert-{target_bytes >> 20}m",
        )

    fixed = shaped(0).nbytes()
    per_layer = shaped(1).nbytes() - fixed
    if per_layer <= 0:
        raise GGUFError(f"hidden size {hidden} makes layers without weights; use at least 1")
    return shaped(max(1, -(-(target_bytes - fixed) // per_layer)))


def vocabulary(size: int) -> list[str]:
    """Special tokens, single characters (as word starts and continuations), then distinct pseudo-words."""
    tokens = list(SPECIAL_TOKENS)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    tokens += [WORD_START + c for c in characters] + list(characters)
    words = (
        "".join(letters)
        for length in itertools.count(2)
        for letters in itertools.product(string.ascii_lowercase, repeat=length)
    )
    for index, word in enumerate(words):
        if len(tokens) >= size:
            break
        tokens.append(WORD_START + word if index % 2 == 0 else word)
    return tokens[:size]


def _tensor_values(spec: SyntheticBert, index: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, index])
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def write_synthetic_bert(path: str | Path, spec: SyntheticBert) -> Path:
    """Write `spec` as a GGUF at `path`, one tensor in memory at a time."""
    out = Path(path)
    writer = GGUFWriter(out, "bert")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_block_count(spec.layers)
    writer.add_head_count(spec.heads)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(PoolingType.MEAN)
    writer.add_file_type(int(FILE_TYPES[spec.tensor_type]))
    tokens = vocabulary(spec.vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in SPECIAL_TOKENS else TokenType.NORMAL for t in tokens])
    writer.add_token_type_count(2)
    ids = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_eos_token_id(ids["[SEP]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_mask_token_id(ids["[MASK]"])

    layout = list(spec.tensor_shapes())
    plans = [
        TensorPlan(name, shape, spec.tensor_type if is_matrix else GGMLQuantizationType.F32)
        for name, shape, is_matrix in layout
    ]

    def whole(index: int, plan: TensorPlan) -> Iterator[np.ndarray]:
        # One tensor in memory at a time: the values are drawn whole, then quantized.
        values = _tensor_values(spec, index, plan.name, plan.shape)
        yield values if plan.qtype is GGMLQuantizationType.F32 else quantize(values, plan.qtype)

    write_streamed(writer, plans, whole)
    return out
