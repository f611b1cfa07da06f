"""Live comparison with llama.cpp: random strings tokenized by ours and by llama-cpp-python, mismatches."

    python tests/tokenizers/compare_llama.py --count 10000 --llama-python /work/venvs/llama/bin/python

llama-cpp-python runs in its own environment (see make_reference.py) as a worker process per model;
the strings (tests/tokenizers/sentences.random_text, fixed --seed) mix scripts, whitespace, punctuation,
special-token lookalikes and random bytes decoded with replacement. Exit status 1 when any id differs.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when run as a script

from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import from_gguf
from tests.models import GEMMA3, SMOLLM2, PackagedGGUF, packaged_gguf
from tests.tokenizers.sentences import random_text

WORKER = Path(__file__).parent / "make_reference.py"
DEFAULT_LLAMA_PYTHON = Path("/work/venvs/llama/bin/python")
MODELS: dict[str, PackagedGGUF] = {"smollm2": SMOLLM2, "gemma3": GEMMA3}


def compare(name: str, path: Path, texts: list[str], llama_python: Path, show: int) -> int:
    worker = subprocess.Popen(
        [str(llama_python), str(WORKER), "--worker", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    if worker.stdin is None or worker.stdout is None:
        raise SystemExit("could not start the llama-cpp-python worker")
    mismatches = 0
    ours_seconds = 0.0
    with GGUFFile.open(path) as gguf:
        tokenizer = from_gguf(gguf)
        for index, text in enumerate(texts):
            add_special = index % 2 == 0
            worker.stdin.write(json.dumps({"text": text, "add_special": add_special}) + "\n")
            worker.stdin.flush()
            theirs = json.loads(worker.stdout.readline())["ids"]
            started = time.perf_counter()
            ours = tokenizer.encode(text, add_special=add_special)
            ours_seconds += time.perf_counter() - started
            if ours != theirs:
                mismatches += 1
                if mismatches <= show:
                    print(f"  {name} #{index} {text!r}\n    ours   {ours}\n    llama  {theirs}")
    worker.stdin.close()
    worker.wait(timeout=60)
    print(f"{name}: {len(texts)} strings, {mismatches} mismatches (ours {ours_seconds:.1f} s in all)")
    return mismatches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON)
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="default: all")
    parser.add_argument("--show", type=int, default=10, help="print the first N mismatches per model")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    texts = [random_text(rng) for _ in range(args.count)]
    total = 0
    for name in args.model or sorted(MODELS):
        path = packaged_gguf(MODELS[name])
        if isinstance(path, str):
            raise SystemExit(path)
        total += compare(name, path, texts, args.llama_python, args.show)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
