"""Control workloads the matrix must catch: what naive code does, run so that the harness sees it die.

`python -m gguf_sandbox.controls naive-load --model M`  loads M with gguf-py's GGUFReader and keeps
    every tensor dequantized to float32 in memory (what a naive loader does);
`python -m gguf_sandbox.controls alloc-bomb [--step 16m] [--max 4g]`  touches memory in steps.

Each prints one JSON report and exits 0 when it survived — under a limit meant to stop it, that exit
is the harness's failure (the cell's expect is `oom`), not the control's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from gguf_sandbox import units

PAGE = 4096


def _size(text: str) -> int:
    """argparse type for --step/--max: the units grammar (16m, 4g), at least a page."""
    try:
        return units.parse_size(text, minimum=PAGE)
    except units.UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def naive_load(args: argparse.Namespace) -> dict[str, Any]:
    """GGUFReader + dequantize every tensor into an owned float32 array, all kept alive."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(args.model)
    loaded = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        loaded[tensor.name] = np.array(values, dtype=np.float32, copy=True)
    return {
        "model": args.model,
        "plan": "naive",
        "count": len(loaded),
        "loaded_bytes": sum(int(v.nbytes) for v in loaded.values()),
    }


def alloc_bomb(args: argparse.Namespace) -> dict[str, Any]:
    """Allocate and touch `step` bytes at a time until `max` (a cap so an unlimited run ends)."""
    step, cap = int(args.step), int(args.max)
    held = []
    total = 0
    while total < cap:
        block = bytearray(step)
        block[::PAGE] = b"\x01" * len(range(0, step, PAGE))  # touch every page: no lazy zero pages
        held.append(block)
        total += step
    return {"model": None, "plan": "bomb", "count": len(held), "loaded_bytes": total}


CONTROLS: Mapping[str, Callable[[argparse.Namespace], dict[str, Any]]] = MappingProxyType(
    {"naive-load": naive_load, "alloc-bomb": alloc_bomb}
)


def build_parser() -> argparse.ArgumentParser:
    """The controls' command line (its options mirror matrix.CONTROLS; a test keeps them in sync)."""
    parser = argparse.ArgumentParser(prog="python -m gguf_sandbox.controls", description=__doc__)
    parser.add_argument("control", choices=sorted(CONTROLS))
    parser.add_argument("--model", help="GGUF file (naive-load)")
    parser.add_argument("--step", type=_size, default="16m", help="alloc-bomb step (default 16m)")
    parser.add_argument("--max", type=_size, default="4g", help="alloc-bomb cap (default 4g)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.control == "naive-load" and not args.model:
        parser.error("naive-load needs --model")
    started = time.perf_counter()
    report = CONTROLS[args.control](args)
    report.update(
        workload=args.control,
        preferred_plan=report["plan"],
        degraded=False,
        errors=0,
        duration_s=round(time.perf_counter() - started, 3),
        peak_rss=_peak_rss(),
    )
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
