"""Byte-level GGUF builder for tests: valid files, every malformed variant, both byte orders, and fuzzing."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile

# Struct codes of the fixed-size value types, from the GGUF spec (deliberately not the reader's table).
STRUCT_CODES: Mapping[GGUFValueType, str] = MappingProxyType(
    {
        GGUFValueType.UINT8: "B",
        GGUFValueType.INT8: "b",
        GGUFValueType.UINT16: "H",
        GGUFValueType.INT16: "h",
        GGUFValueType.UINT32: "I",
        GGUFValueType.INT32: "i",
        GGUFValueType.FLOAT32: "f",
        GGUFValueType.BOOL: "?",
        GGUFValueType.UINT64: "Q",
        GGUFValueType.INT64: "q",
        GGUFValueType.FLOAT64: "d",
    }
)
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class Str:
    """A GGUF string whose length field may lie (`claimed`), e.g. a 2^40-byte bomb over 3 real bytes."""

    data: bytes
    claimed: int | None = None


@dataclass(frozen=True)
class Arr:
    """A GGUF array; `element_type` may be any raw id and `claimed` may lie about the element count."""

    element_type: int
    items: Sequence[Any] = ()
    claimed: int | None = None


Text = str | Str


@dataclass(frozen=True)
class KV:
    """One metadata pair. For a value type the spec does not know, `value` is raw bytes written as-is."""

    key: Text
    type: int
    value: Any


@dataclass(frozen=True)
class Tensor:
    """One tensor-table entry and its data; every field can lie for malformed cases."""

    name: Text
    type: int
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    data: bytes | None = None  # None: deterministic finite bytes of the declared size; b"": no data at all
    offset: int | None = None  # relative to the data section; None: the next aligned slot
    n_dims: int | None = None  # the dimension count written; defaults to len(ne)


@dataclass(frozen=True)
class Spec:
    """A whole file. Counts, magic and version are written as given, so they can lie too."""

    kvs: tuple[KV, ...] = ()
    tensors: tuple[Tensor, ...] = ()
    byte_order: str = "<"
    version: int = 3
    magic: bytes = b"GGUF"
    alignment: int = DEFAULT_ALIGNMENT  # layout padding; add a general.alignment KV yourself to declare it
    tensor_count: int | None = None
    kv_count: int | None = None
    trailing_padding: bool = False  # pad after the last tensor like GGUFWriter does


@dataclass(frozen=True)
class Built:
    """The bytes of a built file and the offset of every field (keys like 'kv[2].value', 'tensor[0].ne')."""

    data: bytes
    offsets: Mapping[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def declared_nbytes(tensor_type: int, ne: Sequence[int]) -> int:
    """Bytes a tensor of this type and shape occupies (0 for types without a known block geometry)."""
    try:
        block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        return 0
    elements = 1
    for dim in ne:
        elements *= dim
    return elements // block_elements * block_bytes


def finite_bytes(nbytes: int, seed: int) -> bytes:
    """Random bytes that decode to finite values in every GGML type.

    Clearing bit 6 of every byte keeps each f16/bf16/f32 exponent field below all-ones (no inf/NaN scales).
    """
    values = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return (values & 0xBF).tobytes()


def align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


class _Writer:
    """Appends encoded fields and remembers where each starts."""

    def __init__(self, byte_order: str) -> None:
        self.order = byte_order
        self.out = bytearray()
        self.offsets: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.offsets[name] = len(self.out)

    def pack(self, code: str, value: Any) -> None:
        self.out += struct.pack(self.order + code, value)

    def string(self, text: Text) -> None:
        raw = text if isinstance(text, Str) else Str(text.encode("utf-8"))
        self.pack("Q", len(raw.data) if raw.claimed is None else raw.claimed)
        self.out += raw.data

    def value(self, value_type: int, value: Any) -> None:
        known = _known_value_type(value_type)
        code = STRUCT_CODES.get(known) if known is not None else None
        if code is not None:
            self.pack(code, value)
        elif known is GGUFValueType.STRING:
            self.string(value)
        elif known is GGUFValueType.ARRAY:
            self.array(value)
        else:
            self.out += value

    def array(self, array: Arr) -> None:
        self.pack("I", array.element_type)
        self.pack("Q", len(array.items) if array.claimed is None else array.claimed)
        for item in array.items:
            self.value(array.element_type, item)


def _known_value_type(raw: int) -> GGUFValueType | None:
    try:
        return GGUFValueType(raw)
    except ValueError:
        return None


def build(spec: Spec) -> Built:
    """Encode `spec` exactly as described, lies included."""
    w = _Writer(spec.byte_order)
    w.mark("magic")
    w.out += spec.magic
    w.mark("version")
    w.pack("I", spec.version)
    w.mark("tensor_count")
    w.pack("Q", len(spec.tensors) if spec.tensor_count is None else spec.tensor_count)
    w.mark("kv_count")
    w.pack("Q", len(spec.kvs) if spec.kv_count is None else spec.kv_count)
    for index, kv in enumerate(spec.kvs):
        w.mark(f"kv[{index}]")
        w.string(kv.key)
        w.mark(f"kv[{index}].type")
        w.pack("I", kv.type)
        w.mark(f"kv[{index}].value")
        w.value(kv.type, kv.value)
    placements: list[tuple[int, bytes]] = []
    cursor = 0
    for index, tensor in enumerate(spec.tensors):
        data = tensor.data
        if data is None:
            data = finite_bytes(
                declared_nbytes(tensor.type, tensor.ne), zlib.crc32(repr(tensor.name).encode())
            )
        offset = align(cursor, spec.alignment) if tensor.offset is None else tensor.offset
        cursor = max(cursor, offset + len(data))
        placements.append((offset, data))
        w.mark(f"tensor[{index}]")
        w.string(tensor.name)
        w.mark(f"tensor[{index}].n_dims")
        w.pack("I", len(tensor.ne) if tensor.n_dims is None else tensor.n_dims)
        w.mark(f"tensor[{index}].ne")
        for dim in tensor.ne:
            w.pack("Q", dim)
        w.mark(f"tensor[{index}].type")
        w.pack("I", tensor.type)
        w.mark(f"tensor[{index}].offset")
        w.pack("Q", offset)
    w.mark("header_end")
    data_start = align(len(w.out), spec.alignment)
    w.offsets["data"] = data_start
    if any(data for _, data in placements):
        w.out += bytes(data_start - len(w.out))
        section = bytearray(max(offset + len(data) for offset, data in placements if data))
        for index, (offset, data) in enumerate(placements):
            section[offset : offset + len(data)] = data
            w.offsets[f"tensor[{index}].data"] = data_start + offset
        if spec.trailing_padding:
            section += bytes(align(len(section), spec.alignment) - len(section))
        w.out += section
    return Built(bytes(w.out), MappingProxyType(w.offsets))


# -- ready-made specs -------------------------------------------------------------------------------------


def scalar_kvs() -> tuple[KV, ...]:
    """One key per fixed-size value type, at a value that shows sign and width mistakes."""
    extremes: dict[GGUFValueType, Any] = {
        GGUFValueType.UINT8: 255,
        GGUFValueType.INT8: -128,
        GGUFValueType.UINT16: 65535,
        GGUFValueType.INT16: -32768,
        GGUFValueType.UINT32: 2**32 - 1,
        GGUFValueType.INT32: -(2**31),
        GGUFValueType.FLOAT32: 1.5,
        GGUFValueType.BOOL: True,
        GGUFValueType.UINT64: 2**64 - 1,
        GGUFValueType.INT64: -(2**63),
        GGUFValueType.FLOAT64: -2.25,
    }
    return tuple(KV(f"test.{vtype.name.lower()}", vtype, value) for vtype, value in extremes.items())


def rich_spec(byte_order: str = "<", version: int = 3) -> Spec:
    """A small valid file with every value type, string and nested arrays, and quantized tensors."""
    q8, q4k = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K
    tensors: tuple[Tensor, ...] = (
        Tensor("token_embd.weight", GGMLQuantizationType.F32, (8, 6)),
        Tensor("half.weight", GGMLQuantizationType.F16, (16, 3)),
        Tensor("q8.weight", q8, (64, 2)),
        Tensor("q4k.weight", q4k, (256, 2)),
        Tensor("bias", GGMLQuantizationType.F32, (5,)),
    )
    if byte_order == ">":
        tensors = tuple(t for t in tensors if t.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16))
    kvs = (
        KV("general.architecture", GGUFValueType.STRING, "bert"),
        *scalar_kvs(),
        KV("test.string", GGUFValueType.STRING, "héllo ▁world"),
        KV("tokenizer.ggml.tokens", GGUFValueType.ARRAY, Arr(GGUFValueType.STRING, ["[PAD]", "a", "", "▁b"])),
        KV("test.ints", GGUFValueType.ARRAY, Arr(GGUFValueType.INT32, [1, -2, 3])),
        KV(
            "test.nested",
            GGUFValueType.ARRAY,
            Arr(GGUFValueType.ARRAY, [Arr(GGUFValueType.UINT16, [1, 2]), Arr(GGUFValueType.STRING, ["x"])]),
        ),
        KV("test.empty", GGUFValueType.ARRAY, Arr(GGUFValueType.FLOAT32, [])),
    )
    return Spec(kvs=kvs, tensors=tensors, byte_order=byte_order, version=version)


def minimal_spec(version: int = 2) -> Spec:
    """One key, one F32 tensor: the smallest interesting valid file."""
    return Spec(
        kvs=(KV("general.architecture", GGUFValueType.STRING, "bert"),),
        tensors=(Tensor("w", GGMLQuantizationType.F32, (4, 2)),),
        version=version,
    )


def vocab_spec(count: int = 300) -> Spec:
    """A string array longer than one 256-element checkpoint group, plus a Q4_0 and a Q6_K tensor."""
    tokens = [f"tok{i}" * (1 + i % 3) for i in range(count)]
    return Spec(
        kvs=(
            KV("tokenizer.ggml.tokens", GGUFValueType.ARRAY, Arr(GGUFValueType.STRING, tokens)),
            KV("tokenizer.ggml.scores", GGUFValueType.ARRAY, Arr(GGUFValueType.FLOAT32, [0.5] * 20)),
        ),
        tensors=(
            Tensor("q4.weight", GGMLQuantizationType.Q4_0, (32, 3)),
            Tensor("q6k.weight", GGMLQuantizationType.Q6_K, (256, 1)),
        ),
    )


def seed_files() -> dict[str, Built]:
    """The valid inputs the fuzzers mutate."""
    return {
        "rich": build(rich_spec()),
        "rich-big-endian": build(rich_spec(">")),
        "minimal-v2": build(minimal_spec()),
        "vocab": build(vocab_spec()),
    }


# -- mutations (shared by the hypothesis test and bench/fuzz.py) -----------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One edit of a byte string; positions wrap around the current length."""

    kind: str  # one of MUTATORS
    position: int
    payload: bytes = b""
    amount: int = 0


def _flip(data: bytearray, m: Mutation) -> None:
    if data:
        data[m.position % len(data)] ^= 1 << (m.amount % 8)


def _overwrite(data: bytearray, m: Mutation) -> None:
    if data:
        start = m.position % len(data)
        data[start : start + len(m.payload)] = m.payload[: len(data) - start]


def _insert(data: bytearray, m: Mutation) -> None:
    start = m.position % (len(data) + 1)
    data[start:start] = m.payload


def _delete(data: bytearray, m: Mutation) -> None:
    if data:
        start = m.position % len(data)
        del data[start : start + max(1, m.amount)]


def _truncate(data: bytearray, m: Mutation) -> None:
    del data[m.position % (len(data) + 1) :]


MUTATORS: Mapping[str, Callable[[bytearray, Mutation], None]] = MappingProxyType(
    {"flip": _flip, "overwrite": _overwrite, "insert": _insert, "delete": _delete, "truncate": _truncate}
)

# Integers that hit boundaries of counts, lengths, types, dimensions and offsets.
INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    9,
    12,
    13,
    16,
    31,
    32,
    33,
    255,
    256,
    257,
    4096,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**60,
    2**63 - 1,
    2**63,
    2**64 - 1,
)


def interesting_payload(value: int, width: int, byte_order: str) -> bytes:
    return (value % (1 << (8 * width))).to_bytes(width, "little" if byte_order == "<" else "big")


def apply(data: bytes, mutations: Iterable[Mutation]) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        MUTATORS[mutation.kind](out, mutation)
    return bytes(out)


def random_mutations(rng: random.Random, seed: Built, byte_order: str) -> list[Mutation]:
    """1-4 mutations, half of them aimed at a known field start with a boundary integer."""
    fields = list(seed.offsets.values())
    mutations = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(tuple(MUTATORS))
        aimed = rng.random() < 0.5
        position = rng.choice(fields) if aimed else rng.randrange(len(seed.data) + 1)
        if kind in ("overwrite", "insert") and aimed:
            width = rng.choice((1, 4, 8))
            payload = interesting_payload(rng.choice(INTERESTING_INTS), width, byte_order)
        else:
            payload = rng.randbytes(rng.randint(1, 8))
        mutations.append(Mutation(kind, position, payload, rng.randint(0, 16)))
    return mutations


# -- the property: read everything a caller could, and let only GGUFError out ---------------------------


def _consume_value(value: Any) -> None:
    if not isinstance(value, LazyArray):
        return
    length = len(value)
    items = list(value)
    if length:
        value[-1]
        value[length // 2]
        value[1:3]
        value[::2]
    if value.element_type in STRUCT_CODES:
        value.to_numpy()
    for item in items:
        _consume_value(item)


def consume(path: Path, max_bytes: int = 1 << 16) -> None:
    """Open `path`, read all metadata and stream every tensor (raw, rows, a few random rows)."""
    with np.errstate(all="ignore"), GGUFFile.open(path) as gguf:
        _ = (gguf.version, gguf.byte_order, gguf.alignment, gguf.data_offset, gguf.architecture)
        for value in gguf.metadata.values():
            _consume_value(value)
        for name, info in gguf.tensors.items():
            for _ in gguf.iter_raw(name, max_bytes=max_bytes):
                pass
            for _ in gguf.iter_rows(name, max_bytes=max_bytes):
                pass
            gguf.read_rows(name, [0, info.n_rows - 1], max_bytes=max_bytes)


def with_alignment(spec: Spec, alignment: float, value_type: int = GGUFValueType.UINT32) -> Spec:
    """`spec` declaring general.alignment (and laid out with it when it is a usable power of two)."""
    kv = KV("general.alignment", value_type, alignment)
    usable = isinstance(alignment, int) and 0 < alignment <= 1 << 16 and alignment & (alignment - 1) == 0
    layout = int(alignment) if usable else spec.alignment
    return replace(spec, kvs=(*spec.kvs, kv), alignment=layout)


# -- a tiny valid BERT the engine runs, to break one thing at a time ------------------------------------

BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TinyBert:
    """Shape of the tiny BERT bert_spec() writes (F32 weights, small and finite like trained ones)."""

    hidden: int = 32
    ffn: int = 64
    heads: int = 2
    layers: int = 1
    context: int = 16
    seed: int = 0

    def tokens(self) -> list[str]:
        """[PAD] [UNK] [CLS] [SEP] [MASK], then every letter as a word start (▁a) and a continuation (a)."""
        return [*BERT_SPECIAL, *("\u2581" + c for c in BERT_LETTERS), *BERT_LETTERS]

    def shapes(self, vocab_rows: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, ggml ne) of every tensor, in file order."""
        h, f = self.hidden, self.ffn
        out = [
            ("token_embd.weight", (h, vocab_rows)),
            ("position_embd.weight", (h, self.context)),
            ("token_types.weight", (h, 2)),
            ("token_embd_norm.weight", (h,)),
            ("token_embd_norm.bias", (h,)),
        ]
        for layer in range(self.layers):
            p = f"blk.{layer}"
            for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
                out += [(f"{p}.{part}.weight", (h, h)), (f"{p}.{part}.bias", (h,))]
            out += [(f"{p}.ffn_up.weight", (h, f)), (f"{p}.ffn_up.bias", (f,))]
            out += [(f"{p}.ffn_down.weight", (f, h)), (f"{p}.ffn_down.bias", (h,))]
            for norm in ("attn_output_norm", "layer_output_norm"):
                out += [(f"{p}.{norm}.weight", (h,)), (f"{p}.{norm}.bias", (h,))]
        return out


def _f32_values(name: str, ne: tuple[int, ...], seed: int) -> bytes:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    count = int(np.prod(ne))
    values = 0.1 * rng.standard_normal(count)
    if name.endswith("norm.weight"):
        values += 1.0
    return values.astype("<f4").tobytes()


def bert_spec(
    shape: TinyBert = TinyBert(),
    *,
    metadata: Mapping[str, tuple[int, Any]] | None = None,
    data: Mapping[str, bytes] | None = None,
    tokens: Sequence[str] | None = None,
    token_types: Sequence[int] | None = None,
    vocab_rows: int | None = None,
    table_type: int = GGMLQuantizationType.F32,
) -> Spec:
    """A tiny BERT GGUF as llama.cpp lays it out; `metadata` overrides or adds keys ((type, value); a
    value of None drops the key), `data` replaces tensors' bytes, `tokens` the vocabulary, `table_type`
    stores token_embd in another type (Q8_0 keeps a huge table small)."""
    vocabulary = list(shape.tokens() if tokens is None else tokens)
    types = [3 if t in BERT_SPECIAL else 1 for t in vocabulary] if token_types is None else token_types
    keys: dict[str, tuple[int, Any]] = {
        "general.architecture": (GGUFValueType.STRING, "bert"),
        "general.name": (GGUFValueType.STRING, "tiny-bert"),
        "bert.context_length": (GGUFValueType.UINT32, shape.context),
        "bert.embedding_length": (GGUFValueType.UINT32, shape.hidden),
        "bert.feed_forward_length": (GGUFValueType.UINT32, shape.ffn),
        "bert.block_count": (GGUFValueType.UINT32, shape.layers),
        "bert.attention.head_count": (GGUFValueType.UINT32, shape.heads),
        "bert.attention.layer_norm_epsilon": (GGUFValueType.FLOAT32, 1e-12),
        "bert.attention.causal": (GGUFValueType.BOOL, False),
        "bert.pooling_type": (GGUFValueType.UINT32, 1),
        "tokenizer.ggml.model": (GGUFValueType.STRING, "bert"),
        "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, Arr(GGUFValueType.STRING, vocabulary)),
        "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, Arr(GGUFValueType.INT32, types)),
        "tokenizer.ggml.padding_token_id": (GGUFValueType.UINT32, 0),
        "tokenizer.ggml.unknown_token_id": (GGUFValueType.UINT32, 1),
        "tokenizer.ggml.bos_token_id": (GGUFValueType.UINT32, 2),
        "tokenizer.ggml.seperator_token_id": (GGUFValueType.UINT32, 3),
        "tokenizer.ggml.mask_token_id": (GGUFValueType.UINT32, 4),
    }
    for key, value in (metadata or {}).items():
        if value[1] is None:
            keys.pop(key, None)
        else:
            keys[key] = value
    tensors = []
    for name, ne in shape.shapes(len(vocabulary) if vocab_rows is None else vocab_rows):
        replaced = (data or {}).get(name)
        if name == "token_embd.weight" and table_type != GGMLQuantizationType.F32:
            tensors.append(Tensor(name, table_type, ne, replaced))
        else:
            tensors.append(
                Tensor(name, GGMLQuantizationType.F32, ne, replaced or _f32_values(name, ne, shape.seed))
            )
    return Spec(
        kvs=tuple(KV(key, vtype, value) for key, (vtype, value) in keys.items()), tensors=tuple(tensors)
    )
