"""The -k expression selecting cells by id: words, not, and, or, parentheses (pytest's syntax)."""

from __future__ import annotations

import re
from collections.abc import Callable

from gguf_sandbox.errors import MatrixError

_K_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def compile_k(expression: str) -> Callable[[str], bool]:
    """A pytest-like -k: case-insensitive substrings combined with and / or / not and parentheses."""
    tokens = _K_TOKEN.findall(expression)
    if not tokens:
        raise MatrixError(f"-k {expression!r}: empty expression; give a substring of the cell ids")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        token = peek()
        if token is None:
            raise MatrixError(f"-k {expression!r}: unexpected end; expected a word or '('")
        position += 1
        return token

    def parse_or() -> Callable[[str], bool]:
        left = parse_and()
        while peek() == "or":
            take()
            left = _or(left, parse_and())
        return left

    def parse_and() -> Callable[[str], bool]:
        left = parse_not()
        while peek() == "and":
            take()
            left = _and(left, parse_not())
        return left

    def parse_not() -> Callable[[str], bool]:
        token = take()
        if token == "not":
            inner = parse_not()
            return lambda cid: not inner(cid)
        if token == "(":
            inner = parse_or()
            if take() != ")":
                raise MatrixError(f"-k {expression!r}: missing ')'")
            return inner
        if token in ("and", "or", ")"):
            raise MatrixError(f"-k {expression!r}: unexpected {token!r}")
        needle = token.lower()
        return lambda cid: needle in cid.lower()

    matcher = parse_or()
    if position != len(tokens):
        raise MatrixError(f"-k {expression!r}: unexpected {tokens[position]!r}; join words with and/or")
    return matcher


def _or(a: Callable[[str], bool], b: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda cid: a(cid) or b(cid)


def _and(a: Callable[[str], bool], b: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda cid: a(cid) and b(cid)
