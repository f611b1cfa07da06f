"""Malformed and hostile GGUF files: refused with GGUFError naming field and offset, before allocating."""

from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_sandbox.errors import GGUFError, UnsupportedTensorType
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import MAX_NESTED_ARRAYS, GGUFFile
from tests.gguf import builders
from tests.gguf.builders import KV, Arr, Spec, Str, Tensor

Q = GGMLQuantizationType
V = GGUFValueType
BOMB_PEAK_LIMIT = 2 << 20
REPO = Path(__file__).resolve().parents[2]

BASE = Spec(
    kvs=(
        KV("general.architecture", V.STRING, "bert"),
        KV("tokenizer.ggml.tokens", V.ARRAY, Arr(V.STRING, ["a", "bc"])),
    ),
    tensors=(Tensor("a", Q.F32, (4, 2)), Tensor("b", Q.Q8_0, (32, 2))),
)
EXTRA = "kv[2]"  # where with_kv() puts the extra pair


def with_kv(kv: KV, spec: Spec = BASE) -> Spec:
    return replace(spec, kvs=(*spec.kvs, kv))


def with_tensors(*tensors: Tensor) -> Spec:
    return replace(BASE, tensors=tensors)


Where = tuple[tuple[str, int], ...]  # acceptable (field key in Built.offsets, delta) pairs


@dataclass(frozen=True)
class Case:
    """A malformed file, the field its error must name (regex) and the offsets it may cite."""

    spec: Spec
    field: str
    at: Where | None  # None: no byte offset makes sense for this case

    def build(self) -> builders.Built:
        return builders.build(self.spec)


def at(*keys: str, delta: int = 0) -> Where:
    return tuple((key, delta) for key in keys)


ALIGNMENT_AT = at(f"{EXTRA}", f"{EXTRA}.value")
DEEP = Arr(V.UINT8, [1])
for _ in range(9):
    DEEP = Arr(V.ARRAY, [DEEP])

CASES: dict[str, Case] = {
    # header
    "bad-magic": Case(replace(BASE, magic=b"GGUX"), "magic", at("magic")),
    "magic-lowercase": Case(replace(BASE, magic=b"gguf"), "magic", at("magic")),
    "version-0": Case(replace(BASE, version=0), "version", at("version")),
    "version-1": Case(replace(BASE, version=1), "version", at("version")),
    "version-4": Case(replace(BASE, version=4), "version", at("version")),
    "version-1-big-endian": Case(replace(BASE, version=1, byte_order=">"), "version", at("version")),
    "version-4-big-endian": Case(replace(BASE, version=4, byte_order=">"), "version", at("version")),
    # counts
    "tensor-count-bomb-2^60": Case(replace(BASE, tensor_count=2**60), "tensor count", at("tensor_count")),
    "tensor-count-2^64-1": Case(replace(BASE, tensor_count=2**64 - 1), "tensor count", at("tensor_count")),
    "kv-count-bomb-2^60": Case(replace(BASE, kv_count=2**60), "metadata count", at("kv_count")),
    "kv-count-one-too-many": Case(
        replace(BASE, tensors=(), kv_count=3), r"metadata key #2", at("header_end")
    ),
    "tensor-count-one-too-many": Case(
        replace(BASE, tensors=(Tensor("a", Q.F32, (4, 2), data=b""),), tensor_count=2),
        r"tensor #1 name",
        at("header_end"),
    ),
    # strings
    "key-length-bomb-2^40": Case(with_kv(KV(Str(b"abc", 2**40), V.UINT8, 1)), "metadata key #2", at(EXTRA)),
    "key-length-2^64-1": Case(with_kv(KV(Str(b"abc", 2**64 - 1), V.UINT8, 1)), "metadata key #2", at(EXTRA)),
    "key-over-64KiB-limit-inside-file": Case(
        with_kv(KV("k" * 70_000, V.UINT8, 1)), "metadata key #2", at(EXTRA)
    ),
    "key-length-past-eof": Case(
        replace(BASE, kvs=(KV(Str(b"abc", 100), V.UINT8, 1),), tensors=()),
        "metadata key #0",
        at("kv[0]") + at("kv[0]", delta=8),
    ),
    "string-value-bomb-2^40": Case(
        with_kv(KV("s", V.STRING, Str(b"abc", 2**40))), "'?s'?", at(f"{EXTRA}.value")
    ),
    "string-value-over-1MiB-inside-file": Case(
        with_kv(KV("s", V.STRING, "x" * (1 << 20))), "'?s'?", at(f"{EXTRA}.value")
    ),
    "string-in-array-bomb-2^40": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.STRING, ["ok", Str(b"ab", 2**40)]))),
        r"arr\[1\]",
        at(f"{EXTRA}.value", delta=4 + 8 + 10),
    ),
    "string-in-array-bomb-2^40-mid-group": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.STRING, [Str(b"ab", 2**40), "ok"]))),
        r"arr\[0\]",
        at(f"{EXTRA}.value", delta=4 + 8),
    ),
    "tensor-name-bomb-2^40": Case(
        with_tensors(Tensor(Str(b"a", 2**40), Q.F32, (4, 2))), "tensor #0 name", at("tensor[0]")
    ),
    "invalid-utf8-key": Case(
        with_kv(KV(Str(b"k\xff"), V.UINT8, 1)), "metadata key #2", at(EXTRA) + at(EXTRA, delta=8)
    ),
    "invalid-utf8-string-value": Case(
        with_kv(KV("s", V.STRING, Str(b"\xc3("))),
        "'?s'?",
        at(f"{EXTRA}.value") + at(f"{EXTRA}.value", delta=8),
    ),
    "invalid-utf8-tensor-name": Case(
        with_tensors(Tensor(Str(b"\xe2\x82"), Q.F32, (4, 2))),
        "tensor #0 name",
        at("tensor[0]") + at("tensor[0]", delta=8),
    ),
    # arrays
    "array-count-bomb-2^60-uint8": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.UINT8, [], claimed=2**60))), "arr", at(f"{EXTRA}.value", delta=4)
    ),
    "array-count-2^64-1-float64": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.FLOAT64, [], claimed=2**64 - 1))),
        "arr",
        at(f"{EXTRA}.value", delta=4),
    ),
    "array-count-bomb-2^60-string": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.STRING, [], claimed=2**60))), "arr", at(f"{EXTRA}.value", delta=4)
    ),
    "array-count-bomb-2^60-array": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [], claimed=2**60))), "arr", at(f"{EXTRA}.value", delta=4)
    ),
    "nested-array-count-bomb-2^60": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [Arr(V.UINT8, [], claimed=2**60)]))),
        r"arr\[0\]",
        at(f"{EXTRA}.value", delta=4 + 8 + 4),
    ),
    "array-one-element-too-many": Case(
        replace(BASE, tensors=(), kvs=(KV("arr", V.ARRAY, Arr(V.UINT32, [1, 2], claimed=3)),)),
        "arr",
        at("kv[0].value", delta=4),
    ),
    "arrays-nested-too-deep": Case(
        with_kv(KV("deep", V.ARRAY, DEEP)),
        "deep",
        tuple((f"{EXTRA}.value", 12 * depth) for depth in range(10)),
    ),
    # value types
    "unknown-value-type-13": Case(with_kv(KV("k", 13, b"\0" * 8)), "'?k'?", at(f"{EXTRA}.type")),
    "unknown-value-type-2^32-1": Case(with_kv(KV("k", 2**32 - 1, b"")), "'?k'?", at(f"{EXTRA}.type")),
    "unknown-array-element-type-99": Case(
        with_kv(KV("arr", V.ARRAY, Arr(99, []))), "arr", at(f"{EXTRA}.value")
    ),
    "unknown-nested-element-type": Case(
        with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [Arr(77, [])]))), r"arr\[0\]", at(f"{EXTRA}.value", delta=12)
    ),
    # tensor table: dimensions and types
    "tensor-zero-dims": Case(
        with_tensors(Tensor("a", Q.F32, (), n_dims=0, data=b"")),
        "dimension",
        at("tensor[0]", "tensor[0].n_dims"),
    ),
    "tensor-five-dims": Case(
        with_tensors(Tensor("a", Q.F32, (1, 1, 1, 1, 1))), "dimension", at("tensor[0]", "tensor[0].n_dims")
    ),
    "tensor-dims-2^32-1": Case(
        with_tensors(Tensor("a", Q.F32, (4,), n_dims=2**32 - 1)),
        "dimension",
        at("tensor[0]", "tensor[0].n_dims"),
    ),
    "tensor-dim-zero": Case(
        with_tensors(Tensor("a", Q.F32, (4, 0), data=b"")),
        "dimension",
        at("tensor[0]", "tensor[0].ne") + at("tensor[0].ne", delta=8),
    ),
    "tensor-dim-2^64-1": Case(
        with_tensors(Tensor("a", Q.F32, (2**64 - 1,), data=b"")), "dimension", at("tensor[0]", "tensor[0].ne")
    ),
    "tensor-dims-product-2^64": Case(
        with_tensors(Tensor("a", Q.F32, (2**32, 2**32), data=b"")),
        "dimension",
        at("tensor[0]", "tensor[0].ne"),
    ),
    "tensor-dims-product-2^63": Case(
        with_tensors(Tensor("a", Q.F32, (2**31, 2**31, 2), data=b"")),
        "dimension",
        at("tensor[0]", "tensor[0].ne"),
    ),
    "tensor-row-not-a-whole-block": Case(
        with_tensors(Tensor("a", Q.Q8_0, (33, 1), data=b"\0" * 64)),
        "row length|block",
        at("tensor[0]", "tensor[0].ne"),
    ),
    "tensor-type-4-removed-q4_2": Case(
        with_tensors(Tensor("a", 4, (32, 1), data=b"\0" * 64)), "type", at("tensor[0].type")
    ),
    "tensor-type-1000": Case(
        with_tensors(Tensor("a", 1000, (4,), data=b"\0" * 16)), "type", at("tensor[0].type")
    ),
    "tensor-type-2^32-1": Case(
        with_tensors(Tensor("a", 2**32 - 1, (4,), data=b"\0" * 16)), "type", at("tensor[0].type")
    ),
    # tensor table: offsets and sizes
    "tensor-offset-misaligned": Case(
        with_tensors(Tensor("a", Q.F32, (4, 2), offset=1)),
        "offset|align",
        at("tensor[0]", "tensor[0].offset"),
    ),
    "tensor-offset-past-eof": Case(
        with_tensors(Tensor("a", Q.F32, (4, 2)), Tensor("b", Q.F32, (4, 2), offset=1 << 20, data=b"")),
        "past|end",
        at("data", delta=1 << 20),
    ),
    "tensor-offset-2^64-32": Case(
        with_tensors(Tensor("a", Q.F32, (4, 2)), Tensor("b", Q.F32, (4, 2), offset=2**64 - 32, data=b"")),
        "past|end",
        at("data", delta=2**64 - 32),
    ),
    "tensor-claims-more-bytes-than-the-file": Case(
        with_tensors(Tensor("a", Q.F32, (1024, 1024), data=b"\0" * 32)), "past|end", at("data")
    ),
    "tensor-claims-2^40-bytes": Case(
        with_tensors(Tensor("a", Q.F32, (2**38,), data=b"\0" * 32)), "past|end", at("data")
    ),
    "tensor-data-starts-past-eof": Case(
        replace(BASE, kvs=(KV("k", V.UINT8, 1),), tensors=(Tensor("a", Q.F32, (1,), data=b""),)),
        "past|end|start",
        at("data"),
    ),
    "overlapping-tensors-same-offset": Case(
        with_tensors(Tensor("a", Q.F32, (8,)), Tensor("b", Q.F32, (8,), offset=0)), "overlap", at("data")
    ),
    "overlapping-tensors-partial": Case(
        with_tensors(Tensor("a", Q.F32, (16,)), Tensor("b", Q.F32, (16,), offset=32)),
        "overlap",
        at("data", delta=32),
    ),
    # duplicates
    "duplicate-metadata-key": Case(
        with_kv(KV("general.architecture", V.STRING, "llama")), "twice|duplicate", at(EXTRA)
    ),
    "duplicate-tensor-name": Case(
        with_tensors(Tensor("a", Q.F32, (4,)), Tensor("a", Q.F32, (4,))), "twice|duplicate", at("tensor[1]")
    ),
    # alignment
    "alignment-zero": Case(builders.with_alignment(BASE, 0), "general.alignment", ALIGNMENT_AT),
    "alignment-not-power-of-two": Case(builders.with_alignment(BASE, 48), "general.alignment", ALIGNMENT_AT),
    "alignment-2^30-over-maximum": Case(
        builders.with_alignment(BASE, 2**30), "general.alignment", ALIGNMENT_AT
    ),
    "alignment-negative-int32": Case(
        builders.with_alignment(BASE, -32, V.INT32), "general.alignment", ALIGNMENT_AT
    ),
    "alignment-as-float": Case(
        builders.with_alignment(BASE, 32.0, V.FLOAT32), "general.alignment", ALIGNMENT_AT
    ),
    "alignment-as-bool": Case(builders.with_alignment(BASE, True, V.BOOL), "general.alignment", ALIGNMENT_AT),
    "alignment-as-string": Case(
        with_kv(KV("general.alignment", V.STRING, "32")), "general.alignment", ALIGNMENT_AT
    ),
    "alignment-as-array": Case(
        with_kv(KV("general.alignment", V.ARRAY, Arr(V.UINT32, [32]))), "general.alignment", ALIGNMENT_AT
    ),
    # big-endian headers get the same checks
    "big-endian-string-value-bomb": Case(
        with_kv(KV("s", V.STRING, Str(b"abc", 2**40)), replace(BASE, byte_order=">", tensors=())),
        "'?s'?",
        at(f"{EXTRA}.value"),
    ),
    "big-endian-tensor-past-eof": Case(
        replace(BASE, byte_order=">", tensors=(Tensor("a", Q.F32, (1024,), data=b"\0" * 16),)),
        "past|end",
        at("data"),
    ),
}
BOMBS = [case_id for case_id in CASES if "bomb" in case_id or "2^" in case_id or "more-bytes" in case_id]


def mentions(message: str, offset: int) -> bool:
    """`offset` written as a whole number in `message`, plain or with thousands separators."""
    return any(
        re.search(rf"(?<![\d,]){re.escape(form)}(?![\d,])", message) for form in (str(offset), f"{offset:,}")
    )


def open_refused(path: Path) -> GGUFError:
    with pytest.raises(GGUFError) as caught:
        GGUFFile.open(path).close()
    return caught.value


@pytest.mark.parametrize("case_id", list(CASES))
def test_malformed_file_is_refused_naming_field_and_offset(tmp_path: Path, case_id: str) -> None:
    case = CASES[case_id]
    built = case.build()
    message = str(open_refused(built.write(tmp_path / f"{case_id}.gguf")))
    assert re.search(case.field, message, re.IGNORECASE), f"field /{case.field}/ not named in: {message}"
    if case.at is not None:
        wanted = sorted({built.offsets[key] + delta for key, delta in case.at})
        assert any(mentions(message, offset) for offset in wanted), f"none of offsets {wanted} in: {message}"


@pytest.mark.parametrize("case_id", BOMBS)
def test_bomb_is_refused_before_allocating(tmp_path: Path, case_id: str) -> None:
    path = CASES[case_id].build().write(tmp_path / f"{case_id}.gguf")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        open_refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BOMB_PEAK_LIMIT, f"open() peaked at {peak:,} bytes for {case_id}"


BEYOND_REAL_MODELS = 100_000  # real GGUFs carry < 100 metadata pairs and a few thousand tensors at most


def _many_pairs(count: int) -> bytes:
    pairs = (struct.pack("<Q", len(key)) + key + struct.pack("<IB", V.UINT8, 1) for key in _names("k", count))
    return struct.pack("<4sIQQ", b"GGUF", 3, 0, count) + b"".join(pairs)


def _many_tensors(count: int) -> bytes:
    entries = (
        struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 8, Q.F32, 32 * index)
        for index, name in enumerate(_names("t", count))
    )
    header = struct.pack("<4sIQQ", b"GGUF", 3, count, 0) + b"".join(entries)
    padding = bytes(builders.align(len(header), 32) - len(header))
    return header + padding + bytes(32 * count)


def _names(prefix: str, count: int) -> Iterator[bytes]:
    return (f"{prefix}{index}".encode() for index in range(count))


MANY: dict[str, tuple[Callable[[int], bytes], str, int]] = {
    "metadata": (_many_pairs, "metadata count", 16),
    "tensors": (_many_tensors, "tensor count", 8),
}


@pytest.mark.parametrize("what", list(MANY))
def test_counts_beyond_any_real_model_are_refused_before_allocating(tmp_path: Path, what: str) -> None:
    # Each pair or tensor costs hundreds of bytes of Python objects: a 7 MB file of 100,000 tiny tensors
    # would take ~40 MB to open, more than a 64 MB process has left after imports.
    make, field, offset = MANY[what]
    path = tmp_path / f"many-{what}.gguf"
    path.write_bytes(make(BEYOND_REAL_MODELS))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        message = str(open_refused(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert field in message
    assert mentions(message, offset)
    assert peak < BOMB_PEAK_LIMIT, f"open() peaked at {peak:,} bytes before refusing {what}"


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    """Every case is one defect away from this file, so it must open cleanly."""
    with GGUFFile.open(builders.build(BASE).write(tmp_path / "base.gguf")) as gguf:
        assert list(gguf.tensors) == ["a", "b"]


@pytest.mark.parametrize("seed", ["rich", "rich-big-endian", "vocab", "minimal-v2"])
def test_truncation_at_every_byte_is_refused(tmp_path: Path, seed: str) -> None:
    data = builders.seed_files()[seed].data
    path = tmp_path / "cut.gguf"
    escapes = []
    for size in range(len(data)):
        path.write_bytes(data[:size])
        try:
            GGUFFile.open(path).close()
        except GGUFError as error:
            assert str(error)
        else:
            escapes.append(size)
    assert not escapes, f"{seed}: truncations to {escapes[:10]} bytes (of {len(data)}) were accepted"
    path.write_bytes(data)
    GGUFFile.open(path).close()


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    for data in (b"", b"G", b"GGUF", b"GGUF\x03\0\0\0", b"GGUF\x03\0\0\0" + b"\0" * 15):
        path = tmp_path / "tiny.gguf"
        path.write_bytes(data)
        message = str(open_refused(path))
        assert re.search("GGUF|header|truncated", message), message


@pytest.mark.parametrize(
    "make",
    [lambda p: p / "missing.gguf", lambda p: p],
    ids=["missing-file", "directory"],
)
def test_paths_that_are_not_files(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    assert str(make(tmp_path)) in str(open_refused(make(tmp_path)))


def test_path_with_nul_byte_is_a_gguf_error(tmp_path: Path) -> None:
    open_refused(Path(f"{tmp_path}/bad\0name.gguf"))


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer appears: the reader must check before it opens.
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    probe = (
        "import sys\n"
        "from gguf_sandbox.errors import GGUFError\n"
        "from gguf_sandbox.gguf.reader import GGUFFile\n"
        "try:\n"
        "    GGUFFile.open(sys.argv[1])\n"
        "except GGUFError:\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(fifo)], timeout=20, cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("GGUFFile.open() on a FIFO blocked for 20 s instead of refusing it")
    assert done.returncode == 0


UNDECODABLE = [Q.IQ2_XXS, Q.Q8_1, Q.Q8_K, Q.I8, Q.F64, Q.TQ1_0]


@pytest.mark.parametrize("qtype", UNDECODABLE, ids=lambda t: t.name)
def test_known_but_undecodable_tensor_type_is_refused_at_read(
    tmp_path: Path, qtype: GGMLQuantizationType
) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    path = builders.build(with_tensors(Tensor("odd.weight", qtype, (block, 2)))).write(tmp_path / "odd.gguf")
    with GGUFFile.open(path) as gguf:
        assert len(bytes(gguf.read_raw("odd.weight"))) == gguf.tensors["odd.weight"].nbytes
        for read in (lambda: list(gguf.iter_rows("odd.weight")), lambda: gguf.read_rows("odd.weight", [1])):
            with pytest.raises(UnsupportedTensorType, match=rf"odd\.weight.*{qtype.name}"):
                read()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.BF16], ids=lambda t: t.name)
def test_big_endian_quantized_tensor_is_refused_at_read(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    spec = replace(BASE, byte_order=">", tensors=(Tensor("q", qtype, (GGML_QUANT_SIZES[qtype][0], 2)),))
    path = builders.build(spec).write(tmp_path / "be.gguf")
    with (
        GGUFFile.open(path) as gguf,
        pytest.raises(UnsupportedTensorType, match=rf"q.*{qtype.name}.*big-endian"),
    ):
        list(gguf.iter_rows("q"))


def test_string_array_element_over_the_string_limit_is_refused_on_access(tmp_path: Path) -> None:
    spec = with_kv(KV("arr", V.ARRAY, Arr(V.STRING, ["ok", "y" * ((1 << 20) + 1)])))
    try:
        gguf = GGUFFile.open(builders.build(spec).write(tmp_path / "s.gguf"))
    except GGUFError:
        return  # refusing at open is fine too
    with gguf:
        array = gguf.metadata["arr"]
        assert isinstance(array, LazyArray)
        assert array[0] == "ok"
        with pytest.raises(GGUFError, match=r"arr\[1\]"):
            array[1]


def test_arrays_nested_in_arrays_are_bounded_over_the_whole_file(tmp_path: Path) -> None:
    # Each empty nested array costs microseconds to walk: a 1 GB file of them took minutes to open.
    over = MAX_NESTED_ARRAYS + 1
    spec = with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [Arr(V.UINT8, [])] * over)))
    built = builders.build(spec)
    message = str(open_refused(built.write(tmp_path / "nested.gguf")))
    assert f"{over:,} arrays nested" in message and mentions(message, built.offsets[f"{EXTRA}.value"] + 4)
    # Split across keys, they count together; at the limit the file opens.
    half = MAX_NESTED_ARRAYS // 2 + 1
    split = with_kv(KV("b", V.ARRAY, Arr(V.ARRAY, [Arr(V.UINT8, [])] * half)),
                    with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [Arr(V.UINT8, [])] * half))))  # fmt: skip
    assert "over the limit" in str(open_refused(builders.build(split).write(tmp_path / "split.gguf")))
    at_limit = with_kv(KV("arr", V.ARRAY, Arr(V.ARRAY, [Arr(V.UINT8, [])] * MAX_NESTED_ARRAYS)))
    with GGUFFile.open(builders.build(at_limit).write(tmp_path / "limit.gguf")) as gguf:
        nested = gguf.metadata["arr"]
        assert isinstance(nested, LazyArray) and len(nested[MAX_NESTED_ARRAYS - 1]) == 0
        assert len(list(nested)) == MAX_NESTED_ARRAYS  # walking it again later is not counted


def test_proc_self_mem_is_a_read_error_not_a_traceback() -> None:
    # A "regular file" whose reads fail with EIO: what a failing disk looks like.
    message = str(open_refused(Path("/proc/self/mem")))
    assert "mem: header: reading 8 bytes at offset 0 failed: Input/output error" in message


def test_a_read_failing_mid_file_is_a_gguf_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = with_kv(KV("big", V.STRING, "x" * 100_000), builders.rich_spec())
    path = builders.build(spec).write(tmp_path / "rich.gguf")
    real_pread, real_preadv = os.pread, os.preadv

    def eio() -> OSError:
        return OSError(errno.EIO, os.strerror(errno.EIO))

    def failing_pread(fd: int, length: int, offset: int) -> bytes:
        if length > 8:  # the header's 8 bytes pass: fail the 100,000-byte string after them
            raise eio()
        return real_pread(fd, length, offset)

    with monkeypatch.context() as patched:
        patched.setattr(os, "pread", failing_pread)
        with pytest.raises(
            GGUFError, match=r"big: reading 100,000 bytes at offset [\d,]+ failed: Input/output"
        ):
            GGUFFile.open(path)
    with GGUFFile.open(path) as gguf:
        tensor_fd = gguf._fd

        def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            if fd == tensor_fd:
                raise eio()
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", failing_preadv)
        with pytest.raises(GGUFError, match=r"q8.weight: reading 136 bytes at offset [\d,]+ failed"):
            gguf.read_raw("q8.weight")
