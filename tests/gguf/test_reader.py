"""Bounded reader on valid files: metadata, lazy arrays, tensor table and data, checked against gguf-py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

from gguf_sandbox.errors import GGUFError, GGUFSandboxError, UnsupportedTensorType
from gguf_sandbox.gguf.dequant import SUPPORTED_TYPES
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo
from gguf_sandbox.gguf.synth import WRITABLE_TYPES, SyntheticBert, vocabulary, write_synthetic_bert
from tests.gguf import builders

Q = GGMLQuantizationType
V = GGUFValueType
BYTE_ORDERS = {"little-endian": GGUFEndian.LITTLE, "big-endian": GGUFEndian.BIG}


def plain(value: Any) -> Any:
    """A metadata value with every LazyArray (nested too) turned into a list."""
    return [plain(item) for item in value] if isinstance(value, LazyArray) else value


def lazy_array(gguf: GGUFFile, key: str) -> LazyArray:
    value = gguf.metadata[key]
    assert isinstance(value, LazyArray), f"{key} is {type(value).__name__}, not a LazyArray"
    return value


def write_gguf(
    path: Path, fill: Callable[[GGUFWriter], None], endian: GGUFEndian = GGUFEndian.LITTLE
) -> Path:
    writer = GGUFWriter(path, "bert", endianess=endian)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- metadata values --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueCase:
    vtype: GGUFValueType
    value: Any
    sub_type: GGUFValueType | None = None

    def expected(self) -> Any:
        element = self.sub_type if self.vtype is V.ARRAY else self.vtype
        return _as_stored(self.value, element)


def _as_stored(value: Any, vtype: GGUFValueType | None) -> Any:
    if isinstance(value, list):
        return [_as_stored(item, vtype) for item in value]
    if vtype is V.FLOAT32:
        return Float32(value)
    return value


class Float32(float):
    """Equal to any float that rounds to the same float32 (the reader may give 0.1 or 0.10000000149011612)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and bool(np.float32(other) == np.float32(float(self)))

    def __hash__(self) -> int:
        return hash(float(np.float32(float(self))))


VALUE_CASES = {
    "uint8-max": ValueCase(V.UINT8, 255),
    "int8-min": ValueCase(V.INT8, -128),
    "uint16-max": ValueCase(V.UINT16, 65535),
    "int16-min": ValueCase(V.INT16, -32768),
    "uint32-max": ValueCase(V.UINT32, 2**32 - 1),
    "int32-min": ValueCase(V.INT32, -(2**31)),
    "float32-inexact": ValueCase(V.FLOAT32, 0.1),
    "bool-true": ValueCase(V.BOOL, True),
    "bool-false": ValueCase(V.BOOL, False),
    "uint64-max": ValueCase(V.UINT64, 2**64 - 1),
    "int64-min": ValueCase(V.INT64, -(2**63)),
    "float64": ValueCase(V.FLOAT64, -1e300),
    "string-unicode": ValueCase(V.STRING, "▁héllo 世界 🙂"),
    "string-empty": ValueCase(V.STRING, ""),
    "string-over-64KiB-window": ValueCase(V.STRING, "ab" * 50_000),
    "array-uint8": ValueCase(V.ARRAY, [0, 1, 255], V.UINT8),
    "array-int8": ValueCase(V.ARRAY, [-128, 0, 127], V.INT8),
    "array-uint16": ValueCase(V.ARRAY, [0, 65535], V.UINT16),
    "array-int16": ValueCase(V.ARRAY, [-32768, 32767], V.INT16),
    "array-uint32": ValueCase(V.ARRAY, [0, 2**32 - 1], V.UINT32),
    "array-int32": ValueCase(V.ARRAY, [-(2**31), 2**31 - 1], V.INT32),
    "array-float32": ValueCase(V.ARRAY, [0.1, -2.5, 3e38], V.FLOAT32),
    "array-bool": ValueCase(V.ARRAY, [True, False, True], V.BOOL),
    "array-uint64": ValueCase(V.ARRAY, [0, 2**64 - 1], V.UINT64),
    "array-int64": ValueCase(V.ARRAY, [-(2**63), 2**63 - 1], V.INT64),
    "array-float64": ValueCase(V.ARRAY, [1e-300, -0.5], V.FLOAT64),
    "array-string": ValueCase(V.ARRAY, ["", "a", "▁über", "x" * 70_000, "end"], V.STRING),
    "array-nested-ints": ValueCase(V.ARRAY, [[1, 2, 3], [4], [-5, 6]], V.INT32),
    "array-nested-strings": ValueCase(V.ARRAY, [["a", "bc"], ["", "▁d"]], V.STRING),
}
NESTED = {"array-nested-ints", "array-nested-strings"}


def _add_value(writer: GGUFWriter, key: str, case: ValueCase) -> None:
    if case.vtype is V.ARRAY and isinstance(case.value[0], list):
        writer.add_key_value(key, case.value, V.ARRAY)  # gguf-py infers the inner element type
    else:
        writer.add_key_value(key, case.value, case.vtype, sub_type=case.sub_type)


@pytest.fixture(scope="module", params=list(BYTE_ORDERS), ids=list(BYTE_ORDERS))
def values_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def fill(writer: GGUFWriter) -> None:
        for case_id, case in VALUE_CASES.items():
            _add_value(writer, f"test.{case_id}", case)

    path = tmp_path_factory.mktemp("values") / f"values-{request.param}.gguf"
    return write_gguf(path, fill, BYTE_ORDERS[request.param])


@pytest.mark.parametrize("case_id", list(VALUE_CASES))
def test_metadata_value_round_trips(values_file: Path, case_id: str) -> None:
    case = VALUE_CASES[case_id]
    with GGUFFile.open(values_file) as gguf:
        value = gguf.metadata[f"test.{case_id}"]
        assert case.expected() == plain(value)
        assert _types(plain(value)) == _types(case.expected())
        if case.vtype is V.ARRAY:
            assert isinstance(value, LazyArray)
            inner = GGUFValueType.ARRAY if case_id in NESTED else case.sub_type
            assert value.element_type is inner


def _types(value: Any) -> Any:
    if isinstance(value, list):
        return [_types(item) for item in value]
    return float if isinstance(value, float) else type(value)


@pytest.mark.parametrize("case_id", sorted(set(VALUE_CASES) - NESTED))
def test_metadata_value_matches_gguf_py(values_file: Path, case_id: str) -> None:
    key = f"test.{case_id}"
    reference = GGUFReader(values_file).fields[key].contents()
    with GGUFFile.open(values_file) as gguf:
        assert _as_stored(reference, VALUE_CASES[case_id].sub_type or VALUE_CASES[case_id].vtype) == plain(
            gguf.metadata[key]
        )


def test_metadata_keys_in_file_order_and_conveniences(values_file: Path) -> None:
    reference = GGUFReader(values_file)
    with GGUFFile.open(values_file) as gguf:
        assert list(gguf.metadata) == list(reference.fields)[3:]  # gguf-py lists the header fields first
        assert gguf.architecture == "bert"
        assert gguf.get("general.architecture") == "bert"
        assert gguf.get("no.such.key", 42) == 42
        with pytest.raises(TypeError):
            gguf.metadata["x"] = 1  # type: ignore[index]


# -- versions and the rich builder file -------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3], ids=["v2", "v3"])
@pytest.mark.parametrize("byte_order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_v2_and_v3_files_parse_identically(tmp_path: Path, version: int, byte_order: str) -> None:
    spec = builders.rich_spec(byte_order, version)
    built = builders.build(spec)
    with GGUFFile.open(built.write(tmp_path / "f.gguf")) as gguf:
        assert (gguf.version, gguf.byte_order) == (version, byte_order)
        assert gguf.file_size == len(built.data)
        assert gguf.data_offset == built.offsets["data"]
        assert _spec_metadata(spec) == {k: plain(v) for k, v in gguf.metadata.items()}
        for index, (name, info) in enumerate(gguf.tensors.items()):
            tensor = spec.tensors[index]
            assert (name, info.type, info.ne) == (tensor.name, tensor.type, tensor.ne)
            assert info.offset == built.offsets[f"tensor[{index}].data"]
            raw = built.data[info.offset : info.offset + info.nbytes]
            assert bytes(gguf.read_raw(name)) == raw


def _spec_metadata(spec: builders.Spec) -> dict[str, Any]:
    def decode(vtype: int, value: Any) -> Any:
        if isinstance(value, builders.Arr):
            return [decode(value.element_type, item) for item in value.items]
        return Float32(value) if vtype == V.FLOAT32 else value

    return {str(kv.key): decode(kv.type, kv.value) for kv in spec.kvs}


# -- lazy arrays ------------------------------------------------------------------------------------------

TOKENS = [("▁" if i % 3 == 0 else "") + f"t{i}" + "é" * (i % 7) for i in range(70_000)]  # ~1 MB: many windows
LONG_STRINGS = ["a" * 100_000, "b", "c" * 70_000, "", "d" * 65_536]
BYTES = [i * 7 % 256 for i in range(1_200_000)]  # crosses the 1 MiB to_numpy chunk of iteration
NESTED_INTS = [[j - i for j in range(i % 5)] for i in range(600)]  # empty inner arrays included
INTS = [10, -20, 30, -40, 50]
NESTED_STRINGS = [[f"{i}.{j}" for j in range(1 + i % 3)] for i in range(300)]
LAZY: dict[str, list[Any]] = {
    "tokens": TOKENS,
    "long": LONG_STRINGS,
    "bytes": BYTES,
    "nested_ints": NESTED_INTS,
    "nested_strings": NESTED_STRINGS,
    "ints": INTS,
}


@pytest.fixture(scope="module")
def lazy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = builders.Spec(
        kvs=(
            builders.KV("tokens", V.ARRAY, builders.Arr(V.STRING, TOKENS)),
            builders.KV("long", V.ARRAY, builders.Arr(V.STRING, LONG_STRINGS)),
            builders.KV("bytes", V.ARRAY, builders.Arr(V.UINT8, BYTES)),
            builders.KV(
                "nested_ints", V.ARRAY, builders.Arr(V.ARRAY, [builders.Arr(V.INT16, a) for a in NESTED_INTS])
            ),
            builders.KV(
                "nested_strings",
                V.ARRAY,
                builders.Arr(V.ARRAY, [builders.Arr(V.STRING, a) for a in NESTED_STRINGS]),
            ),
            builders.KV("ints", V.ARRAY, builders.Arr(V.INT32, INTS)),
        )
    )
    return builders.build(spec).write(tmp_path_factory.mktemp("lazy") / "lazy.gguf")


@pytest.fixture(scope="module")
def lazy(lazy_file: Path) -> Iterator[GGUFFile]:
    with GGUFFile.open(lazy_file) as gguf:
        yield gguf


INDICES = [0, 1, 255, 256, 257, 511, 512, 4095, 65_535, 69_999, -1, -256, -257, -70_000]


@pytest.mark.parametrize("index", INDICES, ids=[f"[{i}]" for i in INDICES])
def test_lazy_string_index_across_checkpoints_and_windows(lazy: GGUFFile, index: int) -> None:
    assert lazy_array(lazy, "tokens")[index] == TOKENS[index]


SLICES = {
    "[250:260]": slice(250, 260),
    "[:3]": slice(None, 3),
    "[-3:]": slice(-3, None),
    "[69990:80000]": slice(69_990, 80_000),
    "[10:2]-empty": slice(10, 2),
    "[::997]": slice(None, None, 997),
    "[300:100:-7]": slice(300, 100, -7),
    "[::-1]-head": slice(5, None, -1),
}


@pytest.mark.parametrize("key", ["tokens", "bytes"])
@pytest.mark.parametrize("cut", list(SLICES.values()), ids=list(SLICES))
def test_lazy_slices(lazy: GGUFFile, key: str, cut: slice) -> None:
    assert lazy_array(lazy, key)[cut] == LAZY[key][cut]


@pytest.mark.parametrize("key", list(LAZY))
def test_lazy_iteration_and_len(lazy: GGUFFile, key: str) -> None:
    array = lazy_array(lazy, key)
    assert len(array) == len(LAZY[key])
    assert plain(array) == LAZY[key]


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, -1])
def test_lazy_strings_longer_than_the_window(lazy: GGUFFile, index: int) -> None:
    assert lazy_array(lazy, "long")[index] == LONG_STRINGS[index]


@pytest.mark.parametrize("index", [0, 4, 255, 256, 599, -1])
def test_lazy_nested_arrays(lazy: GGUFFile, index: int) -> None:
    inner = lazy_array(lazy, "nested_ints")[index]
    assert isinstance(inner, LazyArray)
    assert inner.element_type is V.INT16
    assert list(inner) == NESTED_INTS[index]
    strings = lazy_array(lazy, "nested_strings")[index % 300]
    assert list(strings) == NESTED_STRINGS[index % 300]
    assert strings[-1] == NESTED_STRINGS[index % 300][-1]


def test_lazy_to_numpy(lazy: GGUFFile) -> None:
    array = lazy_array(lazy, "bytes")
    whole = array.to_numpy(max_bytes=len(BYTES))
    assert whole.dtype == np.uint8
    assert whole.tolist() == BYTES
    assert array.to_numpy(1_000_000, 1_000_010).tolist() == BYTES[1_000_000:1_000_010]
    with pytest.raises(GGUFError, match="max_bytes"):
        array.to_numpy()  # 1.2 MB > the 1 MiB default
    tokens = lazy_array(lazy, "tokens")
    with pytest.raises(GGUFError):
        tokens.to_numpy(0, 3)


@pytest.mark.parametrize("start", [-3, -1, -5], ids=lambda s: f"start={s}")
def test_lazy_to_numpy_negative_start_is_not_garbage(lazy: GGUFFile, start: int) -> None:
    # A negative start must count from the end (like a slice) or be refused, never read before the array.
    array = lazy_array(lazy, "ints")
    try:
        tail = array.to_numpy(start)
    except (GGUFError, IndexError, ValueError):
        return
    assert tail.tolist() == INTS[start:]


@pytest.mark.parametrize("bad", [len(TOKENS), -len(TOKENS) - 1], ids=["past-end", "before-start"])
def test_lazy_index_out_of_range(lazy: GGUFFile, bad: int) -> None:
    with pytest.raises(IndexError):
        lazy_array(lazy, "tokens")[bad]


def test_lazy_bad_index_type(lazy: GGUFFile) -> None:
    with pytest.raises(TypeError):
        lazy_array(lazy, "tokens")["0"]


# -- tensors: table and data against gguf-py -------------------------------------------------------------

# Every dequantizable type at 2-D, plus extra ranks; ne[0] = 2 blocks, 7 rows.
TENSOR_SHAPES: dict[str, tuple[GGMLQuantizationType, tuple[int, ...]]] = {
    f"{qtype.name.lower()}.weight": (qtype, (2 * GGML_QUANT_SIZES[qtype][0], 7))
    for qtype in sorted(SUPPORTED_TYPES)
}
TENSOR_SHAPES |= {
    "f32.1d": (Q.F32, (5,)),
    "f16.3d": (Q.F16, (4, 3, 2)),
    "q8_0.4d": (Q.Q8_0, (32, 2, 3, 2)),
    "q4_k.3d": (Q.Q4_K, (256, 1, 3)),
}


def _nbytes(qtype: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    return builders.declared_nbytes(qtype, ne)


def _add_tensors(writer: GGUFWriter) -> None:
    writer.add_custom_alignment(64)
    for index, (name, (qtype, ne)) in enumerate(TENSOR_SHAPES.items()):
        shape = tuple(reversed(ne))
        raw = np.frombuffer(builders.finite_bytes(_nbytes(qtype, ne), index), dtype=np.uint8)
        if qtype is Q.F32:
            writer.add_tensor(name, raw.view(np.float32).reshape(shape))
        elif qtype is Q.F16:
            writer.add_tensor(name, raw.view(np.float16).reshape(shape))
        else:
            byte_shape = (*shape[:-1], shape[-1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
            writer.add_tensor(name, raw.reshape(byte_shape), raw_dtype=qtype)


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tensors") / "tensors.gguf", _add_tensors)


@pytest.fixture(scope="module")
def reference(tensor_file: Path) -> dict[str, Any]:
    return {tensor.name: tensor for tensor in GGUFReader(tensor_file).tensors}


@pytest.fixture(scope="module")
def tensors(tensor_file: Path) -> Iterator[GGUFFile]:
    with GGUFFile.open(tensor_file) as gguf:
        yield gguf


def _reference_bytes(reference: dict[str, Any], name: str) -> bytes:
    data: bytes = reference[name].data.tobytes()
    return data


def _reference_floats(reference: dict[str, Any], info: TensorInfo) -> np.ndarray:
    raw = np.frombuffer(_reference_bytes(reference, info.name), dtype=np.uint8).reshape(info.n_rows, -1)
    return np.asarray(gguf_dequantize(raw, info.type), dtype=np.float32).reshape(info.n_rows, info.row_len)


def test_tensor_table_matches_gguf_py(tensors: GGUFFile, reference: dict[str, Any]) -> None:
    assert list(tensors.tensors) == list(TENSOR_SHAPES)
    assert tensors.alignment == 64
    for name, info in tensors.tensors.items():
        ref = reference[name]
        assert info.name == name
        assert info.type is ref.tensor_type
        assert info.ne == tuple(int(d) for d in ref.shape) == TENSOR_SHAPES[name][1]
        assert info.shape == tuple(reversed(info.ne))
        assert info.n_elements == ref.n_elements
        assert info.nbytes == ref.n_bytes
        assert info.offset == ref.data_offset
        assert info.offset % 64 == 0
        assert info.row_len == info.ne[0]
        assert info.n_rows * info.row_len == info.n_elements
        assert info.row_nbytes * info.n_rows == info.nbytes


def test_unknown_tensor_name(tensors: GGUFFile) -> None:
    with pytest.raises(GGUFError, match="no_such"):
        tensors.read_raw("no_such")


NAMES = list(TENSOR_SHAPES)


@pytest.mark.parametrize("max_bytes", [0, 100, 4096, 1 << 20], ids=["one-block", "100B", "4KiB", "1MiB"])
@pytest.mark.parametrize("name", NAMES)
def test_iter_raw_chunks(tensors: GGUFFile, reference: dict[str, Any], name: str, max_bytes: int) -> None:
    info = tensors.tensors[name]
    block_bytes = GGML_QUANT_SIZES[info.type][1]
    limit = max_bytes or block_bytes
    if limit < block_bytes:
        with pytest.raises(GGUFError, match="block"):
            list(tensors.iter_raw(name, max_bytes=limit))
        return
    chunks = list(tensors.iter_raw(name, max_bytes=limit))
    assert all(0 < len(chunk) <= limit and len(chunk) % block_bytes == 0 for chunk in chunks)
    assert b"".join(bytes(chunk) for chunk in chunks) == _reference_bytes(reference, name)


@pytest.mark.parametrize("max_bytes", [0, -1, -(1 << 20)], ids=["zero", "minus-one", "minus-1MiB"])
@pytest.mark.parametrize("method", ["iter_raw", "iter_rows"])
def test_streaming_refuses_non_positive_max_bytes(tensors: GGUFFile, method: str, max_bytes: int) -> None:
    # A silent empty stream would look like an empty tensor to the caller.
    with pytest.raises((GGUFError, ValueError)):
        list(getattr(tensors, method)("f32.weight", max_bytes=max_bytes))


def test_iter_raw_refuses_max_bytes_below_one_block(tensors: GGUFFile) -> None:
    with pytest.raises(GGUFError, match="block"):
        list(tensors.iter_raw("q6_k.weight", max_bytes=GGML_QUANT_SIZES[Q.Q6_K][1] - 1))


@pytest.mark.parametrize("rows_per_block", [1, 2, 3, 1000], ids=lambda r: f"{r}-rows")
@pytest.mark.parametrize("name", NAMES)
def test_iter_rows_equal_whole_dequantize(
    tensors: GGUFFile, reference: dict[str, Any], name: str, rows_per_block: int
) -> None:
    info = tensors.tensors[name]
    max_bytes = rows_per_block * info.row_len * 4 + 3  # never a multiple of a row: blocks must round down
    expected = _reference_floats(reference, info)
    next_row = 0
    for first, block in tensors.iter_rows(name, max_bytes=max_bytes):
        assert first == next_row
        assert block.dtype == np.float32
        assert block.nbytes <= max_bytes
        assert block.shape == (min(rows_per_block, info.n_rows - first), info.row_len)
        np.testing.assert_allclose(block, expected[first : first + len(block)], rtol=1e-6, atol=1e-6)
        next_row = first + len(block)
    assert next_row == info.n_rows


def test_iter_rows_refuses_a_row_wider_than_max_bytes(tensors: GGUFFile) -> None:
    info = tensors.tensors["q4_k.weight"]
    with pytest.raises(GGUFError, match="max_bytes"):
        list(tensors.iter_rows(info.name, max_bytes=info.row_len * 4 - 1))


@pytest.mark.parametrize("name", NAMES)
def test_read_rows_equal_corresponding_rows(tensors: GGUFFile, reference: dict[str, Any], name: str) -> None:
    info = tensors.tensors[name]
    rows = [info.n_rows - 1, 0, info.n_rows // 2, 0]
    got = tensors.read_rows(name, rows)
    assert got.dtype == np.float32
    assert got.shape == (len(rows), info.row_len)
    np.testing.assert_allclose(got, _reference_floats(reference, info)[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad_row", [7, -1, 10**12], ids=["n_rows", "negative", "huge"])
def test_read_rows_refuses_rows_out_of_range(tensors: GGUFFile, bad_row: int) -> None:
    with pytest.raises(GGUFError, match="range"):
        tensors.read_rows("q8_0.weight", [0, bad_row])


def test_read_rows_refuses_more_than_max_bytes(tensors: GGUFFile) -> None:
    info = tensors.tensors["q8_0.weight"]
    with pytest.raises(GGUFError, match="max_bytes"):
        tensors.read_rows(info.name, [0, 1, 2], max_bytes=3 * info.row_len * 4 - 1)
    assert tensors.read_rows(info.name, [0, 1, 2], max_bytes=3 * info.row_len * 4).shape == (3, info.row_len)


@pytest.mark.parametrize("name", NAMES)
def test_read_tensor_and_read_raw(tensors: GGUFFile, reference: dict[str, Any], name: str) -> None:
    info = tensors.tensors[name]
    full = tensors.read_tensor(name)
    assert full.shape == info.shape
    np.testing.assert_allclose(
        full.reshape(info.n_rows, info.row_len), _reference_floats(reference, info), rtol=1e-6, atol=1e-6
    )
    raw = tensors.read_raw(name)
    assert raw.dtype == np.uint8
    assert raw.tobytes() == _reference_bytes(reference, name)


def test_read_tensor_and_read_raw_refuse_above_max_bytes(tensors: GGUFFile) -> None:
    info = tensors.tensors["q5_k.weight"]
    with pytest.raises(GGUFError, match="iter_rows"):
        tensors.read_tensor(info.name, max_bytes=info.n_elements * 4 - 1)
    with pytest.raises(GGUFError, match="iter_raw"):
        tensors.read_raw(info.name, max_bytes=info.nbytes - 1)
    assert tensors.read_tensor(info.name, max_bytes=info.n_elements * 4).shape == info.shape
    assert tensors.read_raw(info.name, max_bytes=info.nbytes).size == info.nbytes


def test_default_max_bytes_is_one_mib(tmp_path: Path) -> None:
    # 512 x 513 F32 = 1,050,624 bytes: just over 1 MiB, so the defaults must refuse the whole tensor.
    data = np.arange(512 * 513, dtype=np.float32).reshape(513, 512)
    path = write_gguf(tmp_path / "big.gguf", lambda w: w.add_tensor("big", data))
    with GGUFFile.open(path) as gguf:
        with pytest.raises(GGUFError):
            gguf.read_tensor("big")
        with pytest.raises(GGUFError):
            gguf.read_raw("big")
        blocks = list(gguf.iter_rows("big"))
        assert all(block.nbytes <= 1 << 20 for _, block in blocks)
        assert len(blocks) == 2
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)
        assert all(len(chunk) <= 1 << 20 for chunk in gguf.iter_raw("big"))


# -- big-endian -------------------------------------------------------------------------------------------

BE_F32 = np.linspace(-3, 3, 6 * 8, dtype=np.float32).reshape(6, 8)
BE_F16 = np.linspace(-1, 1, 4 * 32, dtype=np.float16).reshape(4, 32)
BE_Q8 = np.frombuffer(builders.finite_bytes(2 * 34, 7), dtype=np.uint8).reshape(2, 34)


@pytest.fixture(scope="module")
def big_endian_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def fill(writer: GGUFWriter) -> None:
        writer.add_uint32("test.u32", 0x01020304)
        writer.add_float32("test.f32", 1.25)
        writer.add_array("test.i16", [1, -2, 300])
        writer.add_key_value("test.u64s", [1, 2**40], V.ARRAY, sub_type=V.UINT64)
        writer.add_array("test.strings", ["a", "bé"])
        writer.add_tensor("f32", BE_F32)
        writer.add_tensor("f16", BE_F16)
        writer.add_tensor("q8", BE_Q8, raw_dtype=Q.Q8_0)

    return write_gguf(tmp_path_factory.mktemp("be") / "be.gguf", fill, GGUFEndian.BIG)


def test_big_endian_metadata(big_endian_file: Path) -> None:
    with GGUFFile.open(big_endian_file) as gguf:
        assert gguf.byte_order == ">"
        assert gguf.version == 3
        assert gguf.get("test.u32") == 0x01020304
        assert gguf.get("test.f32") == 1.25
        assert plain(gguf.get("test.i16")) == [1, -2, 300]
        assert plain(gguf.get("test.u64s")) == [1, 2**40]
        assert plain(gguf.get("test.strings")) == ["a", "bé"]
        u64s = lazy_array(gguf, "test.u64s")
        assert u64s.to_numpy().dtype.isnative
        reference = GGUFReader(big_endian_file)
        for key in ("test.u32", "test.f32", "test.i16", "test.u64s", "test.strings"):
            assert plain(gguf.get(key)) == reference.fields[key].contents()


@pytest.mark.parametrize(("name", "values"), [("f32", BE_F32), ("f16", BE_F16)], ids=["F32", "F16"])
def test_big_endian_float_tensors(big_endian_file: Path, name: str, values: np.ndarray) -> None:
    expected = values.astype(np.float32)
    with GGUFFile.open(big_endian_file) as gguf:
        info = gguf.tensors[name]
        assert info.shape == values.shape
        np.testing.assert_array_equal(gguf.read_tensor(name), expected)
        np.testing.assert_array_equal(
            np.concatenate([b for _, b in gguf.iter_rows(name, max_bytes=300)]), expected
        )
        np.testing.assert_array_equal(gguf.read_rows(name, [3, 1]), expected[[3, 1]])
        assert (
            b"".join(chunk.tobytes() for chunk in gguf.iter_raw(name))
            == values.astype(values.dtype.newbyteorder(">")).tobytes()
        )


@pytest.mark.parametrize(
    "read",
    [
        lambda g: list(g.iter_rows("q8")),
        lambda g: g.read_rows("q8", [0]),
        lambda g: g.read_tensor("q8"),
    ],
    ids=["iter_rows", "read_rows", "read_tensor"],
)
def test_big_endian_quantized_data_refused(big_endian_file: Path, read: Callable[[GGUFFile], Any]) -> None:
    with GGUFFile.open(big_endian_file) as gguf:
        with pytest.raises(UnsupportedTensorType, match=r"q8.*Q8_0.*big-endian"):
            read(gguf)
        assert gguf.read_raw("q8").tobytes() == BE_Q8.tobytes()  # raw bytes are still available


# -- closed files -----------------------------------------------------------------------------------------

CLOSED_READS: dict[str, Callable[[GGUFFile], Any]] = {
    "iter_raw": lambda g: list(g.iter_raw("w")),
    "iter_rows": lambda g: list(g.iter_rows("w")),
    "read_rows": lambda g: g.read_rows("w", [0]),
    "read_tensor": lambda g: g.read_tensor("w"),
    "read_raw": lambda g: g.read_raw("w"),
    "numeric-array-element": lambda g: lazy_array(g, "ints")[0],
    "numeric-array-to_numpy": lambda g: lazy_array(g, "ints").to_numpy(),
    "string-array-element": lambda g: lazy_array(g, "strings")[0],
    "string-array-iteration": lambda g: list(lazy_array(g, "strings")),
    "nested-array-element": lambda g: lazy_array(g, "nested")[0],
}


@pytest.mark.parametrize("read", list(CLOSED_READS.values()), ids=list(CLOSED_READS))
def test_reading_a_closed_file_raises_gguf_error(tmp_path: Path, read: Callable[[GGUFFile], Any]) -> None:
    spec = builders.Spec(
        kvs=(
            builders.KV("ints", V.ARRAY, builders.Arr(V.INT32, [1, 2])),
            builders.KV("strings", V.ARRAY, builders.Arr(V.STRING, ["a", "b"])),
            builders.KV("nested", V.ARRAY, builders.Arr(V.ARRAY, [builders.Arr(V.STRING, ["c"])])),
        ),
        tensors=(builders.Tensor("w", Q.F32, (4, 2)),),
    )
    path = builders.build(spec).write(tmp_path / "f.gguf")
    with GGUFFile.open(path) as gguf:
        pass
    with pytest.raises(GGUFError, match="closed"):
        read(gguf)
    gguf.close()  # closing twice is harmless
    assert gguf.tensors["w"].ne == (4, 2)  # the parsed table stays usable


SHRUNK_READS: dict[str, Callable[[GGUFFile], Any]] = {
    "iter_raw": lambda g: list(g.iter_raw("w")),
    "read_rows": lambda g: g.read_rows("w", [1]),
    "numeric-array-element": lambda g: lazy_array(g, "ints")[-1],
    "string-array-element": lambda g: lazy_array(g, "strings")[-1],
}


@pytest.mark.parametrize("read", list(SHRUNK_READS.values()), ids=list(SHRUNK_READS))
def test_file_shrinking_while_open_raises_gguf_error(tmp_path: Path, read: Callable[[GGUFFile], Any]) -> None:
    spec = builders.Spec(
        kvs=(
            builders.KV("strings", V.ARRAY, builders.Arr(V.STRING, ["first", "last"])),
            builders.KV("ints", V.ARRAY, builders.Arr(V.INT32, [1, 2])),
        ),
        tensors=(builders.Tensor("w", Q.F32, (4, 2)),),
    )
    path = builders.build(spec).write(tmp_path / "f.gguf")
    with GGUFFile.open(path) as gguf:
        path.write_bytes(b"")  # e.g. a download restarted over the file
        with pytest.raises(GGUFError, match=r"shr|trunc|end"):
            read(gguf)


def test_errors_share_the_package_root() -> None:
    assert issubclass(GGUFError, GGUFSandboxError)
    assert issubclass(UnsupportedTensorType, GGUFError)


# -- synthetic models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor_type", sorted(WRITABLE_TYPES), ids=lambda t: t.name)
def test_synthetic_bert_reads_back(tmp_path: Path, tensor_type: GGMLQuantizationType) -> None:
    spec = SyntheticBert(
        vocab_size=100, hidden=64, layers=1, heads=2, ffn=128, context=16, tensor_type=tensor_type
    )
    path = write_synthetic_bert(tmp_path / "bert.gguf", spec)
    reference = {t.name: t for t in GGUFReader(path).tensors}
    with GGUFFile.open(path) as gguf:
        assert gguf.architecture == "bert"
        assert gguf.get("bert.embedding_length") == 64
        assert plain(gguf.get("tokenizer.ggml.tokens")) == vocabulary(100)
        layout = list(spec.tensor_shapes())
        assert list(gguf.tensors) == [name for name, _, _ in layout]
        for name, shape, is_matrix in layout:
            info = gguf.tensors[name]
            assert info.shape == shape
            assert info.type is (tensor_type if is_matrix else Q.F32)
            assert (info.offset, info.nbytes) == (reference[name].data_offset, reference[name].n_bytes)
        assert sum(info.nbytes for info in gguf.tensors.values()) == spec.nbytes()
        embd = gguf.tensors["token_embd.weight"]
        rows = np.concatenate([block for _, block in gguf.iter_rows(embd.name, max_bytes=4096)])
        np.testing.assert_allclose(rows, _reference_floats(reference, embd), rtol=1e-6, atol=1e-6)
