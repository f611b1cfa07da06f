"""Collects one pytest test per matrix cell (ids = cell ids) and runs cells through their backends.

Options: --matrix-file (default: the repo's matrix.yaml), --matrix-profile (default: ci; `none` = the
whole matrix), --matrix-backend (repeatable; default: the matrix's backends), --matrix-results (also
append outcomes to a JSONL file). Cells run in a child process or container under the limit, never in
pytest: an OOM kills the cell, not the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.load import load
from gguf_sandbox.matrix.models import default_cache_dir, prepare
from gguf_sandbox.matrix.results import CELL, REFERENCE, ResultStore
from gguf_sandbox.matrix.runner import cell_fields, make_sandbox, reference_of, reference_spec, run_spec
from gguf_sandbox.matrix.schema import Cell, Matrix
from gguf_sandbox.matrix.verdicts import Outcome, Reference
from gguf_sandbox.sandbox.base import Sandbox

REPO = Path(__file__).resolve().parents[2]
NO_PROFILE = "none"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("matrix", "resource-limit matrix")
    group.addoption("--matrix-file", default=str(REPO / "matrix.yaml"), help="matrix file to collect")
    group.addoption(
        "--matrix-profile", default="ci", help=f"profile to collect (default ci; {NO_PROFILE}: everything)"
    )
    group.addoption(
        "--matrix-backend",
        action="append",
        choices=("docker", "cgroup"),
        help="backend(s) to collect (default: the matrix's backends)",
    )
    group.addoption("--matrix-results", default=None, help="append every outcome to this JSONL file")


def _option(config: pytest.Config, name: str, default: object) -> object:
    try:
        return config.getoption(name)
    except ValueError:  # options registered after parsing (pytest started elsewhere): use defaults
        return default


def _matrix(config: pytest.Config) -> Matrix:
    profile = _option(config, "--matrix-profile", "ci")
    try:
        return load(
            str(_option(config, "--matrix-file", REPO / "matrix.yaml")),
            profile=None if profile in (NO_PROFILE, "", None) else str(profile),
        )
    except GGUFSandboxError as error:
        raise pytest.UsageError(f"tests/matrix: {error}") from error


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "matrix_cell" not in metafunc.fixturenames:
        return
    matrix = _matrix(metafunc.config)
    backends = _option(metafunc.config, "--matrix-backend", None)
    cells = expand_cells(matrix, backends=backends if isinstance(backends, list) else None)
    metafunc.parametrize(
        "matrix_cell",
        [
            pytest.param(
                cell, id=cell.cell_id, marks=[pytest.mark.matrix, getattr(pytest.mark, cell.spec.backend)]
            )
            for cell in cells
        ],
    )


class MatrixSession:
    """Session-wide state: one sandbox per backend, availability, prepared models, reference results."""

    def __init__(self, matrix: Matrix, store: ResultStore | None) -> None:
        self.matrix = matrix
        self.store = store
        self._sandboxes: dict[str, Sandbox] = {}
        self._availability: dict[tuple[str, str], str | None] = {}
        self._models: dict[str, Path | str] = {}
        self._references: dict[str, Reference] = {}

    def sandbox(self, name: str) -> Sandbox:
        if name not in self._sandboxes:
            self._sandboxes[name] = make_sandbox(name)
        return self._sandboxes[name]

    def skip_reason(self, cell: Cell) -> str | None:
        key = (cell.spec.backend, cell.spec.python)
        if key not in self._availability:
            self._availability[key] = self.sandbox(cell.spec.backend).unavailable_reason(cell.spec.python)
        return self._availability[key]

    def model(self, name: str) -> Path:
        if name not in self._models:
            try:
                self._models[name] = prepare(self.matrix.models[name], default_cache_dir())
            except GGUFSandboxError as error:
                self._models[name] = str(error)
        found = self._models[name]
        if isinstance(found, str):
            pytest.fail(f"model {name} could not be prepared: {found}", pytrace=False)
        return found

    def reference(self, cell: Cell, sandbox: Sandbox) -> Reference:
        twin = reference_spec(cell, self.matrix.reference_memory)
        if twin.cell_id not in self._references:
            outcome = run_spec(sandbox, twin)
            self._references[twin.cell_id] = reference_of(outcome)
            self._record({"kind": REFERENCE, "cell_id": twin.cell_id, **outcome.to_json()})
        return self._references[twin.cell_id]

    def run(self, cell: Cell) -> Outcome:
        reason = self.skip_reason(cell)
        if reason is not None:
            pytest.skip(f"{cell.spec.backend} backend unavailable for Python {cell.spec.python}: {reason}")
        sandbox = self.sandbox(cell.spec.backend)
        if cell.model is not None:
            cell = replace(cell, spec=replace(cell.spec, model=self.model(cell.model)))
        reference = self.reference(cell, sandbox) if cell.reference else None
        outcome = run_spec(sandbox, cell.spec, reference, cell.repro, needs_report=cell.reports)
        self._record({**cell_fields(cell), "kind": CELL, **outcome.to_json()})
        return outcome

    def _record(self, record: dict[str, object]) -> None:
        if self.store is not None:
            self.store.append(record)


@pytest.fixture(scope="session")
def matrix_session(request: pytest.FixtureRequest) -> Iterator[MatrixSession]:
    results = _option(request.config, "--matrix-results", None)
    store = ResultStore.open(str(results), resume=True) if results else None
    try:
        yield MatrixSession(_matrix(request.config), store)
    finally:
        if store is not None:
            store.close()
