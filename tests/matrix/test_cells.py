"""One test per matrix cell: the cell's verdict must be one its `expect` allows."""

from __future__ import annotations

import pytest

from gguf_sandbox.matrix.schema import Cell
from tests.matrix.conftest import MatrixSession


def test_cell(matrix_cell: Cell, matrix_session: MatrixSession) -> None:
    record = matrix_session.run(matrix_cell)
    if not record.ok:
        pytest.fail(matrix_session.failure(matrix_cell), pytrace=False)
