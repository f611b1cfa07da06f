"""Tests for workloads/controls.py: sizes in the one grammar, no yaml imported, what each control does."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox.units import MIB
from gguf_sandbox.workloads import controls
from gguf_sandbox.workloads.embed import embed
from tests.workloads.conftest import options


def test_controls_read_sizes_in_the_one_grammar(capsys: pytest.CaptureFixture[str]) -> None:
    args = controls.build_parser().parse_args(["alloc-bomb", "--step", "1MiB", "--max", "2m"])
    assert (args.step, args.max) == (MIB, 2 * MIB)
    for bad in ("64ib", "1e3", "-1m", "nan"):
        with pytest.raises(SystemExit):
            controls.build_parser().parse_args(["alloc-bomb", "--step", bad])
    assert "is not a size" in capsys.readouterr().err


def test_yaml_is_not_imported_by_controls() -> None:
    code = "import sys, gguf_sandbox.controls; print('yaml' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_refusing_engine_refuses_like_a_budget() -> None:
    done = control("refusing-engine")
    assert done.returncode == 3
    error = json.loads(done.stdout)
    assert error["kind"] == "BudgetExceeded" and "available" in error["error"]


def test_the_perturbed_engine_is_correct_unconstrained_and_wrong_under_a_limit(model: Path) -> None:
    unconstrained = control("perturbed-engine", "--model", str(model), "--count", "8")
    assert unconstrained.returncode == 0, unconstrained.stderr
    report = json.loads(unconstrained.stdout)
    assert report["perturbed"] is False
    expected = embed(model, options(count=8, batch=1)).fingerprint
    assert np.allclose(report["fingerprint"], expected, atol=1e-6)


def control(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_sandbox.controls", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_naive_loader_holds_what_gguf_py_dequantizes_from_one_read_of_the_file(model: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    loaded = controls.load_naively(str(model))
    tensors = GGUFReader(model).tensors
    assert list(loaded) == [tensor.name for tensor in tensors]
    for tensor in tensors:
        held = loaded[tensor.name]
        # Nothing held is backed by the file's memory map: a map's pages are reclaimable page cache.
        assert held.dtype == np.float32 and not isinstance(memory_owner(held), mmap.mmap)
        assert np.array_equal(held, dequantize(tensor.data, tensor.tensor_type))


def memory_owner(array: np.ndarray) -> object:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base


@pytest.mark.parametrize("hostile", ["missing", "directory", "empty", "foreign", "truncated"])
def test_a_model_naive_load_cannot_read_is_one_json_line_and_exit_4(
    hostile: str, model: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"{hostile}.gguf"
    if hostile == "directory":
        path.mkdir()
    elif hostile == "empty":
        path.write_bytes(b"")
    elif hostile == "foreign":
        path.write_bytes(b"\x00not a gguf file at all")
    elif hostile == "truncated":
        path.write_bytes(model.read_bytes()[:100_000])
    done = control("naive-load", "--model", str(path))
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    error = json.loads(done.stdout)
    assert error["kind"] == "GGUFError" and error["error"] and "\n" not in error["error"]
