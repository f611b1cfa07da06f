"""Bounded GGUF reader: header, metadata and tensor table parsed through a small window; data streamed."""

from __future__ import annotations

import os
import stat
import struct
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple, TypeAlias

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from gguf_sandbox.errors import GGUFError, UnsupportedTensorType
from gguf_sandbox.gguf.dequant import dequantize
from gguf_sandbox.gguf.metadata import ArrayLayout, LazyArray
from gguf_sandbox.gguf.window import (
    CHECKPOINT_EVERY,
    CHUNK_BYTES,
    SCALAR_FORMATS,
    Scalar,
    Window,
    hint_truncated,
    read_failed,
)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 1 << 16
MAX_STRING_BYTES = (1 << 20) - 4096  # so the decoded str also fits one 1 MiB allocation
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 8
# Arrays nested inside arrays, over the whole file: real models have none (llama.cpp's own reader refuses
# them), and each costs a few microseconds to walk, so an unbounded count of empty ones (12 bytes each)
# would make opening a 1 GB file take minutes.
MAX_NESTED_ARRAYS = 1 << 16
MAX_ALIGNMENT = 1 << 20
# Far above any real model (< 100 pairs, a few thousand tensors); each entry costs ~200-400 bytes of objects.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
INT64_MAX = (1 << 63) - 1

# Smallest encoding of one element, used to bound counts before anything is allocated.
MIN_STRING_BYTES = 8
MIN_ARRAY_BYTES = 12
# Tensor types whose big-endian data we can decode by a byte swap alone.
SWAPPABLE_TYPES: Mapping[GGMLQuantizationType, str] = MappingProxyType(
    {GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2"}
)

Value: TypeAlias = "Scalar | LazyArray"


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, validated against the file."""

    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: rows first."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.ne:
            count *= dim
        return count

    @property
    def row_len(self) -> int:
        return self.ne[0]

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.ne[0] if self.ne[0] else 0

    @property
    def row_nbytes(self) -> int:
        block_elements, block_bytes = GGML_QUANT_SIZES[self.type]
        return self.ne[0] // block_elements * block_bytes


class _TableEntry(NamedTuple):
    """A tensor-table entry as parsed, before its offset is resolved against the data section."""

    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]
    relative_offset: int
    nbytes: int
    entry_offset: int


class GGUFFile:
    """An open GGUF file. Parsing reads only the header; tensor data is read on demand, in bounded chunks."""

    def __init__(self, path: Path, fd: int, file_size: int) -> None:
        self.path = path
        self._fd = fd
        self.file_size = file_size
        self.byte_order = "<"
        self.version = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.data_offset = 0
        self._metadata: dict[str, Value] = {}
        self._tensors: dict[str, TensorInfo] = {}
        self._alignment_offset = -1
        # Arrays nested in arrays seen while parsing; None afterwards (lazy access re-walks what was counted).
        self._nested_arrays: int | None = 0

    # -- opening --------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFFile:
        file_path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
            fd = os.open(file_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise GGUFError(f"cannot open {file_path!r}: {reason}; check the path") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GGUFError(f"{file_path} is not a regular file; pass the path of a .gguf file")
            gguf = cls(file_path, fd, os.fstat(fd).st_size)
            gguf._parse()
        except BaseException:
            os.close(fd)
            raise
        return gguf

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- public views ---------------------------------------------------------------------------------
    @property
    def metadata(self) -> Mapping[str, Value]:
        return MappingProxyType(self._metadata)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return MappingProxyType(self._tensors)

    @property
    def architecture(self) -> str | None:
        value = self._metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFError(
                f"{self.path.name} has no tensor {name!r}; it has {len(self._tensors)} tensors "
                f"(see `gguf-sandbox inspect {self.path}`)"
            ) from None

    # -- tensor data ----------------------------------------------------------------------------------
    def iter_raw(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The tensor's bytes as uint8 arrays: block-aligned chunks of at most `max_bytes`."""
        info = self.tensor(name)
        block_bytes = GGML_QUANT_SIZES[info.type][1]
        chunk = max_bytes // block_bytes * block_bytes
        if chunk <= 0:
            raise GGUFError(
                f"max_bytes={max_bytes} is smaller than one {info.type.name} block ({block_bytes} bytes)"
            )
        for start in range(0, info.nbytes, chunk):
            yield self._pread(info.offset + start, min(chunk, info.nbytes - start), name)

    def iter_rows(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """(first_row, float32 [rows, row_len]) blocks whose dequantized size is at most `max_bytes`."""
        info = self.tensor(name)
        rows_per_block = self._rows_per_block(info, max_bytes)
        for first in range(0, info.n_rows, rows_per_block):
            count = min(rows_per_block, info.n_rows - first)
            raw = self._pread(info.offset + first * info.row_nbytes, count * info.row_nbytes, name)
            yield first, self._decode(info, raw).reshape(count, info.row_len)

    def read_rows(self, name: str, rows: Sequence[int], max_bytes: int = CHUNK_BYTES) -> np.ndarray:
        """Selected rows as float32 [len(rows), row_len], one seek each (token-embedding lookup)."""
        info = self.tensor(name)
        nbytes = len(rows) * info.row_len * 4
        if nbytes > max_bytes:
            raise GGUFError(
                f"reading {len(rows)} rows of {name} needs {nbytes:,} bytes, over max_bytes={max_bytes:,}; "
                f"read fewer rows at a time"
            )
        raw = np.empty(len(rows) * info.row_nbytes, dtype=np.uint8)
        for slot, row in enumerate(rows):
            if not 0 <= row < info.n_rows:
                raise GGUFError(f"row {row} of {name} is out of range (it has {info.n_rows} rows)")
            start = slot * info.row_nbytes
            self._pread_into(raw[start : start + info.row_nbytes], info.offset + row * info.row_nbytes, name)
        # One dequantize call for all rows: per-call overhead dominates single-row reads.
        return self._decode(info, raw).reshape(len(rows), info.row_len)

    def read_tensor(self, name: str, max_bytes: int = CHUNK_BYTES) -> np.ndarray:
        """The whole tensor as float32 in numpy shape — only for tensors within `max_bytes` once decoded."""
        info = self.tensor(name)
        nbytes = info.n_elements * 4
        if nbytes > max_bytes:
            raise GGUFError(
                f"{name} dequantizes to {nbytes:,} bytes, over max_bytes={max_bytes:,}; "
                f"stream it with iter_rows()"
            )
        raw = self._pread(info.offset, info.nbytes, name)
        return self._decode(info, raw).reshape(info.shape)

    def read_raw(self, name: str, max_bytes: int = CHUNK_BYTES) -> np.ndarray:
        """The tensor's stored bytes as uint8 — only for tensors within `max_bytes`."""
        info = self.tensor(name)
        if info.nbytes > max_bytes:
            raise GGUFError(
                f"{name} holds {info.nbytes:,} bytes, over max_bytes={max_bytes:,}; stream it with iter_raw()"
            )
        return self._pread(info.offset, info.nbytes, name)

    def _rows_per_block(self, info: TensorInfo, max_bytes: int) -> int:
        rows = max_bytes // (info.row_len * 4)
        if rows <= 0:
            raise GGUFError(
                f"one row of {info.name} ({info.row_len:,} floats) exceeds max_bytes={max_bytes:,}; "
                f"use iter_raw() or a larger max_bytes"
            )
        return rows

    def _decode(self, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        if self.byte_order == ">":
            swapped = SWAPPABLE_TYPES.get(info.type)
            if swapped is None:
                raise UnsupportedTensorType(
                    f"{info.name}: {info.type.name} data in a big-endian GGUF is not supported "
                    f"(only F32 and F16 are); convert the file to little-endian"
                )
            return raw.view(">" + swapped).astype(np.float32)
        if info.type is GGMLQuantizationType.F32:
            # `raw` is a fresh buffer owned by this call: viewing it is safe and saves a copy.
            return raw.view(np.float32)
        return dequantize(raw, info.type, what=info.name)

    def _pread(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        """`nbytes` at `offset` as uint8, in one allocation of exactly that size (no bytes-object header)."""
        data = np.empty(nbytes, dtype=np.uint8)
        self._pread_into(data, offset, what)
        return data

    def _check_open(self, what: str) -> None:
        if self._fd < 0:
            raise GGUFError(f"{self.path.name} is closed; open it again to read {what}")

    def _pread_into(self, target: np.ndarray, offset: int, what: str) -> None:
        self._check_open(what)
        try:
            got = os.preadv(self._fd, [target.data], offset) if target.nbytes else 0
        except OSError as error:
            raise read_failed(what, target.nbytes, offset, error) from None
        if got != target.nbytes:
            raise GGUFError(
                f"{what}: expected {target.nbytes:,} bytes at offset {offset:,}, got {got:,}; "
                f"the file shrank while open"
            )

    # -- parsing --------------------------------------------------------------------------------------
    def _parse(self) -> None:
        try:
            header = os.pread(self._fd, 8, 0)
        except OSError as error:
            raise read_failed(f"{self.path.name}: header", 8, 0, error) from None
        if len(header) < 8:
            raise GGUFError(
                f"{self.path.name} is {self.file_size} bytes, too short for a GGUF header (8 bytes); "
                f"{hint_truncated()}"
            )
        if header[:4] != MAGIC:
            raise GGUFError(
                f"{self.path.name} is not a GGUF file: magic at offset 0 is {header[:4]!r}, "
                f"expected {MAGIC!r}"
            )
        self.byte_order, self.version = self._detect_byte_order(header[4:8])
        window = Window(self._fd, self.file_size, self.byte_order, 8)
        tensor_count = window.read_u64("tensor count")
        window.check_count(tensor_count, 24, "tensor count", MAX_TENSOR_COUNT)
        kv_count = window.read_u64("metadata count")
        window.check_count(kv_count, 13, "metadata count", MAX_KV_COUNT)
        for index in range(kv_count):
            self._parse_kv(window, index)
        self.alignment = self._alignment()
        tensor_table = [self._parse_tensor_info(window, index) for index in range(tensor_count)]
        self.data_offset = -(-window.position // self.alignment) * self.alignment
        if self.data_offset > self.file_size and tensor_count:
            raise GGUFError(
                f"tensor data should start at offset {self.data_offset:,} but the file ends at "
                f"{self.file_size:,}; {hint_truncated()}"
            )
        self._place_tensors(tensor_table)
        self._nested_arrays = None

    def _detect_byte_order(self, raw_version: bytes) -> tuple[str, int]:
        little = int.from_bytes(raw_version, "little")
        if little in SUPPORTED_VERSIONS:
            return "<", little
        big = int.from_bytes(raw_version, "big")
        if big in SUPPORTED_VERSIONS:
            return ">", big
        version = little if little < 1 << 16 else big
        raise GGUFError(
            f"{self.path.name}: GGUF version {version} at offset 4 is not supported (only "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); convert it with a current llama.cpp"
        )

    def _parse_kv(self, window: Window, index: int) -> None:
        key_offset = window.position
        key = window.read_string(f"metadata key #{index}", MAX_KEY_BYTES)
        value_type = self._value_type(window.read_u32(f"value type of {key!r}"), key, window.position - 4)
        value = self._decode_value(window, value_type, key, 0)
        if key in self._metadata:
            raise GGUFError(f"metadata key {key!r} at offset {key_offset} appears twice; the file is corrupt")
        if key == "general.alignment":
            self._alignment_offset = key_offset
        self._metadata[key] = value

    @staticmethod
    def _value_type(raw: int, field: str, offset: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(
                f"{field}: unknown value type {raw} at offset {offset}; the file is corrupt or from a newer "
                f"GGUF revision"
            ) from None

    def _decode_value(self, window: Window, value_type: GGUFValueType, field: str, depth: int) -> Value:
        code = SCALAR_FORMATS.get(value_type)
        if code is not None:
            return window.read_scalar(code, field)
        if value_type is GGUFValueType.STRING:
            return window.read_string(field, MAX_STRING_BYTES)
        return LazyArray(self, field, self._parse_array(window, field, depth))

    def _parse_array(self, window: Window, field: str, depth: int) -> ArrayLayout:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(
                f"{field} at offset {window.position}: arrays nested deeper than {MAX_ARRAY_DEPTH}; "
                f"the file is hostile"
            )
        element_type = self._value_type(
            window.read_u32(f"{field} element type"), f"{field} element type", window.position - 4
        )
        count = window.read_u64(f"{field} count")
        code = SCALAR_FORMATS.get(element_type)
        if code is not None:
            size = struct.calcsize(code)
            window.check_count(count, size, f"{field} count")
            offset = window.position
            window.position += count * size
            return ArrayLayout(element_type, count, offset, window.position, None)
        minimum = MIN_STRING_BYTES if element_type is GGUFValueType.STRING else MIN_ARRAY_BYTES
        window.check_count(count, minimum, f"{field} count")
        offset = window.position
        checkpoints: array[int] = array("Q")
        if element_type is GGUFValueType.STRING:
            window.skip_strings(count, field, checkpoints)
        else:
            if self._nested_arrays is not None:
                self._nested_arrays += count
            if self._nested_arrays is not None and self._nested_arrays > MAX_NESTED_ARRAYS:
                raise GGUFError(
                    f"{field} at offset {window.position - 8}: {count:,} arrays nested in an array make "
                    f"{self._nested_arrays:,} in the file, over the limit {MAX_NESTED_ARRAYS:,} (real models "
                    f"have none); the file is corrupt or hostile"
                )
            for element in range(count):
                if element % CHECKPOINT_EVERY == 0:
                    checkpoints.append(window.position)
                self._parse_array(window, f"{field}[{element}]", depth + 1)
        return ArrayLayout(element_type, count, offset, window.position, checkpoints)

    def _alignment(self) -> int:
        value = self._metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
            raise GGUFError(
                f"general.alignment at offset {self._alignment_offset} is {value!r}; it must be a positive "
                f"power of two (default {GGUF_DEFAULT_ALIGNMENT})"
            )
        if value > MAX_ALIGNMENT:
            raise GGUFError(
                f"general.alignment at offset {self._alignment_offset} is {value:,}, over the sane maximum "
                f"{MAX_ALIGNMENT:,}; the file is corrupt or hostile"
            )
        return value

    def _parse_tensor_info(self, window: Window, index: int) -> _TableEntry:
        entry_offset = window.position
        name = window.read_string(f"tensor #{index} name", MAX_TENSOR_NAME_BYTES)
        n_dims = window.read_u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(
                f"tensor {name!r} at offset {entry_offset} has {n_dims} dimensions; "
                f"GGUF allows 1 to {MAX_DIMS}"
            )
        ne = tuple(window.read_u64(f"tensor {name!r} dimension {axis}") for axis in range(n_dims))
        elements = 1
        for axis, dim in enumerate(ne):
            if dim == 0 or dim > INT64_MAX:
                raise GGUFError(
                    f"tensor {name!r} at offset {entry_offset}: dimension {axis} is {dim}; it must be in "
                    f"1..{INT64_MAX}"
                )
            elements *= dim
            if elements > INT64_MAX:
                raise GGUFError(
                    f"tensor {name!r} at offset {entry_offset}: dimensions {ne} overflow a 64-bit element "
                    f"count; the file is hostile"
                )
        raw_type = window.read_u32(f"tensor {name!r} type")
        try:
            tensor_type = GGMLQuantizationType(raw_type)
            block_elements, block_bytes = GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise GGUFError(
                f"tensor {name!r} has unknown type id {raw_type} (offset {window.position - 4}); the file is "
                f"corrupt or needs a newer gguf-sandbox"
            ) from None
        if ne[0] % block_elements:
            raise GGUFError(
                f"tensor {name!r} at offset {entry_offset}: row length {ne[0]} is not a multiple of the "
                f"{tensor_type.name} block size {block_elements}"
            )
        relative = window.read_u64(f"tensor {name!r} offset")
        if relative % self.alignment:
            raise GGUFError(
                f"tensor {name!r} data offset {relative} (field at offset {window.position - 8}) is not a "
                f"multiple of the alignment {self.alignment}"
            )
        nbytes = elements // block_elements * block_bytes
        return _TableEntry(name, tensor_type, ne, relative, nbytes, entry_offset)

    def _place_tensors(self, table: list[_TableEntry]) -> None:
        for name, tensor_type, ne, relative, nbytes, entry_offset in table:
            if name in self._tensors:
                raise GGUFError(
                    f"tensor name {name!r} at offset {entry_offset} appears twice in the tensor table; "
                    f"the file is corrupt"
                )
            offset = self.data_offset + relative
            if offset + nbytes > self.file_size:
                raise GGUFError(
                    f"tensor {name!r} ({tensor_type.name}, {nbytes:,} bytes at offset {offset:,}) ends past "
                    f"the end of the file ({self.file_size:,} bytes); {hint_truncated()}"
                )
            self._tensors[name] = TensorInfo(name, tensor_type, ne, offset, nbytes)
        previous: TensorInfo | None = None
        for info in sorted(self._tensors.values(), key=lambda t: t.offset):
            if previous is not None and info.offset < previous.offset + previous.nbytes:
                raise GGUFError(
                    f"tensors {previous.name!r} and {info.name!r} overlap (bytes {info.offset:,}.."
                    f"{previous.offset + previous.nbytes:,}); the file is corrupt"
                )
            previous = info
