"""`gguf-sandbox run`: every cell of matrix.yaml through its backend, durably recorded, then the grids."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from gguf_sandbox import __version__
from gguf_sandbox.atomic import path_argument
from gguf_sandbox.errors import GGUFSandboxError, MatrixError, SandboxError
from gguf_sandbox.host import host_facts
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.grid import cell_text, render_grids
from gguf_sandbox.matrix.junit import check_junit_path, write_junit
from gguf_sandbox.matrix.load import load
from gguf_sandbox.matrix.progress import make_progress
from gguf_sandbox.matrix.results import (
    CELL,
    ERROR,
    REFERENCE,
    RUN,
    SKIP,
    CellRecord,
    ResultStore,
    latest_cells,
    read_records,
    summarize,
)
from gguf_sandbox.matrix.schema import GRACEFUL, Cell, Matrix, ModelDef
from gguf_sandbox.matrix.shard import (
    Shard,
    cell_estimate,
    parse_shard,
    plan_shards,
    read_durations,
    take_shard,
)
from gguf_sandbox.matrix.verdicts import Outcome, Reference, Verdict, comparable, decide, parse_report
from gguf_sandbox.sandbox.base import CellSpec, RunResult, Sandbox
from gguf_sandbox.sandbox.sampling import SampleWatcher

# Backend name → "module:class"; imported only when chosen (docker pulls in the docker SDK).
BACKENDS: Mapping[str, str] = {
    "docker": "gguf_sandbox.sandbox.docker.backend:DockerSandbox",
    "cgroup": "gguf_sandbox.sandbox.cgroup.backend:CgroupSandbox",
}
BACKEND_CHOICES = ("auto", "docker", "cgroup", "all")
REFERENCE_OK = frozenset({Verdict.PASS, Verdict.DEGRADED})
INTERRUPTED_EXIT_CODE = 130


class UnavailableSandbox:
    """Stands in for a backend that cannot even be constructed here; every cell skips with `reason`."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def unavailable_reason(self, python: str) -> str | None:
        return self.reason

    def run(self, spec: CellSpec, *, watch: SampleWatcher | None = None) -> RunResult:
        raise SandboxError(f"backend {self.name} is unavailable: {self.reason}")


def make_sandbox(name: str) -> Sandbox:
    """The backend called `name`, or an UnavailableSandbox saying why it cannot be built."""
    if name not in BACKENDS:
        raise MatrixError(f"--backend {name}: unknown backend; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        sandbox: Sandbox = getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, GGUFSandboxError, OSError) as error:
        return UnavailableSandbox(name, f"{type(error).__name__}: {error}")
    return sandbox


def choose_backends(
    choice: str, matrix: Matrix, factory: Callable[[str], Sandbox] = make_sandbox
) -> list[Sandbox]:
    """auto: docker when it can run one of the matrix's Pythons, else cgroup; all: the matrix's backends."""
    if choice == "all":
        return [factory(name) for name in matrix.backends]
    if choice != "auto":
        return [factory(choice)]
    docker = factory("docker")
    if any(docker.unavailable_reason(python) is None for python in matrix.pythons):
        return [docker]
    return [factory("cgroup")]


def cell_fingerprint(spec: CellSpec) -> str:
    """What must be unchanged for a finished cell to count on --resume (expect may change freely)."""
    data = [spec.backend, spec.python, spec.memory, list(spec.argv), spec.timeout, str(spec.model)]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def cell_fields(cell: Cell) -> dict[str, Any]:
    """The identifying fields every record about `cell` carries."""
    return {
        "cell_id": cell.cell_id,
        "backend": cell.spec.backend,
        "python": cell.spec.python,
        "memory": cell.spec.memory,
        "memory_label": cell.memory_label,
        "workload": cell.workload,
        "model": cell.model,
        "expected": sorted(v.value for v in cell.expect),
        "fingerprint": cell_fingerprint(cell.spec),
        "repro": cell.repro,
    }


def run_spec(
    sandbox: Sandbox,
    spec: CellSpec,
    reference: Reference | None = None,
    repro: str = "",
    *,
    expect: frozenset[Verdict] = GRACEFUL,
    host_side: bool = False,
    needs_report: bool = True,
    watch: SampleWatcher | None = None,
) -> Outcome:
    """Run one spec and decide it against `reference` (None: not compared), allowing the verdicts in
    `expect`; a `host_side` cell runs through its host-side client (mcp/cell.py). SandboxError propagates:
    the harness, not the cell, failed. `watch` sees the cell's memory samples as they are taken."""
    if host_side:
        from gguf_sandbox.mcp.cell import run_cell

        result = run_cell(sandbox, spec, watch)
    else:
        result = sandbox.run(spec, watch=watch)
    return decide(
        result,
        parse_report(result.stdout),
        reference,
        needs_report=needs_report,
        cell_id=spec.cell_id,
        repro=repro,
        expected=expect,
    )


def reference_spec(cell: Cell, memory: int) -> CellSpec:
    """The cell's unconstrained twin: same backend, Python, argv, timeout and model, a generous limit.

    Its id ends in the twin's fingerprint, so a stored reference is reused only for the very same run
    (`--resume` after changing a workload's args or the model re-runs it).
    """
    if not cell.reference:
        raise MatrixError(f"cell {cell.cell_id}: it compares no vectors, so it has no reference run")
    twin = replace(cell.spec, memory=memory, argv=cell.reference_argv or cell.spec.argv)
    model = f"-{cell.model}" if cell.model else ""
    key = f"{twin.backend}-py{twin.python}-ref-{cell.workload}{model}-{cell_fingerprint(twin)}"
    return replace(twin, cell_id=key)


def reference_of(outcome: Outcome) -> Reference:
    """What a finished reference run offers the cells compared with it."""
    if outcome.verdict not in REFERENCE_OK:
        return Reference.failed(
            f"its unconstrained reference run {outcome.cell_id} ended {outcome.cell_text()}: {outcome.reason}"
        )
    values = comparable(outcome.report)
    if values is None:
        return Reference.failed(f"its unconstrained reference run {outcome.cell_id} reported no vectors")
    return Reference(values)


class MatrixRun:
    """Executes cells in order against their sandboxes, recording each before starting the next."""

    def __init__(
        self,
        *,
        matrix: Matrix,
        cells: Sequence[Cell],
        sandboxes: Mapping[str, Sandbox],
        store: ResultStore,
        prepare_model: Callable[[ModelDef], Path],
        out: TextIO,
        resume: bool = False,
    ) -> None:
        self.matrix = matrix
        self.cells = list(cells)
        self.sandboxes = sandboxes
        self.store = store
        self.prepare_model = prepare_model
        self.progress = make_progress(out, [cell_estimate(matrix, cell) for cell in self.cells])
        self.resume = resume
        self._availability: dict[tuple[str, str], str | None] = {}
        self._models: dict[str, Path] = {}
        # Only references that produced values are reused: a failed one is tried again.
        self._references: dict[str, Reference] = {
            key: Reference(record["checksum"])
            for key, record in store.references().items()
            if record.get("checksum") is not None
        }
        self.records: list[CellRecord] = []
        # Why each cell that was not ok failed: the outcome's failure message, or the harness error.
        self.failures: dict[str, str] = {}
        self._finished: dict[str, CellRecord] | None = None

    def prepare_models(self) -> None:
        """Prepare every model the cells run on, before any cell: a model that cannot be made fails the
        run once, with its fix, instead of every cell that needs it."""
        failures = []
        for name in dict.fromkeys(cell.model for cell in self.cells if cell.model is not None):
            definition = self.matrix.models[name]
            self.progress.note(f"preparing model {definition.describe()} …")
            try:
                self._models[name] = self.prepare_model(definition)
            except GGUFSandboxError as error:
                failures.append(f"model {name}: {error}")
        if failures:
            raise MatrixError(
                "cannot prepare the matrix's models; no cell was run:\n  " + "\n  ".join(failures)
            )

    def execute(self) -> list[CellRecord]:
        """Prepare the models, then run every cell (KeyboardInterrupt propagates; what finished is already
        on disk). Cells recorded `error` are run again on --resume."""
        try:
            self.prepare_models()
            for index, cell in enumerate(self.cells, start=1):
                self.records.append(self.run_cell(index, cell))
        finally:
            self.progress.close()
        return self.records

    def run_cell(self, index: int, cell: Cell) -> CellRecord:
        """Run cell number `index` (or, on --resume, take its finished record) and record it; what execute()
        does for each cell, for callers that drive cells one at a time (tests/matrix). The models must have
        been prepared. A cell that is not ok leaves its explanation in `failures`."""
        if self._finished is None:
            self._finished = self.store.finished() if self.resume else {}
        done = self._finished.get(cell.cell_id)
        if (
            done is not None
            and done.verdict is not Verdict.ERROR
            and done.fingerprint == cell_fingerprint(cell.spec)
        ):
            record = replace(done, expected=cell.expect)
            self.progress.start(index, cell.cell_id)
            self.progress.finish(f"{cell_text(record)} (resumed)", ran=False)
            return record
        return self._run_cell(index, cell)

    def _run_cell(self, index: int, cell: Cell) -> CellRecord:
        spec = cell.spec
        reason = self._unavailable(spec.backend, spec.python)
        if reason is not None:
            self.progress.start(index, cell.cell_id)
            return self._record(cell, {"kind": SKIP, "reason": reason}, f"skip ({reason})", ran=False)
        spec = replace(spec, model=self._models[cell.model] if cell.model is not None else None)
        try:
            reference = self._reference(cell, spec) if cell.reference else None
        except SandboxError as error:
            self.progress.start(index, cell.cell_id)
            return self._record(cell, {"kind": ERROR, "reason": f"reference run: {error}"}, f"error: {error}")
        self.progress.start(index, cell.cell_id, spec.memory)
        try:
            outcome = run_spec(
                self.sandboxes[spec.backend],
                spec,
                reference,
                cell.repro,
                expect=cell.expect,
                host_side=cell.host_side,
                needs_report=cell.reports,
                watch=self.progress.watch,
            )
        except SandboxError as error:
            return self._record(cell, {"kind": ERROR, "reason": str(error)}, f"error: {error}")
        record = self._record(cell, {"kind": CELL, **outcome.to_json()}, "")
        self.progress.finish(_finish_text(record, outcome))
        if not record.ok:
            self.failures[cell.cell_id] = outcome.failure_message()
            self.progress.note(self.failures[cell.cell_id])
        return record

    def _record(self, cell: Cell, body: Mapping[str, Any], text: str, *, ran: bool = True) -> CellRecord:
        data = {**cell_fields(cell), **body}
        self.store.append(data)
        if text:
            self.progress.finish(text, ran=ran)
        record = CellRecord.from_json(data)
        if not record.ok and record.kind != CELL:
            self.failures[cell.cell_id] = (
                f"cell {cell.cell_id}: {text or record.reason}\n  reproduce: {cell.repro}"
            )
        return record

    def _unavailable(self, backend: str, python: str) -> str | None:
        key = (backend, python)
        if key not in self._availability:
            self.progress.note(f"checking {backend} for Python {python} (may build a venv or an image) …")
            self._availability[key] = self.sandboxes[backend].unavailable_reason(python)
        return self._availability[key]

    def _reference(self, cell: Cell, spec: CellSpec) -> Reference:
        """The cell's unconstrained twin's values, or why there are none (run once per twin, stored so that
        --resume reuses it)."""
        twin = replace(reference_spec(cell, self.matrix.reference_memory), model=spec.model)
        if twin.cell_id not in self._references:
            self.progress.note(f"reference {twin.cell_id} (the cell unconstrained, for its vectors) …")
            outcome = run_spec(
                self.sandboxes[spec.backend],
                twin,
                expect=REFERENCE_OK,
                host_side=cell.host_side,
                watch=self.progress.watch,
            )
            reference = reference_of(outcome)
            self.store.append(
                {
                    "kind": REFERENCE,
                    "cell_id": twin.cell_id,
                    "checksum": reference.values,
                    **outcome.to_json(),
                }
            )
            if reference.failure is not None:
                self.progress.note(f"reference {twin.cell_id}: {outcome.cell_text()} — {outcome.reason}")
            self._references[twin.cell_id] = reference
        return replace(self._references[twin.cell_id], min_cosine=cell.min_cosine)


def _finish_text(record: CellRecord, outcome: Outcome) -> str:
    status = "" if record.ok else "  UNEXPECTED"
    agreed = f", cos {outcome.agreement.smallest:.5f}" if outcome.agreement is not None else ""
    return f"{cell_text(record)} ({outcome.duration_s:.1f}s{agreed}){status}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("matrix", nargs="?", default="matrix.yaml", help="matrix file (default matrix.yaml)")
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="auto: docker when an engine is reachable, else cgroup; all: every backend in the matrix",
    )
    parser.add_argument(
        "--results", default="results.jsonl", help="JSONL results file (default results.jsonl)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the results file and skip finished cells")
    parser.add_argument("-k", dest="k", metavar="EXPR", help="select cell ids: substrings with and/or/not")
    parser.add_argument("--profile", help="a named subset of the matrix, e.g. ci")
    parser.add_argument("--list", action="store_true", help="print the selected cell ids and exit")
    parser.add_argument(
        "--grid", action="store_true", help="print the grids and summary of the --results file and exit"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run only part I of N of the selected cells, balanced by expected cost (CI runners)",
    )
    parser.add_argument(
        "--durations",
        metavar="RESULTS",
        help="balance --shard by the seconds each cell took in this previous results file",
    )
    parser.add_argument("--junit", metavar="FILE", help="also write the cells as JUnit XML to FILE")
    parser.add_argument(
        "--report", metavar="DIR", help="also write the HTML/PNG/Markdown report of --results into DIR"
    )


def run(args: argparse.Namespace) -> int:
    from gguf_sandbox.matrix.models import default_cache_dir, prepare

    shard = parse_shard(args.shard) if args.shard is not None else None
    _check_outputs(args)
    if args.durations and shard is None:
        raise MatrixError("--durations balances shards; give --shard I/N with it")
    if args.grid:
        records = read_records(Path(args.results))
        recorded = latest_cells(records)
        if not recorded:
            raise GGUFSandboxError(f"--grid: {args.results} holds no cell records")
        if args.junit:
            write_junit(Path(args.junit), records)
        ok = report(recorded)
        _write_report(args)
        return 0 if ok else 1
    durations = read_durations(Path(args.durations)) if args.durations else None
    matrix = load(args.matrix, profile=args.profile)
    if args.list:
        cells = expand_cells(matrix, backends=_listed_backends(args.backend, matrix), k=args.k)
        for cell in _shard_of(matrix, cells, shard, durations):
            print(cell.cell_id)
        return 0
    sandboxes = {s.name: s for s in choose_backends(args.backend, matrix)}
    selected = expand_cells(matrix, backends=list(sandboxes), k=args.k)
    if not selected:
        raise MatrixError(f"-k {args.k!r}: no cell of {args.matrix} matches; see `gguf-sandbox run --list`")
    cells = _shard_of(matrix, selected, shard, durations)
    cache = default_cache_dir()
    backends_text = ", ".join(sandboxes)
    host = host_facts()
    print(f"{len(cells)} cells on {backends_text} → {args.results}", flush=True)
    print("host: " + ", ".join(f"{key} {value}" for key, value in host.items()), flush=True)
    with ResultStore.open(args.results, resume=args.resume) as store:
        # What merge needs to name missing cells: every cell selected before sharding, and which part ran.
        store.append(
            {
                "kind": RUN,
                "cell_id": "",
                "matrix": str(args.matrix),
                "profile": args.profile,
                "backends": list(sandboxes),
                "k": args.k,
                "shard": str(shard) if shard else None,
                "selected": [cell.cell_id for cell in selected],
                "version": __version__,
                "host": host,
            }
        )
        runner = MatrixRun(
            matrix=matrix,
            cells=cells,
            sandboxes=sandboxes,
            store=store,
            prepare_model=lambda m: prepare(m, cache),
            out=sys.stdout,
            resume=args.resume,
        )
        try:
            with _sigterm_as_interrupt():
                runner.execute()
        except KeyboardInterrupt:
            print(
                f"\ninterrupted after {len(runner.records)}/{len(cells)} cells; "
                f"rerun with --resume to continue from {args.results}",
                file=sys.stderr,
            )
            report(runner.records)
            _write_junit(args.junit, store, cells)
            _write_report(args)
            return INTERRUPTED_EXIT_CODE
        _write_junit(args.junit, store, cells)
    ok = report(runner.records)
    _write_report(args)
    return 0 if ok else 1


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse --junit and --report paths that could not be written, or would replace what is not ours,
    before any cell runs (not hours later); --junit must not be the results file."""
    results = path_argument(args.results, "--results")
    if args.junit is not None:
        junit = path_argument(args.junit, "--junit")
        if os.path.abspath(junit) == os.path.abspath(results):
            raise GGUFSandboxError(f"--junit {junit}: is the results file; give another path")
        check_junit_path(junit)
    if args.report is not None:
        from gguf_sandbox.matrix.report import check_report_directory

        check_report_directory(path_argument(args.report, "--report"))


def _write_report(args: argparse.Namespace) -> None:
    """`--report DIR`: the report of the whole results file (resumed cells too), and where it is."""
    if args.report:
        from gguf_sandbox.matrix.report import report_files

        print(report_files([Path(args.results)], Path(args.report)).line(), flush=True)


def _shard_of(
    matrix: Matrix, cells: Sequence[Cell], shard: Shard | None, durations: Mapping[str, float] | None
) -> list[Cell]:
    """The cells of `shard` (all when None); the shards' estimated seconds go to stderr."""
    if shard is None:
        return list(cells)
    plan = plan_shards(
        matrix,
        cells,
        shard.count,
        lambda cell: reference_spec(cell, matrix.reference_memory).cell_id,
        durations,
    )
    print(plan.summary(shard), file=sys.stderr, flush=True)
    return take_shard(cells, plan, shard)


def _write_junit(path: str | None, store: ResultStore, cells: Sequence[Cell]) -> None:
    """JUnit XML of this run's cells (on --resume, their latest records)."""
    if path:
        ids = {cell.cell_id for cell in cells}
        records = store.records()
        write_junit(Path(path), [r for r in records if r.get("cell_id") in ids or r.get("kind") == RUN])


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (CI stopping us, `kill`) unwinds like Ctrl-C, so backends clean up what runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _listed_backends(choice: str, matrix: Matrix) -> list[str]:
    """The backends `run` would use, decided without building anything (--list must be cheap): auto
    lists docker when an engine answers (a run may still fall back to cgroup if no image can be built)."""
    if choice == "all":
        return list(matrix.backends)
    if choice == "auto":
        return ["docker" if _engine_answers() else "cgroup"]
    return [choice]


def _engine_answers() -> bool:
    from gguf_sandbox.sandbox.docker.engine import engine_client

    try:
        engine_client().close()
    except SandboxError:
        return False
    return True


def report(records: Iterable[CellRecord], out: TextIO | None = None) -> bool:
    """Print the grids and the summary; True when every decided cell is within its expect."""
    stream = out if out is not None else sys.stdout
    cells = list(records)
    summary = summarize(cells)
    stream.write("\n" + render_grids(cells) + "\n\n" + summary.render() + "\n")
    stream.flush()
    return summary.ok
