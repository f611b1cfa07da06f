"""Collects one pytest test per matrix cell (ids = cell ids) and runs cells through their backends.

Cells run through the real runner (runner.MatrixRun), one per test. Options: --matrix-file (default: the
repo's matrix.yaml), --matrix-profile (default: ci; `none` = the whole matrix), --matrix-backend
(repeatable; default: the matrix's backends), --matrix-results (also append outcomes to a JSONL file). Cells
run in a child process or container under the limit, never in pytest: an OOM kills the cell, not the
session.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO, cast

import pytest

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.load import load
from gguf_sandbox.matrix.models import default_cache_dir, prepare
from gguf_sandbox.matrix.results import SKIP, CellRecord, ResultStore
from gguf_sandbox.matrix.runner import MatrixRun, make_sandbox
from gguf_sandbox.matrix.schema import Cell, Matrix

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


class _Stderr(io.TextIOBase):
    """The runner's progress lines, written to whatever sys.stderr is now (pytest captures it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class MatrixSession:
    """The real runner (runner.MatrixRun) over the collected cells, driven one cell per test."""

    def __init__(self, run: MatrixRun) -> None:
        self.runner = run
        self._index = {cell.cell_id: index for index, cell in enumerate(run.cells, start=1)}
        self._prepared: str | None = None

    def run(self, cell: Cell) -> CellRecord:
        """The cell run and recorded as `gguf-sandbox run` would (models prepared once, before the first)."""
        if self._prepared is None:
            try:
                self.runner.prepare_models()
                self._prepared = ""
            except GGUFSandboxError as error:
                self._prepared = str(error)
        if self._prepared:
            pytest.fail(self._prepared, pytrace=False)
        record = self.runner.run_cell(self._index[cell.cell_id], cell)
        if record.kind == SKIP:
            pytest.skip(
                f"{cell.spec.backend} backend unavailable for Python {cell.spec.python}: {record.reason}"
            )
        return record

    def failure(self, cell: Cell) -> str:
        return self.runner.failures.get(cell.cell_id, f"cell {cell.cell_id}: not recorded")


def _collected_cells(session: pytest.Session) -> list[Cell]:
    """The cells of the tests that will run (after -k and deselection), in collection order."""
    cells = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "matrix_cell" in callspec.params:
            cells.append(callspec.params["matrix_cell"])
    return cells


@pytest.fixture(scope="session")
def matrix_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MatrixSession]:
    cells = _collected_cells(request.session)
    results = _option(request.config, "--matrix-results", None)
    path = str(results) if results else str(tmp_path_factory.mktemp("matrix") / "results.jsonl")
    with ResultStore.open(path, resume=True) as store:
        yield MatrixSession(
            MatrixRun(
                matrix=_matrix(request.config),
                cells=cells,
                sandboxes={name: make_sandbox(name) for name in dict.fromkeys(c.spec.backend for c in cells)},
                store=store,
                prepare_model=lambda model: prepare(model, default_cache_dir()),
                out=cast(TextIO, _Stderr()),
            )
        )
