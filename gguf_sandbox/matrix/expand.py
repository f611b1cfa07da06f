"""Cells from a typed Matrix: the product of its axes, minus exclude, plus include — pure, no I/O."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.models import model_file
from gguf_sandbox.matrix.runnables import RunKind
from gguf_sandbox.matrix.schema import KNOWN_BACKENDS, Cell, FloorOffset, Matrix, WorkloadDef
from gguf_sandbox.matrix.select import compile_k
from gguf_sandbox.sandbox.base import CellSpec
from gguf_sandbox.units import format_size


def cell_id(backend: str, python: str, memory: int, workload: str, model: str | None) -> str:
    """`docker-py3.12-64m-embed-minilm_q8_0` (the model part is omitted for model-less workloads)."""
    return "-".join([backend, f"py{python}", format_size(memory), _tail(workload, model)])


def _tail(workload: str, model: str | None) -> str:
    """The part of a cell id after its memory: `embed-minilm_q8_0`, or `bomb` without a model."""
    return f"{workload}-{model}" if model else workload


def check_cell_ids(workloads: Iterable[WorkloadDef]) -> None:
    """Refuse workloads whose cells would share ids, as workload `embed` on model `tiny` and a model-less
    workload `embed-tiny` do: results, --resume and merge know a cell only by its id.

    Backend, Python and memory label hold no '-', so two cells share an id exactly when their tails are
    equal; this checks every workload of every profile, whatever a run selects.
    """
    owners: dict[str, tuple[str, str | None]] = {}
    for workload in workloads:
        for model in workload.models or (None,):
            pair = (workload.name, model)
            earlier = owners.setdefault(_tail(*pair), pair)
            if earlier != pair:
                raise _same_id(f"…-{_tail(*pair)}", earlier, pair)


def _same_id(ids: str, first: tuple[str, str | None], second: tuple[str, str | None]) -> MatrixError:
    return MatrixError(
        f"workloads: {_pair(first)} and {_pair(second)} give the same cell ids ({ids}); "
        "rename one of the workloads"
    )


def _pair(pair: tuple[str, str | None]) -> str:
    workload, model = pair
    return f"{workload!r} on model {model!r}" if model else f"{workload!r} (no model)"


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
    axes_list = [
        axes for axes in _product(matrix, chosen_backends) if not any(p.matches(axes) for p in matrix.exclude)
    ]
    axes_list += _included(matrix, chosen_backends)
    owners: dict[str, tuple[str, str | None]] = {}
    cells = []
    for axes in axes_list:
        cell = _cell(matrix, axes, cache)
        pair = (cell.workload, cell.model)
        earlier = owners.get(cell.cell_id)
        if earlier is None:
            owners[cell.cell_id] = pair
        elif earlier != pair:  # load() refuses such workloads; a Matrix built otherwise must not lose a cell
            raise _same_id(cell.cell_id, earlier, pair)
        else:
            continue  # an include entry naming a cell of the product or of an earlier entry: the same cell
        if selector is None or selector(cell.cell_id):
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
    from gguf_sandbox.matrix.models import default_cache_dir

    return default_cache_dir()


def _product(matrix: Matrix, backends: Sequence[str]) -> Iterable[dict[str, Any]]:
    for backend in backends:
        for python in matrix.pythons:
            for workload in matrix.workloads.values():
                if not matrix.runs(workload):
                    continue
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
            if not matrix.runs(workload):
                continue
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
        requirements=workload.requirements,
    )
    return Cell(
        spec=spec,
        workload=workload.name,
        model=model_name,
        memory_label=format_size(axes["memory"]),
        reference=workload.reference and model_name is not None,
        repro=repro_command(spec, workload.name, model_name, matrix.path),
        reports=workload.kind is not RunKind.COMMAND,
        expect=matrix.expect_for(axes),
        host_side=workload.host_side,
        reference_argv=workload.reference_argv,
        min_cosine=workload.min_cosine,
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
    if matrix_path is not None and matrix_path != Path("matrix.yaml"):
        words += ["--matrix", str(matrix_path)]
    words += ["--workload", workload]
    if model:
        words += ["--model", model]
    return shlex.join(words)
