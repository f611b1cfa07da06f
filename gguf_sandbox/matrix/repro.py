"""`gguf-sandbox repro`: one cell — a matrix workload or any command — under a memory limit, explained.

A command names its own files. `--model PATH` (or a matrix model name) is what `{model}` in the command
or the workload's `--model` becomes; `--mount SRC[:DST]` shows a host file or directory to the cell,
read-only. Where they appear inside the cell:

    docker   the model at /models/<file name>; a mount at DST, by default at SRC's own absolute path
             (so the same command line works on both backends)
    cgroup   the cell runs on the host's filesystem: the model and every mount are at their host paths
             (DST, when given, must be SRC's own path)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.expand import repro_command
from gguf_sandbox.matrix.load import load
from gguf_sandbox.matrix.runnables import CONTROLS, WORKLOADS, RunKind
from gguf_sandbox.matrix.runner import REFERENCE_OK, make_sandbox, reference_of, reference_spec, run_spec
from gguf_sandbox.matrix.schema import FINISHED, Cell, Matrix, ModelDef, WorkloadDef
from gguf_sandbox.matrix.sizes import cell_memory, timeout_at
from gguf_sandbox.matrix.verdicts import Outcome, Reference
from gguf_sandbox.sandbox.base import CellSpec, Mount, Sandbox
from gguf_sandbox.sandbox.docker.backend import MODELS_DIR
from gguf_sandbox.sandbox.docker.images import SANDBOX_UID
from gguf_sandbox.units import format_size

# A leading `python`, `python3` or `python3.X` in CMD stands for the cell's interpreter.
_PYTHON_WORD = re.compile(r"^python(3(\.\d+)?)?$")
# Anything else is exec'd by the cell's interpreter, so every backend can run it the same way.
_EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"
DEFAULT_TIMEOUT_S = 300.0
# Inside a docker cell these hold the image, the cell's own tmpfs and the model: no mount may cover them.
_RESERVED_TARGETS = ("/", "/tmp", MODELS_DIR, "/proc", "/sys", "/dev", "/usr", "/bin", "/lib", "/etc")


def command_argv(command: list[str]) -> tuple[str, ...]:
    """CMD → the argv after the cell's `python`."""
    if not command:
        raise MatrixError("repro: give --workload W --model M, or a command after --")
    if _PYTHON_WORD.match(Path(command[0]).name):
        return tuple(command[1:])
    return ("-c", _EXEC, *command)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--python", required=True, help='the cell\'s Python version, e.g. "3.12"')
    parser.add_argument("--memory", required=True, help="the memory limit, e.g. 96m")
    add_cell_arguments(parser)
    parser.add_argument(
        "--reference", action="store_true", help="also run unconstrained and compare vectors (WRONG)"
    )


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    """What names a cell on the command line (repro and floor): its backend, what runs, what it sees."""
    parser.add_argument("--backend", choices=("auto", "docker", "cgroup"), default="auto")
    parser.add_argument("--matrix", default="matrix.yaml", help="where --workload/--model names are defined")
    parser.add_argument("--workload", help="a workload entry of the matrix, or a built-in workload name")
    parser.add_argument(
        "--model", help="a GGUF path, or a model name of the matrix: what {model} and the workload read"
    )
    parser.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SRC[:DST]",
        help="show a host file or directory to the cell, read-only, at DST (default: SRC's own path)",
    )
    parser.add_argument("--timeout", help="wall-clock limit (default: the matrix's, else 300s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD …: any command instead")


@dataclass(frozen=True)
class ModelChoice:
    """What --model named: the id piece, the file when it is a path, the matrix recipe when a name."""

    name: str
    path: Path | None
    definition: ModelDef | None


@dataclass(frozen=True)
class CellRequest:
    """A cell named on the command line, ready to run: its spec has the prepared model and the mounts."""

    cell: Cell
    sandbox: Sandbox
    matrix: Matrix | None


def request_cell(args: argparse.Namespace, memory: int) -> CellRequest:
    """The cell that `add_cell_arguments` options name, at `memory`; MatrixError for what is wrong with
    them, and for a backend that cannot run the cell's Python here."""
    from gguf_sandbox.matrix.models import default_cache_dir, prepare

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if bool(command) == bool(args.workload):
        raise MatrixError("give either --workload W [--model M] or -- CMD …, not both or neither")
    timeout = timeout_at(args.timeout, "--timeout") if args.timeout else None
    # The matrix is read only for what names it: a workload entry, or a model name (never for a path).
    needs_matrix = bool(args.workload) or (args.model is not None and not _is_path(args.model))
    matrix = _matrix(Path(args.matrix), required=needs_matrix)
    sandbox = _sandbox(args.backend, args.python)
    mounts = tuple(_mount(text, sandbox.name) for text in args.mount)
    if command:
        model = _model_choice(matrix, args.model) if args.model else None
        cell = _command_cell(command, args, memory=memory, backend=sandbox.name, timeout=timeout, model=model)
    else:
        workload = _workload_def(matrix, args.workload, args.model)
        model = _workload_model(matrix, args.model, workload)
        cell = _workload_cell(
            matrix, workload, args, model=model, memory=memory, backend=sandbox.name, timeout=timeout
        )
    _check_unique([*((model.path,) if model and model.path else ()), *(m.source for m in mounts)])
    reason = sandbox.unavailable_reason(args.python)
    if reason is not None:
        raise MatrixError(f"{cell.cell_id}: cannot run on {sandbox.name}: {reason}")
    spec = replace(cell.spec, mounts=mounts)
    if model is not None and model.definition is not None:
        spec = replace(spec, model=prepare(model.definition, default_cache_dir()))
    for path in (*((spec.model,) if spec.model else ()), *(m.source for m in mounts)):
        _warn_unreadable(path, sandbox.name)
    return CellRequest(replace(cell, spec=spec), sandbox, matrix)


def run(args: argparse.Namespace) -> int:
    request = request_cell(args, cell_memory(args.memory, "--memory"))
    cell, sandbox = request.cell, request.sandbox
    reference = reference_run(sandbox, cell, request.matrix) if args.reference else None
    print(f"{cell.cell_id} on {sandbox.name} …", flush=True)
    outcome = run_spec(
        sandbox,
        cell.spec,
        reference,
        cell.repro,
        expect=cell.expect,
        host_side=cell.host_side,
        needs_report=cell.reports,
    )
    print(describe(outcome))
    return 0 if outcome.verdict in cell.expect else 1


def describe(outcome: Outcome) -> str:
    """The verdict line and the same evidence a failing matrix cell shows."""
    allowed = outcome.verdict in outcome.expected
    head = f"{outcome.cell_text()} — {'as expected' if allowed else 'outside expect'}"
    return head + "\n" + outcome.failure_message()


def _matrix(path: Path, required: bool) -> Matrix | None:
    if not required:
        return None
    if path.is_file():
        return load(path)
    if path.name != "matrix.yaml":
        raise MatrixError(f"--matrix {path}: no such file")
    return None


def _sandbox(choice: str, python: str) -> Sandbox:
    if choice != "auto":
        return make_sandbox(choice)
    docker = make_sandbox("docker")
    return docker if docker.unavailable_reason(python) is None else make_sandbox("cgroup")


def _is_path(text: str) -> bool:
    """--model values with a slash or a .gguf suffix are paths, whatever the matrix names its models."""
    return os.sep in text or text.lower().endswith(".gguf")


def _model_choice(matrix: Matrix | None, text: str) -> ModelChoice:
    """--model: a path to an existing file, or a model name of the matrix (prepared before the run)."""
    if not _is_path(text) and matrix is not None and text in matrix.models:
        return ModelChoice(text, None, matrix.models[text])
    path = Path(text).expanduser()
    if not path.is_file():
        known = ", ".join(matrix.models) if matrix is not None else "no matrix loaded"
        raise MatrixError(f"--model {text}: neither a model of the matrix ({known}) nor a file")
    stem = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "model"
    return ModelChoice(stem, path.resolve(), None)


def _mount(text: str, backend: str) -> Mount:
    """`SRC[:DST]` → a read-only Mount; SRC must exist, DST is an absolute path that hides nothing."""
    source_text, _, target_text = text.partition(":")
    source = Path(source_text).expanduser()
    if not source_text or not source.exists():
        raise MatrixError(f"--mount {text}: {source_text or 'SRC'}: no such file or directory")
    source = source.resolve()
    target = target_text or str(source)
    clean = os.path.normpath(target)
    if not PurePosixPath(target).is_absolute() or "," in target:
        raise MatrixError(f"--mount {text}: DST must be an absolute path (without ',') inside the cell")
    if clean in _RESERVED_TARGETS or any(clean.startswith(f"{r}/") for r in _RESERVED_TARGETS[3:]):
        raise MatrixError(
            f"--mount {text}: {clean} would hide part of the cell; choose e.g. /data/{source.name}"
        )
    if backend == "cgroup" and clean != str(source):
        raise MatrixError(
            f"--mount {text}: the cgroup backend runs on the host's filesystem, where {source_text} stays "
            f"at {source}; give --mount {source_text} alone, or use --backend docker"
        )
    return Mount(source, clean)


def _check_unique(sources: list[Path]) -> None:
    seen: set[Path] = set()
    for source in sources:
        if source in seen:
            raise MatrixError(f"--mount {source}: given twice (as --model or another --mount)")
        seen.add(source)


def _warn_unreadable(path: Path, backend: str) -> None:
    """A docker cell runs as an unprivileged user: say so when it cannot read what was mounted for it."""
    if backend == "docker" and not path.stat().st_mode & stat.S_IROTH:
        print(
            f"note: {path} is not world-readable; the docker cell's user (uid {SANDBOX_UID}) may not read it",
            file=sys.stderr,
        )


def _command_cell(
    command: list[str],
    args: argparse.Namespace,
    *,
    memory: int,
    backend: str,
    timeout: float | None,
    model: ModelChoice | None,
) -> Cell:
    label = format_size(memory)
    pieces = [backend, f"py{args.python}", label, "command", *([model.name] if model else [])]
    spec = CellSpec(
        cell_id="-".join(pieces),
        backend=backend,
        python=args.python,
        memory=memory,
        argv=command_argv(command),
        timeout=timeout or DEFAULT_TIMEOUT_S,
        model=model.path if model else None,
    )
    words = ["gguf-sandbox", "repro", "--python", args.python, "--memory", label, "--backend", backend]
    if model is not None:
        words += ["--model", args.model]
    for mount in args.mount:
        words += ["--mount", mount]
    repro = shlex.join([*words, "--", *command])
    model_name = model.name if model else None
    return Cell(
        spec=spec,
        workload="command",
        model=model_name,
        memory_label=label,
        reference=False,
        repro=repro,
        reports=False,
        expect=FINISHED,
    )


def _workload_cell(
    matrix: Matrix | None,
    workload: WorkloadDef,
    args: argparse.Namespace,
    *,
    model: ModelChoice | None,
    memory: int,
    backend: str,
    timeout: float | None,
) -> Cell:
    model_name = model.name if model else None
    axes = {
        "backend": backend,
        "python": args.python,
        "memory": memory,
        "workload": workload.name,
        "model": model_name,
    }
    expect = matrix.expect_for(axes) if matrix is not None else FINISHED
    default_timeout = matrix.timeout_for(workload) if matrix is not None else DEFAULT_TIMEOUT_S
    label = format_size(memory)
    pieces = [backend, f"py{args.python}", label, workload.name, *([model_name] if model_name else [])]
    spec = CellSpec(
        cell_id="-".join(pieces),
        backend=backend,
        python=args.python,
        memory=memory,
        argv=workload.argv(),
        timeout=timeout or default_timeout,
        model=model.path if model else None,
        requirements=workload.requirements,
    )
    matrix_path = matrix.path if matrix is not None else None
    repro = repro_command(spec, workload.name, args.model, matrix_path)
    for mount in args.mount:
        repro += " " + shlex.join(["--mount", mount])
    return Cell(
        spec=spec,
        workload=workload.name,
        model=model_name,
        memory_label=label,
        reference=workload.reference and model_name is not None,
        repro=repro,
        expect=expect,
        host_side=workload.host_side,
        reference_argv=workload.reference_argv,
        min_cosine=workload.min_cosine,
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


def _workload_model(matrix: Matrix | None, name: str | None, workload: WorkloadDef) -> ModelChoice | None:
    """The model a workload cell reads (None for model-less workloads)."""
    if not workload.models and workload.kind is not RunKind.COMMAND:
        if name:
            raise MatrixError(f"--model: workload {workload.name} takes no model")
        return None
    named = [model for model in workload.models if model]
    if not name and len(named) == 1:
        name = named[0]  # the matrix entry runs one model: the cell a user means
    if not name:
        choices = f"one of {', '.join(named)}, or" if named else "a matrix model name or"
        raise MatrixError(f"--model: workload {workload.name} needs a model ({choices} a path)")
    return _model_choice(matrix, name)


def reference_run(
    sandbox: Sandbox, cell: Cell, matrix: Matrix | None, say: Callable[[str], None] | None = None
) -> Reference | None:
    """What the cell is compared with: its unconstrained twin's values (a peer's: ours), run now."""
    say = say or (lambda line: print(line, flush=True))
    if not cell.reference:
        say("(no reference comparison: this workload reports no vectors)")
        return None
    memory = matrix.reference_memory if matrix is not None else 2 << 30
    spec = replace(reference_spec(cell, memory), model=cell.spec.model)
    say(f"{spec.cell_id} (unconstrained reference) …")
    outcome = run_spec(sandbox, spec, expect=REFERENCE_OK, host_side=cell.host_side)
    reference = replace(reference_of(outcome), min_cosine=cell.min_cosine)
    if reference.failure is not None:
        say(f"reference run: {outcome.cell_text()} — the cell cannot be judged\n{outcome.failure_message()}")
    return reference
