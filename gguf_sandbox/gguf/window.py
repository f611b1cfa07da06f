"""The bounded sequential decoder of a GGUF header: one reusable window, each read checked for bounds."""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeAlias

import numpy as np
from gguf.constants import GGUFValueType

from gguf_sandbox.errors import GGUFError

# A variable-size array remembers every CHECKPOINT_EVERY-th element offset: O(n/256) memory, O(256) seek.
CHECKPOINT_EVERY = 256
# Fixed-size value types: (struct code, byte size). Strings and arrays are variable and handled apart.
SCALAR_FORMATS: Mapping[GGUFValueType, str] = MappingProxyType(
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
CHUNK_BYTES = 1 << 20
NUMPY_SCALAR: Mapping[str, str] = MappingProxyType(
    {
        "B": "u1",
        "b": "i1",
        "H": "u2",
        "h": "i2",
        "I": "u4",
        "i": "i4",
        "f": "f4",
        "?": "u1",
        "Q": "u8",
        "q": "i8",
        "d": "f8",
    }
)
WINDOW_BYTES = 1 << 16
Scalar: TypeAlias = "int | float | bool | str"


def hint_truncated() -> str:
    return "the file is incomplete or corrupt: re-download or re-convert it"


def read_failed(what: str, nbytes: int, offset: int, error: OSError) -> GGUFError:
    """A failed read (EIO from a failing disk, a file like /proc/self/mem) as a GGUFError saying where."""
    return GGUFError(
        f"{what}: reading {nbytes:,} bytes at offset {offset:,} failed: {error.strerror or error}; the file "
        f"or its disk is failing, or it is not a regular GGUF file"
    )


class Window:
    """Sequential decoder reading through one reusable WINDOW_BYTES buffer, bounds-checked at every read."""

    def __init__(self, fd: int, file_size: int, byte_order: str, position: int) -> None:
        self.fd = fd
        self.file_size = file_size
        self.byte_order = byte_order
        self.buffer = bytearray(WINDOW_BYTES)
        self.view = memoryview(self.buffer)
        self.start = position  # file offset of buffer[0]
        self.filled = 0
        self.position = position
        self.u32 = struct.Struct(byte_order + "I")
        self.u64 = struct.Struct(byte_order + "Q")
        self.scalars = {code: struct.Struct(byte_order + code) for code in SCALAR_FORMATS.values()}

    def _require(self, nbytes: int, field: str) -> int:
        """Make [position, position + nbytes) readable in the buffer; return its index there."""
        end = self.position + nbytes
        if end > self.file_size:
            raise GGUFError(
                f"truncated {field} at offset {self.position}: needs {nbytes} bytes but the file ends at "
                f"{self.file_size}; {hint_truncated()}"
            )
        index = self.position - self.start
        if index < 0 or index + nbytes > self.filled:
            if self.fd < 0:
                raise GGUFError(f"cannot read {field}: the file is closed; open it again")
            self.start = self.position
            try:
                self.filled = os.preadv(self.fd, [self.view], self.start)
            except OSError as error:
                raise read_failed(field, len(self.view), self.start, error) from None
            index = 0
            if self.filled < nbytes:
                raise GGUFError(
                    f"{field} at offset {self.position}: the file ended after {self.filled} of {nbytes} "
                    f"bytes; it shrank while open"
                )
        return index

    def read_u32(self, field: str) -> int:
        index = self._require(4, field)
        self.position += 4
        value: int = self.u32.unpack_from(self.buffer, index)[0]
        return value

    def read_u64(self, field: str) -> int:
        index = self._require(8, field)
        self.position += 8
        value: int = self.u64.unpack_from(self.buffer, index)[0]
        return value

    def read_bytes(self, nbytes: int, field: str) -> bytes:
        if nbytes <= WINDOW_BYTES:
            index = self._require(nbytes, field)
            self.position += nbytes
            return bytes(self.buffer[index : index + nbytes])
        if self.position + nbytes > self.file_size:
            self._require(nbytes, field)
        try:
            data = os.pread(self.fd, nbytes, self.position)
        except OSError as error:
            raise read_failed(field, nbytes, self.position, error) from None
        if len(data) != nbytes:
            raise GGUFError(
                f"{field} at offset {self.position}: the file ended after {len(data)} of {nbytes} bytes; it "
                f"shrank while open"
            )
        self.position += nbytes
        return data

    def read_string(self, field: str, max_bytes: int) -> str:
        length = self.read_u64(f"{field} length")
        if length > max_bytes:
            raise GGUFError(
                f"{field} at offset {self.position - 8} claims {length:,} bytes, over the {max_bytes:,}-byte "
                f"limit for this field; the file is corrupt or hostile"
            )
        self._check_fits(length, field)
        raw = self.read_bytes(length, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise GGUFError(
                f"{field} at offset {self.position - length} is not valid UTF-8 ({error.reason} at byte "
                f"{error.start}); the file is corrupt"
            ) from None

    def read_scalar(self, code: str, field: str) -> Scalar:
        fmt = self.scalars[code]
        index = self._require(fmt.size, field)
        self.position += fmt.size
        value: Scalar = fmt.unpack_from(self.buffer, index)[0]
        if code == "f":
            # The shortest decimal that round-trips the float32: 1e-12, not 9.999999960041972e-13.
            return float(str(np.float32(value)))
        return value

    def _check_fits(self, nbytes: int, field: str) -> None:
        if self.position + nbytes > self.file_size:
            raise GGUFError(
                f"{field} at offset {self.position} claims {nbytes:,} bytes but only "
                f"{self.file_size - self.position:,} remain in the file; {hint_truncated()}"
            )

    def check_count(self, count: int, min_element_bytes: int, field: str, maximum: int | None = None) -> None:
        """Refuse a count over `maximum` or whose smallest encoding cannot fit in the rest of the file."""
        if maximum is not None and count > maximum:
            raise GGUFError(
                f"{field} at offset {self.position - 8} is {count:,}, over the sane maximum {maximum:,}; "
                f"the file is corrupt or hostile"
            )
        if count * min_element_bytes > self.file_size - self.position:
            raise GGUFError(
                f"{field} at offset {self.position - 8} claims {count:,} elements, but even at "
                f"{min_element_bytes} bytes each they cannot fit in the {self.file_size - self.position:,} "
                f"bytes left; the file is corrupt or hostile"
            )

    def skip_strings(self, count: int, field: str, checkpoints: array[int] | None) -> None:
        """Walk `count` strings without decoding them; remember every CHECKPOINT_EVERY-th offset."""
        # The hot loop of opening a 262k-token vocabulary: locals only, bounds checked once per group
        # (positions only grow, so a group that ends inside the file had every element inside it).
        unpack_u64 = self.u64.unpack_from
        buffer = self.buffer
        for group_start in range(0, count, CHECKPOINT_EVERY):
            if checkpoints is not None:
                checkpoints.append(self.position)
            group_origin = self.position
            index = self.position - self.start
            filled = self.filled
            for _ in range(min(CHECKPOINT_EVERY, count - group_start)):
                if index < 0 or index + 8 > filled:
                    if self.start + index + 8 > self.file_size:
                        self._explain_overrun(field, group_start, group_origin)
                    self.position = self.start + index
                    index = self._require(8, f"{field}[{group_start}+] length")
                    filled = self.filled
                index += 8 + unpack_u64(buffer, index)[0]
            self.position = self.start + index
            if self.position > self.file_size:
                self._explain_overrun(field, group_start, group_origin)

    def _explain_overrun(self, field: str, group_start: int, position: int) -> None:
        """Find the string of a group that runs past the end of the file and say which it is."""
        for element in range(group_start, group_start + CHECKPOINT_EVERY):
            self.position = position
            length = self.read_u64(f"{field}[{element}] length")
            if position + 8 + length > self.file_size:
                raise GGUFError(
                    f"{field}[{element}] at offset {position} claims {length:,} bytes but the file ends at "
                    f"{self.file_size:,}; {hint_truncated()}"
                )
            position += 8 + length
        raise GGUFError(f"{field}: strings run past the end of the file; {hint_truncated()}")
