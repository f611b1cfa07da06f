"""Tests for matrix/select.py: -k expressions over cell ids."""

from __future__ import annotations

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.select import compile_k


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("bomb", {"cgroup-py3.11-64m-bomb", "docker-py3.12-256m-bomb"}),
        ("BOMB and docker", {"docker-py3.12-256m-bomb"}),
        ("64m or mine", {"cgroup-py3.11-64m-bomb", "cgroup-py3.11-64m-parse-mine"}),
        ("not bomb", {"cgroup-py3.11-64m-parse-mine"}),
        ("(cgroup or docker) and not (64m or parse)", {"docker-py3.12-256m-bomb"}),
        ("not not mine", {"cgroup-py3.11-64m-parse-mine"}),
    ],
)
def test_k_expressions(expression: str, expected: set[str]) -> None:
    universe = ["cgroup-py3.11-64m-bomb", "docker-py3.12-256m-bomb", "cgroup-py3.11-64m-parse-mine"]
    selector = compile_k(expression)
    assert {i for i in universe if selector(i)} == expected


@pytest.mark.parametrize("expression", ["", "a and", "(a or b", "a b", "and a", "a )"])
def test_k_syntax_errors(expression: str) -> None:
    with pytest.raises(MatrixError, match="-k"):
        compile_k(expression)
