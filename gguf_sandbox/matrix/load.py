"""matrix.yaml → typed Matrix → cells: validation at the edge, then a pure expansion."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import FLOORS_FILE, FloorsError, FloorTable, load_floors
from gguf_sandbox.matrix.expand import check_cell_ids
from gguf_sandbox.matrix.fields import (
    MAX_LIST,
    MAX_NAME,
    NAME_RE,
    as_mapping,
    backends_at,
    entries_at,
    key_name,
    list_at,
    nonempty_list,
    one_line,
    plain_at,
    pythons_at,
    required_key,
    sizes_at,
)
from gguf_sandbox.matrix.models import parse_models
from gguf_sandbox.matrix.rules import parse_expect, parse_include, parse_pattern, verdicts_at
from gguf_sandbox.matrix.runnables import RUNNABLES, RunKind, Runnable
from gguf_sandbox.matrix.schema import (
    DEFAULT_REFERENCE_MEMORY,
    DEFAULT_TIMEOUT_S,
    KNOWN_BACKENDS,
    SCHEMA_VERSION,
    Matrix,
    ModelDef,
    Profile,
    WorkloadDef,
    render_options,
)
from gguf_sandbox.matrix.sizes import cell_memory, size_at, timeout_at
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER
from gguf_sandbox.units import KIB, UnitError, format_size, show

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
MAX_CELLS = 10_000  # cells of the matrix or of any profile (the default matrix has 360)


def load(path: str | Path, profile: str | None = None, floors_file: Path = FLOORS_FILE) -> Matrix:
    """Read and validate matrix.yaml (optionally narrowed to `profile`), with the floors of `floors_file`
    unless the matrix names its own floors file."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        return parse(data, base_dir=path.parent, path=path, floors=_floors(floors_file)).with_profile(profile)
    except MatrixError as error:
        raise MatrixError(one_line(str(error))) from None


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
        raise MatrixError(one_line(f"{where}: not valid YAML: {problem}")) from None
    except (yaml.YAMLError, ValueError, OverflowError) as error:
        # ReaderError (control characters), and constructors' own errors: 5,000-digit integers, dates
        # such as 2001-13-45.
        raise MatrixError(one_line(f"{path}: not valid YAML: {error}")) from None


def parse(
    data: object, base_dir: Path | None = None, path: Path | None = None, floors: FloorTable | None = None
) -> Matrix:
    """Validate a decoded matrix document into a Matrix; every error names its key path.

    `floors` are the measured floors its expectations derive from (none when not given), unless the
    document names a floors file of its own (`floors: path`, relative to `base_dir`).
    """
    root = as_mapping(data, "matrix", _TOP_KEYS)
    if "floors" in root:
        named = (base_dir or Path.cwd()) / plain_at(root["floors"], "floors")
        if not named.is_file():
            raise MatrixError(
                f"floors: {named}: no such file; record floors with `gguf-sandbox floor --record`"
            )
        floors = _floors(named)
    version = root.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise MatrixError(f"version: unsupported schema version {show(version)}; this gguf-sandbox reads 1")
    pythons = pythons_at(required_key(root, "pythons", "matrix"), "pythons")
    memory = sizes_at(required_key(root, "memory", "matrix"), "memory")
    backends = backends_at(root.get("backends", list(KNOWN_BACKENDS)), "backends")
    models = parse_models(root.get("models", {}), base_dir or Path.cwd())
    workloads = _workloads(required_key(root, "workloads", "matrix"), models)
    check_cell_ids(workloads.values())
    default, rules = parse_expect(root.get("expect", {}))
    profiles = _profiles(root.get("profiles", {}), workloads)
    matrix = Matrix(
        pythons=pythons,
        memory=memory,
        backends=backends,
        models=models,
        workloads=workloads,
        expect_default=default,
        expect_rules=rules,
        include=tuple(parse_include(e, f"include[{i}]") for i, e in enumerate(list_at(root, "include"))),
        exclude=tuple(parse_pattern(e, f"exclude[{i}]") for i, e in enumerate(list_at(root, "exclude"))),
        timeout=timeout_at(root.get("timeout", DEFAULT_TIMEOUT_S), "timeout"),
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


_WORKLOAD_KEYS = (
    "workload",
    "control",
    "command",
    "args",
    "models",
    "timeout",
    "reference",
    "floor",
    "default",
    "below_floor",
)


def _workloads(value: object, models: Mapping[str, ModelDef]) -> Mapping[str, WorkloadDef]:
    if not isinstance(value, Mapping) or not value:
        raise MatrixError("workloads: expected a non-empty mapping of name → workload entry")
    out: dict[str, WorkloadDef] = {}
    for name, entry in entries_at(value, "workloads", "name → workload entry").items():
        where = f"workloads.{key_name(name)}"
        if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > MAX_NAME:
            raise MatrixError(
                f"{where}: names are lower-case letters, digits, '_' and '-', at most {MAX_NAME} "
                "(used in cell ids)"
            )
        out[name] = _workload(name, {} if entry is None else entry, where, models)
    return MappingProxyType(out)


def _workload(name: str, entry: object, where: str, models: Mapping[str, ModelDef]) -> WorkloadDef:
    body = as_mapping(entry, where, _WORKLOAD_KEYS)
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
        table = RUNNABLES[kind]
        runnable = table.get(target) if isinstance(target, str) else None
        if runnable is None:
            raise MatrixError(
                f"{where}.{kind.value}: unknown {kind.value} {show(target)}; known: {', '.join(table)}"
            )
        options = _options(body.get("args", {}), runnable, f"{where}.args")
        args = render_options(options)
        if runnable.needs_model and not model_names:
            raise MatrixError(f"{where}.models: {kind.value} {target!r} needs at least one model")
        if not runnable.needs_model and model_names:
            raise MatrixError(f"{where}.models: {kind.value} {target!r} takes no model; remove 'models'")
    reference = body.get("reference", runnable.checks_vectors if runnable else False)
    if not isinstance(reference, bool):
        raise MatrixError(f"{where}.reference: expected true or false, got {show(reference)}")
    timeout = timeout_at(body["timeout"], f"{where}.timeout") if "timeout" in body else None
    floor = size_at(body["floor"], f"{where}.floor") if "floor" in body else None
    below_floor = verdicts_at(body["below_floor"], f"{where}.below_floor") if "below_floor" in body else None
    in_default = body.get("default", True)
    if not isinstance(in_default, bool):
        raise MatrixError(f"{where}.default: expected true or false, got {show(in_default)}")
    return WorkloadDef(
        name,
        kind,
        target,
        args,
        model_names,
        timeout,
        reference,
        MappingProxyType(options),
        floor,
        in_default,
        below_floor,
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
            raise MatrixError(f"{where}.{key_name(key)}: unknown option; allowed: {allowed}")
        try:
            out[key] = declared.check(option)
        except UnitError as error:
            raise MatrixError(f"{where}.{key}: {error}") from None
    return out


_PROFILE_KEYS = ("pythons", "memory", "backends", "workloads", "timeout", "args")


def _profiles(value: object, workloads: Mapping[str, WorkloadDef]) -> Mapping[str, Profile]:
    if value is None:
        return MappingProxyType({})
    out = {}
    for name, entry in entries_at(value, "profiles", "profile name → overrides").items():
        where = f"profiles.{key_name(name)}"
        if not isinstance(name, str) or key_name(name) != name:
            raise MatrixError(f"{where}: profile names are letters, digits, '_', '-' and '.', at most 64")
        body = as_mapping(entry or {}, where, _PROFILE_KEYS)
        names = None
        if "workloads" in body:
            names = tuple(str(w) for w in nonempty_list(body["workloads"], f"{where}.workloads"))
            for i, w in enumerate(names):
                if w not in workloads:
                    raise MatrixError(
                        f"{where}.workloads[{i}]: unknown workload {w!r}; known: {', '.join(workloads)}"
                    )
        out[str(name)] = Profile(
            args=_profile_args(body.get("args", {}), workloads, f"{where}.args"),
            name=str(name),
            pythons=pythons_at(body["pythons"], f"{where}.pythons") if "pythons" in body else None,
            memory=sizes_at(body["memory"], f"{where}.memory") if "memory" in body else None,
            backends=backends_at(body["backends"], f"{where}.backends") if "backends" in body else None,
            workloads=names,
            timeout=timeout_at(body["timeout"], f"{where}.timeout") if "timeout" in body else None,
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
            raise MatrixError(f"{where}.{key_name(name)}: unknown workload; known: {', '.join(workloads)}")
        runnable = RUNNABLES.get(workload.kind, {}).get(workload.target)
        if runnable is None:
            raise MatrixError(f"{where}.{name}: a command takes no args")
        out[str(name)] = MappingProxyType(_options(options, runnable, f"{where}.{name}"))
    return MappingProxyType(out)
