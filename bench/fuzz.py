"""Standalone mutation fuzzer for the bounded GGUF reader: any exception other than GGUFError is an escape.

python bench/fuzz.py --count 100000            # seeded, reproducible; exits 1 on any escape
python bench/fuzz.py --index 4711 --save x.gguf  # rebuild one input (e.g. an escape) to debug it
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.gguf.builders` holds seeds and mutators

from gguf_sandbox.errors import GGUFError, UnsupportedTensorType
from tests.gguf.builders import Built, Mutation, apply, consume, random_mutations, seed_files

SEED_BYTE_ORDERS = {"rich-big-endian": ">"}


def make_input(seeds: dict[str, Built], base_seed: int, index: int) -> tuple[str, list[Mutation], bytes]:
    """Input number `index` of the run seeded with `base_seed`: independent of every other input."""
    rng = random.Random(f"{base_seed}:{index}")
    name = rng.choice(sorted(seeds))
    mutations = random_mutations(rng, seeds[name], SEED_BYTE_ORDERS.get(name, "<"))
    return name, mutations, apply(seeds[name].data, mutations)


def run(count: int, base_seed: int, show: int, start: int = 0) -> int:
    seeds = seed_files()
    outcomes: collections.Counter[str] = collections.Counter()
    escapes: list[str] = []
    began = time.perf_counter()
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-", dir=shm if shm.is_dir() else None) as scratch:
        path = Path(scratch) / "input.gguf"
        for index in range(start, start + count):
            name, mutations, data = make_input(seeds, base_seed, index)
            path.write_bytes(data)
            try:
                consume(path)
            except UnsupportedTensorType:
                outcomes["UnsupportedTensorType"] += 1
            except GGUFError:
                outcomes["GGUFError"] += 1
            except Exception as error:  # the property under test: nothing else may get out
                outcomes[f"escape {type(error).__name__}"] += 1
                if len(escapes) < show:
                    escapes.append(
                        f"--- escape at --index {index} (seed file {name!r}, mutations {mutations}):\n"
                        + traceback.format_exc()
                    )
            else:
                outcomes["accepted"] += 1
    elapsed = time.perf_counter() - began
    escaped = sum(n for kind, n in outcomes.items() if kind.startswith("escape"))
    print(
        f"fuzzed {count:,} inputs (seed {base_seed}, indices {start}..{start + count - 1}) "
        f"in {elapsed:.1f} s ({count / elapsed:,.0f}/s)"
    )
    print(f"  accepted               {outcomes['accepted']:>9,}")
    print(f"  GGUFError              {outcomes['GGUFError']:>9,}")
    print(f"  UnsupportedTensorType  {outcomes['UnsupportedTensorType']:>9,}  (a GGUFError subclass)")
    print(f"  escapes                {escaped:>9,}")
    for kind, n in sorted(outcomes.items()):
        if kind.startswith("escape"):
            print(f"    {kind[7:]:<21}{n:>9,}")
    for text in escapes:
        print(text, end="")
    return 1 if escaped else 0


def save_input(base_seed: int, index: int, target: Path) -> int:
    name, mutations, data = make_input(seed_files(), base_seed, index)
    target.write_bytes(data)
    print(f"input {index} (seed file {name!r}, mutations {mutations}) -> {target} ({len(data):,} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000, help="inputs to try (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the run (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first input index (default 0)")
    parser.add_argument("--show", type=int, default=5, help="escape tracebacks to print (default 5)")
    parser.add_argument("--index", type=int, help="with --save: the input index to rebuild")
    parser.add_argument("--save", type=Path, help="write input --index to this path instead of fuzzing")
    args = parser.parse_args(argv)
    if args.save is not None:
        if args.index is None:
            parser.error("--save needs --index")
        return save_input(args.seed, args.index, args.save)
    return run(args.count, args.seed, args.show, args.start)


if __name__ == "__main__":
    sys.exit(main())
