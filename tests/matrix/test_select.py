"""Tests for matrix/select.py: -k expressions over cell ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_sandbox.cli import main
from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.select import MAX_DEPTH, compile_k


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


IDS = ["cgroup-py3.12-64m-embed-tiny", "cgroup-py3.12-64m-bomb"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("not " * 1000 + "embed", ["cgroup-py3.12-64m-embed-tiny"]),
        ("not " * 1001 + "embed", ["cgroup-py3.12-64m-bomb"]),
        ("(" * MAX_DEPTH + "embed" + ")" * MAX_DEPTH, ["cgroup-py3.12-64m-embed-tiny"]),
        ("(not " * MAX_DEPTH + "embed" + ")" * MAX_DEPTH, ["cgroup-py3.12-64m-embed-tiny"]),
        (" or ".join(["zz"] * 5000 + ["bomb"]), ["cgroup-py3.12-64m-bomb"]),
        (" and ".join(["cgroup"] * 5000 + ["bomb"]), ["cgroup-py3.12-64m-bomb"]),
        (" or ".join(["(zz and " + " and ".join(["yy"] * 50) + ")"] * 200 + ["tiny"]), IDS[:1]),
    ],
    ids=[
        "not-1000",
        "not-1001",
        "parens-at-limit",
        "not-parens-at-limit",
        "or-5000",
        "and-5000",
        "or-of-and",
    ],
)
def test_long_and_deep_expressions_work(expression: str, expected: list[str]) -> None:
    selector = compile_k(expression)
    assert [i for i in IDS if selector(i)] == expected


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 1000 + "embed" + ")" * 1000,
        "(" * (MAX_DEPTH + 1) + "embed" + ")" * (MAX_DEPTH + 1),
        "(not " * 1000 + "embed" + ")" * 1000,
    ],
    ids=["parens-1000", "parens-over-limit", "not-parens-1000"],
)
def test_too_deep_parentheses_are_a_one_line_error_naming_the_limit(expression: str) -> None:
    with pytest.raises(
        MatrixError, match=rf"^-k '\(.*…: parentheses nested deeper than {MAX_DEPTH};"
    ) as caught:
        compile_k(expression)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "expression",
    [" or ".join(["zz"] * 5000) + " or", "zz " + "x" * 5000, "(" + "zz or " * 5000],
    ids=["trailing-or", "long-word", "unclosed"],
)
def test_errors_quote_a_long_expression_cut_short(expression: str) -> None:
    with pytest.raises(MatrixError, match=r"^-k '") as caught:
        compile_k(expression)
    assert len(str(caught.value)) < 250, str(caught.value)


def test_run_list_with_a_hostile_k_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text('pythons: ["3.12"]\nmemory: [64m]\nworkloads: {bomb: {control: alloc-bomb}}\n')
    for expression, listed in [
        ("not " * 1000 + "bomb", "cgroup-py3.12-64m-bomb\n"),
        (" or ".join(["zz"] * 5000 + ["bomb"]), "cgroup-py3.12-64m-bomb\n"),
    ]:
        assert main(["run", "--list", "--backend", "cgroup", "-k", expression, str(matrix)]) == 0
        assert capsys.readouterr().out == listed
    assert (
        main(["run", "--list", "--backend", "cgroup", "-k", "(" * 1000 + "bomb" + ")" * 1000, str(matrix)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nested deeper than {MAX_DEPTH}" in err and "Traceback" not in err
