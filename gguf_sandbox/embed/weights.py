"""Weight plans for the BERT forward pass: resident float32, resident quantized, or streamed from the file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise
from typing import Final, Protocol

import numpy as np
from gguf.constants import GGMLQuantizationType, Keys
from numpy.typing import NDArray

from gguf_sandbox.budget import physical_memory
from gguf_sandbox.embed.bert import DEFAULT_CAP, F32, FLOAT_BYTES, BertConfig, Ids, Pooling, aligned
from gguf_sandbox.errors import BudgetExceeded, GGUFError, UnsupportedTensorType
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo

SUPPORTED_ARCHITECTURES: Final = ("bert",)
TABLES: Final = ("token_embd.weight", "position_embd.weight", "token_types.weight")
MATRICES: Final = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")
NORMS: Final = ("attn_output_norm", "layer_output_norm")
# Tensors of one encoder layer: a weight and a bias per matrix and per layer norm.
TENSORS_PER_LAYER: Final = 2 * (len(MATRICES) + len(NORMS))
DEFAULT_LAYER_NORM_EPS: Final = 1e-12
# A pass never needs more tokens than this; more would only grow the working set, not the speed.
DEFAULT_PASS_TOKENS: Final = 4096
# Transients of a pass beyond its activations, in units of the cap: one decoded weight block plus its raw
# bytes and the dequantizer's byte-sized scratch, or attention scores plus a gathered K and V.
TRANSIENT_CAPS: Final = 3
# Passes grow past the context length only into this share of the room left: allocator slack, page
# cache and Python objects are real but not reserved, and the cgroup counts them all.
PASS_SHARE: Final = (3, 4)
# Decoded weight pieces of quantized plans: half a core's L2 (512 KiB here), so a piece is still cached
# when multiplied.
DECODE_BYTES: Final = 1 << 18
# Big-endian files can only hold tensors whose bytes a swap decodes (the reader refuses the rest).
_SWAPPED: Final = {GGMLQuantizationType.F32: ">f4", GGMLQuantizationType.F16: ">f2"}
# A Q8_0 block: one fp16 scale, then 32 int8 quants.
Q8_BLOCK: Final = 32
Q8_BLOCK_BYTES: Final = 34
# What resident-quant keeps per Q8_0 block: the quants plus the scale as float32 (see Q8Blocks).
Q8_KEPT_BYTES: Final = Q8_BLOCK + FLOAT_BYTES


class PlanName(str, Enum):
    """Where the weights live while embedding; fastest first."""

    RESIDENT_F32 = "resident-f32"
    RESIDENT_QUANT = "resident-quant"
    STREAMING = "streaming"


class TableMode(str, Enum):
    """How embedding-table rows are looked up: decoded in memory, raw in memory, or read from the file."""

    F32 = "f32"
    RAW = "raw"
    FILE = "file"


# Table modes a plan may use, best first: a plan keeps its tables in memory when they fit, else reads rows.
PLAN_TABLES: Final[Mapping[PlanName, tuple[TableMode, ...]]] = {
    PlanName.RESIDENT_F32: (TableMode.F32, TableMode.FILE),
    PlanName.RESIDENT_QUANT: (TableMode.RAW, TableMode.FILE),
    PlanName.STREAMING: (TableMode.FILE,),
}
PLAN_ORDER: Final = tuple(PlanName)


@dataclass(frozen=True)
class Plan:
    """A chosen plan: where weights and tables live, what stays resident, and how big a pass may be."""

    name: PlanName
    tables: TableMode
    resident_bytes: int  # held for the Embedder's lifetime
    max_tokens: int  # token rows of one forward pass
    cap: int = DEFAULT_CAP
    # Pages of weights read from the file are dropped (POSIX_FADV_DONTNEED) as soon as they are copied:
    # chosen when streamed weights do not fit beside a pass (keeping them cached would only evict other
    # pages and count toward the cgroup's peak), or asked for with drop_cache.
    uncached: bool = False
    # Page cache the plan keeps on purpose (streamed weights re-read every pass): the budget holds it.
    cached_bytes: int = 0

    def pass_bytes(self, config: BertConfig, tokens: int) -> int:
        return pass_bytes(config, tokens, self.cap)


def token_bytes(config: BertConfig) -> int:
    """Activation bytes one token row needs at the peak of a layer (x, q, k, v, ctx or x, up, out)."""
    return FLOAT_BYTES * (max(5 * config.hidden, 2 * config.hidden + config.ffn) + config.hidden)


def pass_bytes(config: BertConfig, tokens: int, cap: int = DEFAULT_CAP) -> int:
    """Working set of one forward pass over `tokens` token rows."""
    return token_bytes(config) * tokens + TRANSIENT_CAPS * cap


# -- the model's shape from its metadata --------------------------------------------------------------
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
        _check_shapes(gguf, config, _layer_shapes(config, layer))
    return config


def _outer_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor outside the encoder layers (-1: any size)."""
    h = config.hidden
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, h),
        "position_embd.weight": (config.context_length, h),
        "token_embd_norm.weight": (h,),
        "token_embd_norm.bias": (h,),
    }
    if config.has_token_types:
        shapes["token_types.weight"] = (-1, h)
    return shapes


def _layer_shapes(config: BertConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor of one encoder layer."""
    h, f, p = config.hidden, config.ffn, f"blk.{layer}"
    shapes: dict[str, tuple[int, ...]] = {}
    for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
        shapes[f"{p}.{part}.weight"] = (h, h)
        shapes[f"{p}.{part}.bias"] = (h,)
    shapes[f"{p}.ffn_up.weight"] = (f, h)
    shapes[f"{p}.ffn_up.bias"] = (f,)
    shapes[f"{p}.ffn_down.weight"] = (h, f)
    shapes[f"{p}.ffn_down.bias"] = (h,)
    for norm in NORMS:
        shapes[f"{p}.{norm}.weight"] = (h,)
        shapes[f"{p}.{norm}.bias"] = (h,)
    return shapes


def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of every tensor the forward pass reads (for a config read_config has checked)."""
    shapes = _outer_shapes(config)
    for layer in range(config.layers):
        shapes.update(_layer_shapes(config, layer))
    return shapes


def _check_shapes(gguf: GGUFFile, config: BertConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        actual = gguf.tensor(name).shape
        if len(actual) != len(shape) or any(e not in (-1, a) for e, a in zip(shape, actual, strict=True)):
            raise GGUFError(
                f"{gguf.path.name}: tensor {name} has shape {actual}, expected {shape} from the metadata "
                f"(hidden {config.hidden}, ffn {config.ffn}, context {config.context_length}); the file is "
                f"inconsistent, re-convert it"
            )


# -- sizes of each plan ---------------------------------------------------------------------------------
def _is_matrix(name: str) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and name.split(".")[2] in MATRICES


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the model's tensors by role: decoded to float32 and as stored in the file."""

    vectors: int
    tables_f32: int
    tables_raw: int
    matrices_f32: int
    matrices_raw: int
    matrices_kept: int  # as resident-quant keeps them (Q8_0 split into quants and float32 scales)
    quantized: bool  # some matrix is stored smaller than float32

    @classmethod
    def of(cls, gguf: GGUFFile, config: BertConfig) -> ModelSizes:
        vectors = tables_f32 = tables_raw = matrices_f32 = matrices_raw = matrices_kept = 0
        quantized = False
        for name in expected_shapes(config):
            info = gguf.tensor(name)
            decoded = info.n_elements * FLOAT_BYTES
            if name in TABLES:
                tables_f32 += decoded
                tables_raw += info.nbytes
            elif _is_matrix(name):
                matrices_f32 += decoded
                matrices_raw += info.nbytes
                matrices_kept += kept_bytes(info, gguf.byte_order)
                quantized = quantized or info.nbytes < decoded
            else:
                vectors += decoded
        return cls(vectors, tables_f32, tables_raw, matrices_f32, matrices_raw, matrices_kept, quantized)

    def resident(self, plan: PlanName, tables: TableMode) -> int:
        """Bytes a plan keeps for the Embedder's lifetime."""
        matrices = {
            PlanName.RESIDENT_F32: self.matrices_f32,
            PlanName.RESIDENT_QUANT: self.matrices_kept,
            PlanName.STREAMING: 0,
        }[plan]
        table = {TableMode.F32: self.tables_f32, TableMode.RAW: self.tables_raw, TableMode.FILE: 0}[tables]
        return self.vectors + matrices + table


def preferred_plan(config: BertConfig, sizes: ModelSizes, memory: int | None = None) -> PlanName:
    """The plan an unconstrained host runs for this model: auto's choice with `memory` bytes free.

    `memory` defaults to the machine's physical RAM, so a model whose float32 weights exceed it prefers
    resident-quant (or streaming) and is not reported degraded for running that way.
    """
    room = physical_memory() if memory is None else memory
    try:
        return choose_plan(config, sizes, room).name
    except BudgetExceeded:
        return PlanName.STREAMING


def _candidates(sizes: ModelSizes, requested: PlanName | None) -> Iterator[PlanName]:
    if requested is not None:
        yield requested
        return
    for name in PLAN_ORDER:
        # Keeping float32 bytes "raw" saves nothing over decoding them once, and is slower.
        if name is PlanName.RESIDENT_QUANT and not sizes.quantized:
            continue
        yield name


def parse_plan(plan: str | PlanName | None) -> PlanName | None:
    """A plan name from the command line or API; "auto" and None mean: let the budget choose."""
    if plan is None or plan == "auto":
        return None
    try:
        return PlanName(plan)
    except ValueError:
        names = ", ".join(["auto", *(p.value for p in PlanName)])
        raise GGUFError(f"unknown weight plan {plan!r}; choose one of {names}") from None


def choose_plan(
    config: BertConfig,
    sizes: ModelSizes,
    available: int,
    *,
    requested: str | PlanName | None = None,
    cap: int = DEFAULT_CAP,
    pass_tokens: int = DEFAULT_PASS_TOKENS,
    drop_cache: bool = False,
) -> Plan:
    """The fastest plan whose resident weights plus one full-context pass fit in `available` bytes.

    With `requested`, only that plan is considered. With `drop_cache`, every block or row read from the
    file has its pages dropped once copied (POSIX_FADV_DONTNEED): the process's peak is then its own
    working set, at the cost of re-reading streamed weights from disk every pass. Raises BudgetExceeded
    when nothing fits.
    """
    wanted = parse_plan(requested)
    # A full-context sequence, its chunks padded to ROW_ALIGN.
    min_tokens = aligned(config.context_length)
    smallest: tuple[int, PlanName] | None = None
    for name in _candidates(sizes, wanted):
        for tables in PLAN_TABLES[name]:
            resident = sizes.resident(name, tables)
            room = available - resident - TRANSIENT_CAPS * cap
            grown = room * PASS_SHARE[0] // PASS_SHARE[1] // token_bytes(config)
            # Tables in memory save a pread per token row, little next to shrinking every pass.
            in_file = tables is PLAN_TABLES[name][-1]
            if room // token_bytes(config) >= min_tokens and (in_file or grown >= pass_tokens):
                uncached, cached = drop_cache, 0
                if name is PlanName.STREAMING and not drop_cache:
                    # Streamed weights that fit beside a minimal pass stay in page cache (passes grow only
                    # into what is left); larger ones are read uncached, every pass.
                    cached_room = room - sizes.matrices_raw
                    uncached = cached_room // token_bytes(config) < min_tokens
                    if not uncached:
                        cached = sizes.matrices_raw
                        grown = cached_room * PASS_SHARE[0] // PASS_SHARE[1] // token_bytes(config)
                tokens = max(min_tokens, min(pass_tokens, grown))
                return Plan(name, tables, resident, int(tokens), cap, uncached, cached)
            needed = resident + pass_bytes(config, min_tokens, cap)
            if smallest is None or needed < smallest[0]:
                smallest = (needed, name)
    needed, name = smallest if smallest is not None else (0, PlanName.STREAMING)
    raise BudgetExceeded(
        f"embedding plan {name.value}" + ("" if wanted else " (the smallest plan)"),
        needed,
        max(available, 0),
        f"it keeps {sizes.resident(name, PLAN_TABLES[name][-1]):,} bytes of weights and needs "
        f"{pass_bytes(config, min_tokens, cap):,} for a {min_tokens}-token pass; raise the memory limit"
        + ("" if wanted is None or wanted is PlanName.STREAMING else " or use --plan streaming / auto"),
    )


# -- decoding -------------------------------------------------------------------------------------------
def decode(info: TensorInfo, raw: bytes | NDArray[np.uint8], byte_order: str) -> F32:
    """Raw bytes of whole rows of `info` as flat float32 — the same function for every plan and the reader."""
    if byte_order == ">":
        swapped = _SWAPPED.get(info.type)
        if swapped is None:
            raise UnsupportedTensorType(
                f"{info.name}: {info.type.name} data in a big-endian GGUF is not supported (only F32 and F16 "
                f"are); convert the file to little-endian"
            )
        return np.frombuffer(raw, dtype=swapped).astype(np.float32)
    return dequantize(raw, info.type, what=info.name)


def rows_per_block(info: TensorInfo, cap: int) -> int:
    """Rows per stored weight block: the reader's iter_rows boundaries (quantized plans decode in pieces)."""
    rows = cap // (info.row_len * FLOAT_BYTES)
    if rows == 0:
        raise BudgetExceeded(
            f"one row of {info.name}", info.row_len * FLOAT_BYTES, cap, "raise the single-allocation cap"
        )
    return rows


def is_q8_0(info: TensorInfo, byte_order: str) -> bool:
    """Whether a tensor's blocks can be split into quants and scales (big-endian Q8_0 is refused)."""
    return info.type is GGMLQuantizationType.Q8_0 and byte_order == "<"


def kept_bytes(info: TensorInfo, byte_order: str) -> int:
    """Bytes resident-quant keeps for a matrix: Q8_0 as split Q8Rows, anything else as stored."""
    if is_q8_0(info, byte_order):
        return info.n_elements // Q8_BLOCK * Q8_KEPT_BYTES
    return info.nbytes


class StoredRows(Protocol):
    """Consecutive rows of a matrix as stored; any row range decodes to float32."""

    @property
    def n_rows(self) -> int: ...

    def decode(self, lo: int, hi: int) -> F32:
        """Rows [lo, hi) as float32 [hi - lo, row_len]."""
        ...


@dataclass(frozen=True)
class RawRows:
    """Rows kept as the file stores them, decoded by decode()."""

    info: TensorInfo
    data: NDArray[np.uint8]  # [rows * row_nbytes]
    byte_order: str

    @property
    def n_rows(self) -> int:
        return self.data.size // self.info.row_nbytes

    def decode(self, lo: int, hi: int) -> F32:
        size = self.info.row_nbytes
        return decode(self.info, self.data[lo * size : hi * size], self.byte_order).reshape(hi - lo, -1)


@dataclass(frozen=True)
class Q8Rows:
    """Q8_0 rows split into int8 quants and float32 scales, so decoding is one exact cast and one multiply.

    The products are dequantize()'s, bit for bit, at about half its cost: it multiplies straight from the
    interleaved 34-byte blocks, which costs numpy a buffered cast per block.
    """

    row_len: int
    quants: NDArray[np.int8]  # [rows * row_len / 32, 32]
    scales: F32  # [rows * row_len / 32, 1]

    @classmethod
    def of(cls, raw: bytes | NDArray[np.uint8], row_len: int) -> Q8Rows:
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, Q8_BLOCK_BYTES)  # [n, 34]
        quants = np.empty((blocks.shape[0], Q8_BLOCK), dtype=np.int8)  # [n, 32]
        # Each block's quants moved as one 32-byte item: a flat copy, where an int8 copy of short strided
        # rows pays numpy's per-row overhead.
        item = np.dtype((np.void, Q8_BLOCK))
        np.copyto(quants.view(item), blocks[:, 2:].view(item))
        half = np.frombuffer(raw, dtype="<f2").reshape(-1, Q8_BLOCK_BYTES // 2)[:, :1]  # [n, 1]
        return cls(row_len, quants, half.astype(np.float32))

    @property
    def n_rows(self) -> int:
        return int(self.quants.shape[0]) * Q8_BLOCK // self.row_len

    def decode(self, lo: int, hi: int) -> F32:
        per_row = self.row_len // Q8_BLOCK
        first, last = lo * per_row, hi * per_row
        out = np.empty((last - first, Q8_BLOCK), dtype=np.float32)  # [blocks, 32]
        np.copyto(out, self.quants[first:last])  # [blocks, 32] exact: every int8 is a float32
        out *= self.scales[first:last]  # [blocks, 32]
        return out.reshape(hi - lo, self.row_len)


def stored_rows(info: TensorInfo, raw: bytes | NDArray[np.uint8], order: str) -> StoredRows:
    """Whole rows of `info` as read from the file, Q8_0 split into quants and scales."""
    if is_q8_0(info, order):
        return Q8Rows.of(raw, info.row_len)
    return RawRows(info, np.frombuffer(raw, dtype=np.uint8), order)


def decoded_blocks(info: TensorInfo, first: int, rows: StoredRows) -> Iterator[tuple[int, F32]]:
    """A stored block's rows decoded in L2-sized pieces: each is multiplied while still in cache.

    A 1 MiB decoded block would not fit a core's L2, so the multiply after decoding it would read it back
    from L3 or memory; pieces of DECODE_BYTES make a single sentence ~30% faster on quantized plans. The
    products are the same up to BLAS's choice of kernel for a piece's last columns (vectors differ from
    resident-f32's by ~1e-7).
    """
    count = rows.n_rows
    # Equal pieces of about DECODE_BYTES (at most 1.5x): each piece costs a fixed ~20 us of numpy calls, so
    # no sliver of a few rows gets a piece of its own.
    pieces = max(1, round(count * info.row_len * FLOAT_BYTES / DECODE_BYTES))
    bounds = [count * k // pieces for k in range(pieces + 1)]
    for lo, hi in pairwise(bounds):
        yield first + lo, rows.decode(lo, hi)


class RowSource(Protocol):
    """Rows of an embedding table."""

    def rows(self, ids: Ids) -> F32: ...


class BlockSource(Protocol):
    """A weight matrix as row blocks."""

    def blocks(self) -> Iterator[tuple[int, F32]]: ...


def _check_ids(info: TensorInfo, ids: Ids) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= info.n_rows):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise GGUFError(f"row {bad} of {info.name} is out of range (it has {info.n_rows} rows)")


class F32Table:
    """A table kept decoded, as one float32 [rows, row_len] array (resident: allocated once, at load)."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, F32]]) -> None:
        self.info = info
        self._table = np.empty((info.n_rows, info.row_len), dtype=np.float32)  # [rows, row_len]
        for first, block in blocks:
            self._table[first : first + block.shape[0]] = block

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        return np.take(self._table, ids, axis=0)  # [n, row_len]


class RawTable:
    """A table kept as stored (quantized) rows, in one array; only the rows asked for are decoded."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, bytes]], order: str) -> None:
        self.info = info
        self._raw = np.empty((info.n_rows, info.row_nbytes), dtype=np.uint8)  # [rows, row_nbytes]
        for first, raw in blocks:
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, info.row_nbytes)
            self._raw[first : first + rows.shape[0]] = rows
        self._order = order

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        raw = np.take(self._raw, ids, axis=0)  # [n, row_nbytes]
        return decode(self.info, raw.reshape(-1), self._order).reshape(ids.size, self.info.row_len)


def _pread(fd: int, length: int, offset: int, what: str) -> bytes:
    """os.pread whose failures (EIO from a failing disk, ...) are GGUFErrors naming what was read."""
    try:
        return os.pread(fd, length, offset)
    except OSError as error:
        raise GGUFError(
            f"{what}: reading {length:,} bytes at offset {offset:,} failed: {error.strerror or error}; "
            f"the file or its disk is failing"
        ) from None


class FileTable:
    """A table left in the file: each distinct row is read with one pread (positional, so thread-safe)."""

    def __init__(self, info: TensorInfo, fd: int, order: str, *, uncached: bool = False) -> None:
        self.info = info
        self._fd = fd
        self._order = order
        self._uncached = uncached

    def rows(self, ids: Ids) -> F32:
        _check_ids(self.info, ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        size, base = self.info.row_nbytes, self.info.offset
        name = self.info.name
        raw = b"".join(_pread(self._fd, size, base + row * size, name) for row in unique.tolist())
        if self._uncached:
            _drop_cached(
                self._fd, base + int(unique[0]) * size, (int(unique[-1]) - int(unique[0]) + 1) * size
            )
        if len(raw) != size * unique.size:
            raise GGUFError(f"{self.info.name}: short read of {unique.size} rows; the file shrank while open")
        decoded = decode(self.info, raw, self._order).reshape(unique.size, self.info.row_len)
        return decoded[inverse.reshape(-1)]  # [n, row_len]


class F32Matrix:
    """A matrix kept decoded, as one block: the whole float32 [out, in] the forward pass multiplies by.

    Resident weights are allocated once, at load, so the single-allocation cap does not bound them; one
    product per matrix saves BLAS the narrow edge panels of row blocks (~6% of the FFN's time for a
    sentence). The matrix is stored transposed ([in, out], C-contiguous) and handed out as its .T view:
    the forward pass computes x @ W.T, which BLAS then reads as a plain x @ W^T (~10% faster than W's rows
    for a sentence of ~15 tokens).
    """

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, F32]]) -> None:
        transposed = np.empty((info.row_len, info.n_rows), dtype=np.float32)  # [in, out]
        for first, block in blocks:  # block [rows, in]
            transposed[:, first : first + block.shape[0]] = block.T
        self._weight = transposed.T  # [out, in]

    def blocks(self) -> Iterator[tuple[int, F32]]:
        yield 0, self._weight


class RawMatrix:
    """A matrix kept quantized (Q8_0 split, other types as stored); each block is decoded when used."""

    def __init__(self, info: TensorInfo, blocks: Iterable[tuple[int, StoredRows]]) -> None:
        self.info = info
        self._blocks = list(blocks)

    def blocks(self) -> Iterator[tuple[int, F32]]:
        for first, rows in self._blocks:
            yield from decoded_blocks(self.info, first, rows)


class StreamMatrix:
    """A matrix read from the file block by block (the reader's blocks), decoded in pieces, every use."""

    def __init__(self, gguf: GGUFFile, info: TensorInfo, cap: int, fd: int, *, uncached: bool) -> None:
        self._gguf = gguf
        self.info = info
        self._cap = cap
        self._fd = fd
        self._uncached = uncached

    def blocks(self) -> Iterator[tuple[int, F32]]:
        info, order = self.info, self._gguf.byte_order
        for first, raw in read_blocks(self._fd, info, self._cap, drop=self._uncached):
            yield from decoded_blocks(info, first, stored_rows(info, raw, order))


class PlannedWeights:
    """The BertWeights of one plan: vectors always decoded; tables and matrices where the plan keeps them."""

    def __init__(
        self,
        config: BertConfig,
        plan: Plan,
        *,
        vectors: dict[str, F32],
        tables: dict[str, RowSource],
        matrices: dict[str, BlockSource],
        fd: int,
    ) -> None:
        self._config = config
        self.plan = plan
        self._vectors = vectors
        self._tables = tables
        self._matrices = matrices
        self._fd = fd

    @property
    def config(self) -> BertConfig:
        return self._config

    def vector(self, name: str) -> F32:
        return self._vectors[name]

    def rows(self, name: str, ids: Ids) -> F32:
        return self._tables[name].rows(ids)

    def blocks(self, name: str) -> Iterator[tuple[int, F32]]:
        return self._matrices[name].blocks()

    def close(self) -> None:
        """Drop the weights and close the file handle used for row reads."""
        self._vectors, self._tables, self._matrices = {}, {}, {}
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _advise(fd: int, advice: str, offset: int = 0, length: int = 0) -> None:
    """posix_fadvise where the platform has it; advice only, so a file system refusing it is no error."""
    if hasattr(os, "posix_fadvise"):
        # Ignored advice costs page cache, not correctness.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, getattr(os, advice))


def _drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop cached pages of the file once copied: page cache counts toward a cgroup's limit and its peak."""
    _advise(fd, "POSIX_FADV_DONTNEED", offset, length)


def read_blocks(fd: int, info: TensorInfo, cap: int, *, drop: bool = True) -> Iterator[tuple[int, bytes]]:
    """(first_row, raw bytes) of the tensor's row blocks — iter_rows' boundaries — leaving no page cache.

    `fd` must be advised POSIX_FADV_RANDOM: the reader's descriptor reads ahead up to read_ahead_kb (often
    megabytes) into page cache, which a cgroup counts; each block's pages are dropped once copied (unless
    `drop` is false: streamed weights that fit stay cached).
    """
    per_block = rows_per_block(info, cap)
    for first in range(0, info.n_rows, per_block):
        rows = min(per_block, info.n_rows - first)
        offset, length = info.offset + first * info.row_nbytes, rows * info.row_nbytes
        raw = _pread(fd, length, offset, info.name)
        if len(raw) != length:
            raise GGUFError(f"{info.name}: short read at offset {offset:,}; the file shrank while open")
        if drop:
            _drop_cached(fd, offset, length)
        yield first, raw


def _f32_blocks(fd: int, info: TensorInfo, cap: int, order: str) -> Iterator[tuple[int, F32]]:
    """(first_row, float32 [rows, row_len]) blocks, read and decoded one at a time."""
    for first, raw in read_blocks(fd, info, cap):
        yield first, decode(info, raw, order).reshape(-1, info.row_len)


def _table(gguf: GGUFFile, info: TensorInfo, plan: Plan, fd: int) -> RowSource:
    mode, cap, order = plan.tables, plan.cap, gguf.byte_order
    if mode is TableMode.F32:
        return F32Table(info, _f32_blocks(fd, info, cap, order))
    if mode is TableMode.RAW:
        return RawTable(info, read_blocks(fd, info, cap), order)
    return FileTable(info, fd, gguf.byte_order, uncached=plan.uncached)


def _matrix(gguf: GGUFFile, info: TensorInfo, plan: Plan, fd: int) -> BlockSource:
    if plan.name is PlanName.RESIDENT_F32:
        order = gguf.byte_order
        # One block at a time, so loading never holds a matrix twice.
        return F32Matrix(info, _f32_blocks(fd, info, plan.cap, order))
    if plan.name is PlanName.RESIDENT_QUANT:
        order = gguf.byte_order
        return RawMatrix(
            info,
            ((first, stored_rows(info, raw, order)) for first, raw in read_blocks(fd, info, plan.cap)),
        )
    return StreamMatrix(gguf, info, plan.cap, fd, uncached=plan.uncached)


def load_weights(gguf: GGUFFile, config: BertConfig, plan: Plan) -> PlannedWeights:
    """Build the plan's weights from an open file (which must stay open while they are used)."""
    try:
        fd = os.open(gguf.path, os.O_RDONLY)
    except OSError as error:
        raise GGUFError(f"cannot reopen {gguf.path} to read its weights: {error.strerror or error}") from None
    try:
        # Our reads are whole blocks or random rows: readahead would only fill the page cache.
        _advise(fd, "POSIX_FADV_RANDOM")
        vectors: dict[str, F32] = {}
        tables: dict[str, RowSource] = {}
        matrices: dict[str, BlockSource] = {}
        for name in expected_shapes(config):
            info = gguf.tensor(name)
            if name in TABLES:
                tables[name] = _table(gguf, info, plan, fd)
            elif _is_matrix(name):
                matrices[name] = _matrix(gguf, info, plan, fd)
            else:
                vectors[name] = np.concatenate(
                    [block.reshape(-1) for _, block in _f32_blocks(fd, info, plan.cap, gguf.byte_order)]
                )
    except BaseException:
        os.close(fd)
        raise
    # What the header parse and the tokenizer read (with readahead) is not needed again.
    _drop_cached(fd)
    return PlannedWeights(config, plan, vectors=vectors, tables=tables, matrices=matrices, fd=fd)


def describe(plan: Plan, sizes: ModelSizes) -> dict[str, object]:
    """A JSON-friendly summary of a plan and the model's sizes."""
    return {
        "plan": plan.name.value,
        "tables": plan.tables.value,
        "resident_bytes": plan.resident_bytes,
        "max_tokens": plan.max_tokens,
        "cap": plan.cap,
        "uncached": plan.uncached,
        "cached_bytes": plan.cached_bytes,
        "model_f32_bytes": sizes.vectors + sizes.tables_f32 + sizes.matrices_f32,
        "model_raw_bytes": sizes.vectors + sizes.tables_raw + sizes.matrices_raw,
    }
