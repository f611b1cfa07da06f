"""Sizes and durations in matrix.yaml: the units grammar within a cell's bounds, errors naming where."""

from __future__ import annotations

from gguf_sandbox import units
from gguf_sandbox.errors import MatrixError
from gguf_sandbox.units import MAX_SIZE, MIB, UnitError

# Cell limits: below 4 MiB no interpreter starts (and cgroups round 1k down to 0, i.e. no limit at all);
# above the host's RAM a limit limits nothing. Timeouts: finite, positive, at most a day.
MIN_CELL_MEMORY = 4 * MIB
MAX_TIMEOUT_S = 24 * 3600.0


def host_memory() -> int:
    """The host's RAM: the largest memory limit a cell may ask for."""
    import psutil

    return int(psutil.virtual_memory().total)


def size_at(value: object, where: str, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """units.parse_size, its error naming `where` as a MatrixError."""
    try:
        return units.parse_size(value, minimum, maximum)
    except UnitError as error:
        raise MatrixError(f"{where}: {error}") from None


def timeout_at(value: object, where: str) -> float:
    """units.parse_duration (seconds, or s/m/h) within (0, 24h], its error naming `where`."""
    try:
        return units.parse_duration(value, MAX_TIMEOUT_S)
    except UnitError as error:
        raise MatrixError(f"{where}: {error}") from None


def cell_memory(value: object, where: str) -> int:
    """A cell's memory limit: a size from 4m to the host's RAM."""
    return size_at(value, where, MIN_CELL_MEMORY, max(MIN_CELL_MEMORY, host_memory()))
