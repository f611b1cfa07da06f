"""bench/embed.py's driver: its --threads counts and the table's scaling column (no engine is run)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def _script(name: str) -> ModuleType:
    """bench/<name>.py loaded from its path: bench/ is a directory of scripts, not a package (mypy and the
    scripts' own sibling imports see each as a top-level module)."""
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bench_embed = _script("embed")


@pytest.mark.parametrize("counts", [None, [1], [2], [1, 2]])
def test_thread_counts_that_run(counts: list[int] | None) -> None:
    assert bench_embed.thread_counts_error(counts) is None


@pytest.mark.parametrize("given", [["1", "1"], ["0"], ["-1"], ["2", "0"]])
def test_bad_thread_counts_are_one_line_before_any_work(
    given: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # No --model: any work would first convert MiniLM; the error must come before that.
    with pytest.raises(SystemExit) as stopped:
        bench_embed.main(["--threads", *given, "--hf-dir", "/nonexistent"])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f": error: --threads takes distinct counts of 1 or more, got {' '.join(given)}")


def test_a_later_count_gets_each_engines_batch_rate_against_its_own_at_the_first() -> None:
    fewest = [bench_embed.Row("resident-f32", 1, batch32_per_s=170.0), bench_embed.Row("llama.cpp", 1)]
    rows = [
        bench_embed.Row("resident-f32", 2, batch32_per_s=289.0),
        bench_embed.Row("llama.cpp", 2, batch32_per_s=80.0),  # no rate at 1 thread: no ratio
    ]
    header, _, ours, llama = bench_embed.format_table(rows, fewest).splitlines()
    end = header.index("batch/1t") + len("batch/1t")  # the column is right-aligned under its title

    def scaling(line: str) -> str:
        return line[end - 9 : end].strip()

    assert scaling(ours) == "1.70x"
    assert scaling(llama) == ""
    assert "batch/1t" not in bench_embed.format_table(fewest).splitlines()[0]


@pytest.mark.parametrize(("given", "settled"), [(None, [0]), ([1, 2], [1, 2])])
def test_a_bert_run_settles_its_thread_counts(
    minilm_gguf: Callable[[str], Path], given: list[int] | None, settled: list[int]
) -> None:
    """Not given, every engine keeps its own default (0), and that is no error."""
    args = argparse.Namespace(
        model=minilm_gguf("q8_0"), bisect=False, singles=None, batches=None, threads=given, pooling=None
    )
    bench_embed._settle(args, argparse.ArgumentParser())
    assert (args.family, args.threads) == ("bert", settled)
