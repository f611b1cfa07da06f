"""The engine inside real memory cgroups (swap off): completes where it fits, refuses where nothing fits."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.sandbox.base import RunResult
from gguf_sandbox.sandbox.cgroup import run_limited

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
    assert report["cgroup_peak"] <= 60_000_000, f"reported peak {report['cgroup_peak']:,} bytes"
    assert result.peak_bytes is not None and result.peak_bytes <= 60_000_000


def test_300mb_synthetic_bert_embeds_in_64mb_by_streaming(big_narrow_model: Path) -> None:
    assert big_narrow_model.stat().st_size >= 300 << 20
    result, report = _workload(big_narrow_model, 64 * MiB, "--count", "8", "--batch", "4")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert result.oom_kill_count == 0
    assert report["plan"] == "streaming" and report["degraded"] is True
    assert report["count"] == 8
    assert result.peak_bytes is not None and result.peak_bytes <= 64 * MiB


def test_a_limit_too_small_for_any_plan_is_refused_with_exit_3(minilm_gguf: Callable[[str], Path]) -> None:
    result, error = _workload(minilm_gguf("q8_0"), 32 * MiB, "--count", "10")
    assert result.exit_code == 3, (result.exit_code, result.stderr[-2000:])
    assert result.oom_kill_count == 0
    assert error["kind"] == "BudgetExceeded"
    assert "streaming" in error["error"] and "raise the memory limit" in error["error"]
