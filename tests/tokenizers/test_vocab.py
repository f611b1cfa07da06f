"""The compact vocabulary: lookups by bytes through 32-bit hashes, duplicates, bulk string reading."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.window import CHUNK_BYTES
from gguf_sandbox.tokenizers.vocab import MAX_TOKEN_BYTES, StringTable


def test_find_every_entry_of_a_large_table() -> None:
    # 200k random strings, and more until some 32-bit hashes collide: colliding entries must still be told
    # apart by their bytes. hash() is seeded per process, so collisions are drawn until they happen (~3.8 are
    # expected among 180k strings, none in ~2% of processes).
    rng = random.Random(1)
    strings = list({rng.randbytes(rng.randrange(1, 12)) for _ in range(200_000)})
    while len({hash(string) & 0xFFFFFFFF for string in strings}) > len(strings) - 3:
        strings.extend({rng.randbytes(rng.randrange(1, 12)) for _ in range(20_000)} - set(strings))
    table = StringTable.build(strings, keep_last=True, what="t")
    hashes = np.frombuffer(table._hashes, dtype=np.uint32)
    assert len(np.unique(hashes)) <= len(strings) - 3  # the collisions this test is about did happen
    assert all(table.find(string) == index for index, string in enumerate(strings))
    assert table.find(b"") == -1 and table.find(b"\xff" * 13) == -1
    assert [table[i] for i in (0, len(strings) - 1)] == [strings[0], strings[-1]]


@pytest.mark.parametrize(("keep_last", "expected"), [(True, 3), (False, 0)])
def test_a_repeated_string_answers_its_last_or_first_index(keep_last: bool, expected: int) -> None:
    table = StringTable.build([b"x", b"y", b"z", b"x"], keep_last=keep_last, what="t")
    assert table.find(b"x") == expected
    assert table.find(b"y") == 1


def test_containing_finds_inner_occurrences_only() -> None:
    table = StringTable.build(
        [b"\xe2\x96\x81a", b"a\xe2\x96\x81", b"b", b"\xe2\x96\x81\xe2\x96\x81"], keep_last=True, what="t"
    )
    assert table.containing("\u2581".encode()) == [1, 3]


def test_an_oversized_entry_is_refused() -> None:
    with pytest.raises(GGUFError, match=r"t\[1\] is 65,537 bytes"):
        StringTable.build([b"ok", b"x" * (MAX_TOKEN_BYTES + 1)], keep_last=True, what="t")


def test_iter_bytes_reads_strings_across_chunks(tmp_path: Path) -> None:
    strings = ["", "a", "é" * 1000, "x" * (CHUNK_BYTES + 5), *(f"tok{i}" for i in range(70_000))]
    writer = GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    writer.add_array("test.strings", strings)
    writer.add_array("test.numbers", [1, 2, 3])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile.open(tmp_path / "s.gguf") as gguf:
        assert [raw.decode() for raw in gguf.get("test.strings").iter_bytes()] == strings
        with pytest.raises(GGUFError, match="not strings"):
            next(gguf.get("test.numbers").iter_bytes())
