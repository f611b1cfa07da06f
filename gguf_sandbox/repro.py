"""`gguf-sandbox repro`: one cell — a matrix workload or any command — under a memory limit, explained."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix import (
    CONTROLS,
    GRACEFUL,
    WORKLOADS,
    Cell,
    Matrix,
    RunKind,
    WorkloadDef,
    load,
    parse_size,
    parse_timeout,
    repro_command,
)
from gguf_sandbox.runner import REFERENCE_OK, make_sandbox, reference_spec, run_spec
from gguf_sandbox.sandbox.base import CellSpec, Sandbox
from gguf_sandbox.units import format_size
from gguf_sandbox.verdicts import Outcome, comparable

# A leading `python`, `python3` or `python3.X` in CMD stands for the cell's interpreter.
_PYTHON_WORD = re.compile(r"^python(3(\.\d+)?)?$")
# Anything else is exec'd by the cell's interpreter, so every backend can run it the same way.
_EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"


def command_argv(command: list[str]) -> tuple[str, ...]:
    """CMD → the argv after the cell's `python`."""
    if not command:
        raise MatrixError("repro: give --workload W --model M, or a command after --")
    if _PYTHON_WORD.match(Path(command[0]).name):
        return tuple(command[1:])
    return ("-c", _EXEC, *command)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", required=True, help='the cell\'s Python version, e.g. "3.12"')
    parser.add_argument("--memory", required=True, help="the memory limit, e.g. 96m")
    parser.add_argument("--backend", choices=("auto", "docker", "cgroup"), default="auto")
    parser.add_argument("--matrix", default="matrix.yaml", help="where --workload/--model names are defined")
    parser.add_argument("--workload", help="a workload entry of the matrix, or a built-in workload name")
    parser.add_argument("--model", help="a model name of the matrix, or a GGUF path")
    parser.add_argument("--timeout", help="wall-clock limit (default: the matrix's, else 300s)")
    parser.add_argument(
        "--reference", action="store_true", help="also run unconstrained and compare vectors (WRONG)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD …: any command instead")


def run(args: argparse.Namespace) -> int:
    from gguf_sandbox.models import default_cache_dir, prepare

    memory = parse_size(args.memory, "--memory")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if bool(command) == bool(args.workload):
        raise MatrixError("repro: give either --workload W [--model M] or -- CMD …, not both or neither")
    matrix = _matrix(Path(args.matrix), required=bool(args.workload))
    sandbox = _sandbox(args.backend, args.python)
    timeout = parse_timeout(args.timeout, "--timeout") if args.timeout else None
    if command:
        cell = _command_cell(command, args.python, memory, sandbox.name, timeout)
    else:
        cell = _workload_cell(matrix, args, memory, sandbox.name, timeout)
    reason = sandbox.unavailable_reason(args.python)
    if reason is not None:
        print(f"{cell.cell_id}: cannot run on {sandbox.name}: {reason}", file=sys.stderr)
        return 2
    spec = cell.spec
    if cell.model is not None and matrix is not None and cell.model in matrix.models:
        spec = replace(spec, model=prepare(matrix.models[cell.model], default_cache_dir()))
    reference = _reference(sandbox, replace(cell, spec=spec), matrix) if args.reference else None
    print(f"{cell.cell_id} on {sandbox.name} …", flush=True)
    outcome = run_spec(sandbox, spec, reference, cell.repro)
    print(describe(outcome))
    return 0 if outcome.verdict in spec.expect else 1


def describe(outcome: Outcome) -> str:
    """The verdict line and the same evidence a failing matrix cell shows."""
    allowed = outcome.verdict in outcome.expected
    head = f"{outcome.cell_text()} — {'as expected' if allowed else 'outside expect'}"
    return head + "\n" + outcome.failure_message()


def _matrix(path: Path, required: bool) -> Matrix | None:
    if path.is_file():
        return load(path)
    if required and path.name != "matrix.yaml":
        raise MatrixError(f"--matrix {path}: no such file")
    return None


def _sandbox(choice: str, python: str) -> Sandbox:
    if choice != "auto":
        return make_sandbox(choice)
    docker = make_sandbox("docker")
    return docker if docker.unavailable_reason(python) is None else make_sandbox("cgroup")


def _command_cell(command: list[str], python: str, memory: int, backend: str, timeout: float | None) -> Cell:
    label = format_size(memory)
    spec = CellSpec(
        cell_id=f"{backend}-py{python}-{label}-command",
        backend=backend,
        python=python,
        memory=memory,
        argv=command_argv(command),
        timeout=timeout or 300.0,
        expect=GRACEFUL,
    )
    repro = shlex.join(
        ["gguf-sandbox", "repro", "--python", python, "--memory", label, "--backend", backend, "--", *command]
    )
    return Cell(spec=spec, workload="command", model=None, memory_label=label, reference=False, repro=repro)


def _workload_cell(
    matrix: Matrix | None, args: argparse.Namespace, memory: int, backend: str, timeout: float | None
) -> Cell:
    workload = _workload_def(matrix, args.workload, args.model)
    model_name, model_path = _model(matrix, args.model, workload)
    axes = {
        "backend": backend,
        "python": args.python,
        "memory": memory,
        "workload": workload.name,
        "model": model_name,
    }
    expect = matrix.expect_for(axes) if matrix is not None else GRACEFUL
    default_timeout = matrix.timeout_for(workload) if matrix is not None else 300.0
    label = format_size(memory)
    pieces = [backend, f"py{args.python}", label, workload.name, *([model_name] if model_name else [])]
    spec = CellSpec(
        cell_id="-".join(pieces),
        backend=backend,
        python=args.python,
        memory=memory,
        argv=workload.argv(),
        timeout=timeout or default_timeout,
        model=model_path,
        expect=expect,
        host_side=workload.host_side,
    )
    matrix_path = matrix.path if matrix is not None else None
    return Cell(
        spec=spec,
        workload=workload.name,
        model=model_name,
        memory_label=label,
        reference=workload.reference and model_name is not None,
        repro=repro_command(spec, workload.name, args.model, matrix_path),
    )


def _workload_def(matrix: Matrix | None, name: str, model: str | None) -> WorkloadDef:
    if matrix is not None and name in matrix.workloads:
        return matrix.workloads[name]
    for kind, table in ((RunKind.WORKLOAD, WORKLOADS), (RunKind.CONTROL, CONTROLS)):
        runnable = table.get(name)
        if runnable is not None:
            models = (model or "",) if runnable.needs_model else ()
            return WorkloadDef(name, kind, name, (), models, None, runnable.checks_vectors)
    known = sorted({*(matrix.workloads if matrix is not None else ()), *WORKLOADS, *CONTROLS})
    raise MatrixError(f"--workload {name}: unknown; known: {', '.join(known)}")


def _model(matrix: Matrix | None, name: str | None, workload: WorkloadDef) -> tuple[str | None, Path | None]:
    """(model name for the id, its path when already known; None when it must be prepared)."""
    if not workload.models and workload.kind is not RunKind.COMMAND:
        if name:
            raise MatrixError(f"--model: workload {workload.name} takes no model")
        return None, None
    if not name:
        raise MatrixError(f"--model: workload {workload.name} needs a model (a matrix model name or a path)")
    if matrix is not None and name in matrix.models:
        return name, None
    path = Path(name).expanduser()
    if not path.is_file():
        known = ", ".join(matrix.models) if matrix is not None else "no matrix loaded"
        raise MatrixError(f"--model {name}: neither a model of the matrix ({known}) nor a file")
    stem = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "model"
    return stem, path.resolve()


def _reference(sandbox: Sandbox, cell: Cell, matrix: Matrix | None) -> object:
    if not cell.reference:
        print("(no reference comparison: this workload reports no vectors)")
        return None
    memory = matrix.reference_memory if matrix is not None else 2 << 30
    spec = replace(reference_spec(cell, memory), model=cell.spec.model)
    print(f"{spec.cell_id} (unconstrained reference) …", flush=True)
    outcome = run_spec(sandbox, spec)
    if outcome.verdict not in REFERENCE_OK:
        print(f"reference run: {outcome.cell_text()} — no comparison\n{outcome.failure_message()}")
        return None
    return comparable(outcome.report)
