"""The reader's memory bounds, proven by allocation records and by a real 64 MB cgroup."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.window import CHUNK_BYTES
from gguf_sandbox.sandbox.cgroup.placement import cgroups_writable
from gguf_sandbox.sandbox.cgroup.process import run_limited

memray = pytest.importorskip("memray", reason="memray records every allocation; pip install memray")

SIXTY_FOUR_MB = 64 << 20


def test_big_model_is_big_enough(big_model: Path) -> None:
    assert big_model.stat().st_size >= 300 << 20


def _largest_allocations(records_path: Path, count: int = 3) -> list[tuple[int, str]]:
    reader = memray.FileReader(records_path)
    largest = sorted(reader.get_allocation_records(), key=lambda r: r.size, reverse=True)[:count]
    return [
        (record.size, " <- ".join(f"{f[0]} {f[1]}:{f[2]}" for f in record.stack_trace()[:3]))
        for record in largest
    ]


def test_no_allocation_over_1mib_opening_262k_vocab_and_streaming_300mb(
    vocab262k_model: Path, big_model: Path, tmp_path: Path
) -> None:
    records = tmp_path / "allocations.bin"
    streamed = 0
    with memray.Tracker(records):
        with GGUFFile.open(vocab262k_model) as gguf:
            tokens = gguf.metadata["tokenizer.ggml.tokens"]
            assert isinstance(tokens, LazyArray)
            assert len(tokens) == 262144
            assert tokens[200000] and tokens[-1]
        with GGUFFile.open(big_model) as gguf:
            for info in gguf.tensors.values():
                for _, block in gguf.iter_rows(info.name):
                    streamed += block.nbytes
            for info in gguf.tensors.values():
                for chunk in gguf.iter_raw(info.name):
                    streamed += chunk.nbytes
    assert streamed >= 2 * (300 << 20)
    largest = _largest_allocations(records)
    assert largest[0][0] <= CHUNK_BYTES, f"allocations over 1 MiB: {largest}"
    # The bound is real, not vacuous: full 1 MiB blocks were in fact allocated.
    assert largest[0][0] > CHUNK_BYTES // 2


def test_allocation_records_catch_a_large_allocation(tmp_path: Path) -> None:
    """The check above can fail: the same recording sees a 2 MiB buffer."""
    import numpy as np

    records = tmp_path / "allocations.bin"
    with memray.Tracker(records):
        buffer = np.ones(2 << 20, dtype=np.uint8)
    assert buffer.sum() == 2 << 20
    assert _largest_allocations(records)[0][0] >= 2 << 20


@pytest.mark.cgroup
def test_inspect_and_stream_300mb_model_in_64mb_cgroup(big_model: Path) -> None:
    reason = cgroups_writable()
    if reason:
        pytest.skip(reason)
    inspect = run_limited(
        [sys.executable, "-m", "gguf_sandbox", "inspect", "--json", str(big_model)],
        SIXTY_FOUR_MB,
        timeout=120,
    )
    assert inspect.exit_code == 0, inspect.stderr
    assert not inspect.oom_kill_count
    assert len(json.loads(inspect.stdout)["tensors"]) > 10

    streamed = run_limited(
        [sys.executable, "-m", "gguf_sandbox", "workload", "stream", "--model", str(big_model)],
        SIXTY_FOUR_MB,
        timeout=300,
    )
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.oom_kill_count == 0 and not streamed.oom_killed_flag
    assert streamed.limit_bytes == SIXTY_FOUR_MB
    assert streamed.peak_bytes is not None and streamed.peak_bytes <= SIXTY_FOUR_MB
    report = json.loads(streamed.stdout.strip().splitlines()[-1])
    assert report["count"] > 10 and report["throughput"] > 0
    assert report["cgroup_limit"] == SIXTY_FOUR_MB


@pytest.mark.cgroup
def test_naive_gguf_py_load_of_300mb_model_is_killed_in_64mb_cgroup(big_model: Path) -> None:
    """The control: what our reader avoids really does die under the same limit."""
    reason = cgroups_writable()
    if reason:
        pytest.skip(reason)
    # Owned copies, as a loader handing weights to a framework makes: an F32 "dequantize" alone is a view
    # of gguf-py's memmap and would only fill the (reclaimable) page cache.
    naive = (
        "import sys, numpy as np, gguf, gguf.quants as q\n"
        "r = gguf.GGUFReader(sys.argv[1])\n"
        "weights = [np.array(q.dequantize(t.data, t.tensor_type), copy=True) for t in r.tensors]\n"
    )
    result = run_limited([sys.executable, "-c", naive, str(big_model)], SIXTY_FOUR_MB, timeout=120)
    assert result.exit_code in (137, -9)
    assert result.oom_kill_count >= 1
