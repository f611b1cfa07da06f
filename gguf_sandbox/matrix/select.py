"""The -k expression selecting cells by id: words, not, and, or, parentheses (pytest's syntax)."""

from __future__ import annotations

import re
from collections.abc import Callable

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.units import show

_K_TOKEN = re.compile(r"\(|\)|[^\s()]+")
# Parentheses are parsed and evaluated recursively: bounding their nesting keeps both far from Python's
# recursion limit (a real -k nests two or three levels). Runs of `not` and long and/or chains are flat.
MAX_DEPTH = 100
# How much of the expression an error message quotes: a 5,000-word -k would not fit a line.
_SHOWN_CHARS = 80

# Matches a lower-cased cell id.
_Matcher = Callable[[str], bool]


def compile_k(expression: str) -> Callable[[str], bool]:
    """A pytest-like -k: case-insensitive substrings combined with and / or / not and parentheses."""
    shown = show(expression, _SHOWN_CHARS)
    tokens = _K_TOKEN.findall(expression)
    if not tokens:
        raise MatrixError(f"-k {shown}: empty expression; give a substring of the cell ids")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        token = peek()
        if token is None:
            raise MatrixError(f"-k {shown}: unexpected end; expected a word or '('")
        position += 1
        return token

    def parse_or(depth: int) -> _Matcher:
        terms = [parse_and(depth)]
        while peek() == "or":
            take()
            terms.append(parse_and(depth))
        return _any(terms)

    def parse_and(depth: int) -> _Matcher:
        terms = [parse_not(depth)]
        while peek() == "and":
            take()
            terms.append(parse_not(depth))
        return _all(terms)

    def parse_not(depth: int) -> _Matcher:
        negated = False
        token = take()
        while token == "not":
            negated = not negated
            token = take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise MatrixError(
                    f"-k {shown}: parentheses nested deeper than {MAX_DEPTH}; simplify the expression"
                )
            inner = parse_or(depth + 1)
            if take() != ")":
                raise MatrixError(f"-k {shown}: missing ')'")
        elif token in ("and", "or", ")"):
            raise MatrixError(f"-k {shown}: unexpected {token!r}")
        else:
            inner = _word(token.lower())
        return _negate(inner) if negated else inner

    matcher = parse_or(0)
    if position != len(tokens):
        raise MatrixError(f"-k {shown}: unexpected {tokens[position][:40]!r}; join words with and/or")
    return lambda cell_id: matcher(cell_id.lower())


def _word(needle: str) -> _Matcher:
    return lambda cell_id: needle in cell_id


def _negate(inner: _Matcher) -> _Matcher:
    return lambda cell_id: not inner(cell_id)


# One flat matcher per chain, however long: nesting a closure per operand overflowed the stack at a few
# thousand operands.
def _any(terms: list[_Matcher]) -> _Matcher:
    if len(terms) == 1:
        return terms[0]
    return lambda cell_id: any(term(cell_id) for term in terms)


def _all(terms: list[_Matcher]) -> _Matcher:
    if len(terms) == 1:
        return terms[0]
    return lambda cell_id: all(term(cell_id) for term in terms)
