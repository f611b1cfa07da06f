"""The engine inside real memory cgroups (swap off): completes where it fits, refuses where nothing fits."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.sandbox.base import RunResult
from gguf_sandbox.sandbox.cgroup.process import run_limited
from tests.models import GEMMA3, SMOLLM2, packaged_gguf

pytestmark = [pytest.mark.cgroup, pytest.mark.usefixtures("writable_cgroups")]

MiB = 1 << 20
# One BLAS thread: on a shared 2-core runner, OpenBLAS's thread pool costs more than it gains at these sizes.
ENV = {"OPENBLAS_NUM_THREADS": "1"}


def _workload(model: Path, memory: int, *args: str, timeout: float = 600) -> tuple[RunResult, dict[str, Any]]:
    argv = [sys.executable, "-m", "gguf_sandbox", "workload", "embed", "--model", str(model), *args]
    result = run_limited(argv, memory, timeout, env=ENV)
    lines = result.stdout.strip().splitlines()
    return result, json.loads(lines[-1]) if lines else {}


def test_1000_minilm_q8_0_embeddings_in_64mb(minilm_gguf: Callable[[str], Path]) -> None:
    result, report = _workload(minilm_gguf("q8_0"), 64 * MiB, "--count", "1000", "--batch", "16")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    assert report["count"] == 1000 and report["errors"] == 0
    assert report["cgroup_limit"] == 64 * MiB
    # The cgroup's peak counts the page cache the cell was charged for — up to the whole limit on a cold
    # cache, and reclaimable (the budget's working-set rule); what the kernel could not take back stays
    # below the limit by the budget's headroom.
    working_set = report["cgroup_working_set"]
    print(f"working set {working_set:,} bytes, cgroup peak {report['cgroup_peak']:,} bytes")
    assert working_set <= 60_000_000, f"working set {working_set:,} bytes"
    assert result.peak_bytes is not None and result.peak_bytes <= 64 * MiB


def test_eight_concurrent_callers_embed_in_64mb(minilm_gguf: Callable[[str], Path]) -> None:
    """8 threads sharing one Embedder used to starve a 64 MiB cell (each kept a BLAS buffer; refused after
    waiting 120 s for room); passes now run at most one per CPU."""
    argv = [sys.executable, "-m", "gguf_sandbox", "workload", "embed-concurrent"]
    argv += ["--model", str(minilm_gguf("q8_0")), "--count", "200", "--threads", "8"]
    result = run_limited(argv, 64 * MiB, 600, env=ENV)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["count"] == 200 and report["threads"] == 8


def test_300mb_synthetic_bert_embeds_in_64mb_by_streaming(big_narrow_model: Path) -> None:
    assert big_narrow_model.stat().st_size >= 300 << 20
    result, report = _workload(big_narrow_model, 64 * MiB, "--count", "8", "--batch", "4")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0
    assert report["plan"] == "streaming" and report["degraded"] is True
    assert report["count"] == 8
    assert result.peak_bytes is not None and result.peak_bytes <= 64 * MiB


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_100_decoder_embeddings_in_64mb(name: str) -> None:
    """SmolLM2 (94 MB, llama) and gemma-3-270m (241 MB, a 262,144-token vocabulary) stream in 64 MiB."""
    found = packaged_gguf(SMOLLM2 if name == "smollm2" else GEMMA3)
    if isinstance(found, str):
        pytest.skip(found)
    result, report = _workload(found, 64 * MiB, "--count", "100", "--batch", "10")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    assert report["count"] == 100 and report["errors"] == 0
    assert report["plan"] == "streaming" and report["degraded"] is True and report["pooling"] == "last"
    assert result.peak_bytes is not None and result.peak_bytes <= 64 * MiB


def test_a_limit_too_small_for_any_plan_is_refused_with_exit_3(minilm_gguf: Callable[[str], Path]) -> None:
    result, error = _workload(minilm_gguf("q8_0"), 32 * MiB, "--count", "10")
    assert result.exit_code == 3, (result.exit_code, result.stderr[-2000:])
    assert result.oom_kill_count == 0
    assert error["kind"] == "BudgetExceeded"
    assert "streaming" in error["error"] and "raise the memory limit" in error["error"]


# The child reads a file twice the cell's size, so its page cache fills the cell to the limit (as the
# interpreter's, numpy's and the model's pages do on a cold start), and keeps re-reading it until the engine
# has planned and loaded: the engine starts in a cell whose usage is at its limit.
WARM_CACHE_CHILD = """
import sys, threading
from gguf_sandbox import budget
from gguf_sandbox.cli import main
from gguf_sandbox.embed import engine

opened = threading.Event()

def fill_page_cache():
    while not opened.is_set():
        with open(sys.argv[1], "rb") as big:
            while big.read(1 << 20) and not opened.is_set():
                pass

with open(sys.argv[1], "rb") as big:
    while big.read(1 << 20):
        pass
print(f"usage before the engine: {budget.current_usage()}", file=sys.stderr, flush=True)
filler = threading.Thread(target=fill_page_cache, daemon=True)
filler.start()
open_embedder = engine.Embedder.open.__func__

def open_then_stop_filling(cls, *args, **kwargs):
    try:
        return open_embedder(cls, *args, **kwargs)
    finally:
        opened.set()
        filler.join()

engine.Embedder.open = classmethod(open_then_stop_filling)
sys.exit(main(["workload", "embed", "--model", sys.argv[2], "--count", "1000", "--batch", "16"]))
"""


def test_1000_embeddings_in_64mb_after_page_cache_filled_the_cell(
    minilm_gguf: Callable[[str], Path], tmp_path: Path
) -> None:
    filler = tmp_path / "filler.bin"
    with filler.open("wb") as out:
        for _ in range(128):
            out.write(os.urandom(1 << 20))
        out.flush()
        os.fsync(out.fileno())
        # Out of the page cache, so the child's read charges every page to the cell.
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    argv = [sys.executable, "-c", WARM_CACHE_CHILD, str(filler), str(minilm_gguf("q8_0"))]
    result = run_limited(argv, 64 * MiB, 900, env=ENV)
    usage = int(result.stderr.split("usage before the engine: ")[1].split()[0])
    assert usage >= 56 * MiB, f"the page cache filled only {usage:,} bytes of the cell"
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["count"] == 1000 and report["errors"] == 0


def _embed_input(model: Path, source: Path) -> RunResult:
    argv = [sys.executable, "-m", "gguf_sandbox", "embed", "--model", str(model), "--input", str(source)]
    argv += ["--precision", "3"]
    return run_limited(argv, 64 * MiB, 900, env=ENV, output_limit=64 * MiB)


@pytest.mark.parametrize(
    ("lines", "notes"),
    [
        pytest.param([f"line {i}: a short text about memory" for i in range(3000)], 0, id="3000-short-lines"),
        pytest.param(["a 30 MB line " + "of words " * 3_400_000, "and a short one"], 1, id="one-30mb-line"),
    ],
)
def test_embed_input_streams_in_64mb(
    minilm_gguf: Callable[[str], Path], tmp_path: Path, lines: list[str], notes: int
) -> None:
    source = tmp_path / "input.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = _embed_input(minilm_gguf("q8_0"), source)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0 and not result.oom_killed_flag
    assert len(result.stderr.strip().splitlines()) == notes, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert len(report["data"]) == len(lines)
    assert all(len(row["embedding"]) == 384 for row in report["data"])
