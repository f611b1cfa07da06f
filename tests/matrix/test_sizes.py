"""Tests for matrix/sizes.py: sizes and durations of matrix.yaml in the units grammar, errors naming where."""

from __future__ import annotations

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.sizes import size_at
from gguf_sandbox.units import format_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64m", 64 << 20),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("64mb", 64 << 20),
        ("1g", 1 << 30),
        ("1.5g", 3 << 29),
        ("512k", 512 << 10),
        (65536, 65536),
        ("4096", 4096),
    ],
    ids=str,
)
def test_parse_size(text: object, expected: int) -> None:
    assert size_at(text, "memory[0]") == expected


@pytest.mark.parametrize("text", ["64q", "", "m", "-1m", "0", True, None, [64]], ids=repr)
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(MatrixError, match=r"memory\[0\]"):
        size_at(text, "memory[0]")


@pytest.mark.parametrize(
    ("nbytes", "label"), [(64 << 20, "64m"), (1 << 30, "1g"), (1536 << 10, "1536k"), (100, "100")]
)
def test_format_size(nbytes: int, label: str) -> None:
    assert format_size(nbytes) == label
