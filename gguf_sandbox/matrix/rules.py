"""Expectations and include entries of matrix.yaml: verdict sets, patterns, conditions, floor offsets."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.fields import PYTHON_RE, as_mapping, backends_at, nonempty_list, plain_at, pythons_at
from gguf_sandbox.matrix.schema import (
    AXES,
    FINISHED,
    Condition,
    ExpectRule,
    FloorOffset,
    IncludeEntry,
    Pattern,
    version_key,
)
from gguf_sandbox.matrix.sizes import cell_memory, size_at
from gguf_sandbox.matrix.verdicts import Verdict


def verdicts_at(value: object, where: str) -> frozenset[Verdict]:
    names = value if isinstance(value, list) else [value]
    out = set()
    for i, name in enumerate(names):
        try:
            out.add(Verdict(str(name).lower()))
        except ValueError:
            known = ", ".join(v.value for v in Verdict)
            raise MatrixError(f"{where}[{i}]: unknown verdict {name!r}; known: {known}") from None
    if not out:
        raise MatrixError(f"{where}: list at least one verdict")
    return frozenset(out)


def parse_expect(value: object) -> tuple[frozenset[Verdict], tuple[ExpectRule, ...]]:
    body = as_mapping(value or {}, "expect", ("default", "rules"))
    default = verdicts_at(body["default"], "expect.default") if "default" in body else FINISHED
    if Verdict.REFUSED in default:
        raise MatrixError(
            "expect.default: refused is never a default (an engine that refuses everything would pass); give "
            "the workload a `floor:` (refused is expected below it) or a rule for the cells that may refuse"
        )
    rules_value = body.get("rules", []) or []
    if not isinstance(rules_value, list):
        raise MatrixError("expect.rules: expected a list of {match: {...}, expect: [...]}")
    rules = []
    for i, rule in enumerate(rules_value):
        where = f"expect.rules[{i}]"
        rule_body = as_mapping(rule, where, ("match", "expect"))
        if "expect" not in rule_body:
            raise MatrixError(f"{where}: missing 'expect' (the allowed verdicts)")
        rules.append(
            ExpectRule(
                parse_pattern(rule_body.get("match", {}), f"{where}.match"),
                verdicts_at(rule_body["expect"], f"{where}.expect"),
            )
        )
    return default, tuple(rules)


def parse_pattern(value: object, where: str) -> Pattern:
    body = as_mapping(value, where, AXES)
    conditions = []
    for axis, raw in body.items():
        values = nonempty_list(raw, f"{where}.{axis}")
        conds = tuple(_CONDITION_PARSERS[axis](v, f"{where}.{axis}") for v in values)
        conditions.append((axis, conds))
    return Pattern(tuple(conditions))


_OP_RE = re.compile(r"^\s*(<=|>=|==|<|>)?\s*(.+?)\s*$")


def _memory_condition(value: object, where: str) -> Condition:
    match = _OP_RE.match(str(value))
    if match is None:
        raise MatrixError(f"{where}: expected a size or a comparison such as '<=256m'")
    return Condition(match.group(1) or "==", size_at(match.group(2), where))


def _python_condition(value: object, where: str) -> Condition:
    if isinstance(value, float):
        raise MatrixError(f'{where}: {value!r} is a YAML float; quote Python versions: "3.10"')
    match = _OP_RE.match(str(value))
    if match is None or not match.group(1):
        return Condition("glob", str(value))
    if not PYTHON_RE.match(match.group(2)):
        raise MatrixError(f"{where}: {value!r}: compare against a version such as '>=3.12'")
    return Condition(match.group(1), version_key(match.group(2)))


def _glob_condition(value: object, where: str) -> Condition:
    if not isinstance(value, str):
        raise MatrixError(f"{where}: expected a name or glob, got {value!r}")
    return Condition("glob", value)


_CONDITION_PARSERS: Mapping[str, Callable[[object, str], Condition]] = MappingProxyType(
    {
        "backend": _glob_condition,
        "python": _python_condition,
        "memory": _memory_condition,
        "workload": _glob_condition,
        "model": _glob_condition,
    }
)


def parse_include(value: object, where: str) -> IncludeEntry:
    body = as_mapping(value, where, AXES)
    axes: dict[str, tuple[Any, ...]] = {}
    for axis, raw in body.items():
        values = nonempty_list(raw, f"{where}.{axis}")
        axes[axis] = tuple(_INCLUDE_VALUE[axis](v, f"{where}.{axis}[{i}]") for i, v in enumerate(values))
    return IncludeEntry(MappingProxyType(axes))


_FLOOR_RE = re.compile(r"^\s*floor\s*(?:([+-])\s*(\S+))?\s*$")


def _include_memory(value: object, where: str) -> int | FloorOffset:
    """A size, or `floor`, `floor-4m`, `floor+8m`: relative to the floor of each included cell."""
    match = _FLOOR_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return cell_memory(value, where)
    sign, size = match.groups()
    delta = 0 if size is None else size_at(size, where)
    return FloorOffset(-delta if sign == "-" else delta)


_INCLUDE_VALUE: Mapping[str, Callable[[object, str], Any]] = MappingProxyType(
    {
        "backend": lambda v, w: backends_at([v], w)[0],
        "python": lambda v, w: pythons_at([v], w)[0],
        "memory": _include_memory,
        "workload": plain_at,
        "model": plain_at,
    }
)
