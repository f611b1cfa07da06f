"""Typed reads of matrix.yaml nodes: mappings, lists, names, Pythons, backends — errors name where."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.schema import KNOWN_BACKENDS
from gguf_sandbox.matrix.sizes import cell_memory
from gguf_sandbox.units import show

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
# Bounds of what a matrix may ask for: each well above any real matrix, each small enough that validating,
# expanding and listing it takes well under a second and a few MB.
MAX_LIST = 64  # values of one axis (pythons, memory, a workload's models, a pattern's values)
MAX_ENTRIES = 256  # models, workloads, profiles, rules, include and exclude entries
MAX_NAME = 64  # characters of a model or workload name (they appear in cell ids)


def one_line(message: str, limit: int = 600) -> str:
    """A message on one line of bounded length, whatever a hostile key or value put in it."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_mapping(value: object, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            hint = closest_key(str(key), allowed)
            raise MatrixError(f"{where}.{key_name(key)}: unknown key; {hint}")
    return value


def key_name(key: object) -> str:
    """A mapping key as it appears in an error's key path: plain names as they are, anything else quoted."""
    if isinstance(key, str) and re.fullmatch(r"[\w.-]{1,64}", key):
        return key
    return show(key)


def closest_key(key: str, allowed: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key[:100], list(allowed), n=1)
    suggestion = f"did you mean {near[0]!r}? " if near else ""
    return f"{suggestion}allowed keys: {', '.join(allowed)}"


def required_key(root: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in root:
        raise MatrixError(f"{where}: missing required key {key!r}")
    return root[key]


def list_at(root: Mapping[str, Any], key: str) -> list[Any]:
    value = root.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise MatrixError(f"{key}: expected a list, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise MatrixError(f"{key}: {len(value):,} entries; at most {MAX_ENTRIES} are allowed")
    return value


def nonempty_list(value: object, where: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MatrixError(f"{where}: must not be empty")
    if len(items) > MAX_LIST:
        raise MatrixError(f"{where}: {len(items):,} values; at most {MAX_LIST} are allowed")
    return items


def entries_at(value: object, where: str, what: str) -> Mapping[Any, Any]:
    """A mapping of named entries (models, workloads, profiles), at most MAX_ENTRIES of them."""
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected a mapping of {what}, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise MatrixError(f"{where}: {len(value):,} entries; at most {MAX_ENTRIES} are allowed")
    return value


def pythons_at(value: object, where: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(nonempty_list(value, where)):
        if isinstance(item, float):
            raise MatrixError(
                f'{where}[{i}]: {item!r} is a YAML float (3.10 reads as 3.1); quote versions: "3.10"'
            )
        if not isinstance(item, str) or not PYTHON_RE.match(item):
            raise MatrixError(f'{where}[{i}]: {show(item)} is not a Python version such as "3.12"')
        out.append(item)
    return tuple(dict.fromkeys(out))


def sizes_at(value: object, where: str) -> tuple[int, ...]:
    sizes = [cell_memory(v, f"{where}[{i}]") for i, v in enumerate(nonempty_list(value, where))]
    return tuple(sorted(set(sizes)))


def backends_at(value: object, where: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(nonempty_list(value, where)):
        if not isinstance(item, str) or item not in KNOWN_BACKENDS:
            raise MatrixError(
                f"{where}[{i}]: unknown backend {show(item)}; known: {', '.join(KNOWN_BACKENDS)}"
            )
        out.append(item)
    return tuple(dict.fromkeys(out))


def text_at(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise MatrixError(f"{where}: expected {what}, got {show(value)}")
    return value


def plain_at(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise MatrixError(f"{where}: expected a name, got {value!r}")
    return value
