"""Control workloads the matrix must catch: what naive code does, run so that the harness sees it die.

`python -m gguf_sandbox.controls naive-load --model M`  reads M into memory and keeps every tensor
    dequantized to float32 (what a naive loader does; gguf-py's GGUFReader gives the layout);
`python -m gguf_sandbox.controls alloc-bomb [--step 16m] [--max 4g]`  touches memory in steps;
`python -m gguf_sandbox.controls refusing-engine`  refuses like a budget would, at every limit;
`python -m gguf_sandbox.controls perturbed-engine --model M [--count N]`  embeds like the embed workload,
    but under a limit below 1 GiB its vectors are nudged (a plan bug that only shows when constrained).

Each imitates a failure the matrix must catch: naive-load and alloc-bomb must end `oom`, refusing-engine
`refused` (which the strict expectations reject at and above a floor), perturbed-engine `wrong` (its
unconstrained reference run is not perturbed). A survivor prints one JSON report and exits 0 — under a
limit meant to stop it, that exit is the harness's failure (the cell's expect), not the control's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gguf_sandbox import budget, units
from gguf_sandbox.errors import GGUFError, GGUFSandboxError

if TYPE_CHECKING:  # numpy is imported by the controls that use it, not by the others
    import numpy as np
    from numpy.typing import NDArray

PAGE = 4096
# argparse type for --step/--max: the units grammar (16m, 4g), at least a page.
_size = units.size_arg(minimum=PAGE)


def naive_load(args: argparse.Namespace) -> dict[str, Any]:
    """The naive loader's report: how many tensors it holds as float32, and their bytes."""
    loaded = load_naively(args.model)
    return {
        "model": args.model,
        "plan": "naive",
        "count": len(loaded),
        "loaded_bytes": sum(int(v.nbytes) for v in loaded.values()),
    }


def load_naively(model: str) -> dict[str, NDArray[np.float32]]:
    """Read the whole file into a buffer, then keep every tensor dequantized to float32, all alive.

    The data is read into one zero-filled buffer of the file's size, as a loader that materializes
    the model does; gguf-py's GGUFReader gives the layout. The zero fill grows the cell's anonymous
    memory before the first byte is read, so where the model cannot fit the kernel OOM-kills at once.
    Copying from GGUFReader's memory map (or read() into a fresh buffer) grew it while reading
    instead: near the limit the kernel kept evicting and re-reading the page cache the copy came from
    (and the interpreter's code pages) for minutes before the OOM kill, so the same cell ended `oom`
    in 2 s or thrashed to its timeout depending on what the page cache held.
    """
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from gguf_sandbox.gguf.reader import GGUFFile

    # Our bounded reader checks the file first: gguf-py ends a missing, empty, truncated or foreign file
    # (or a directory) in a traceback, where a control must give one line like every workload.
    with GGUFFile.open(model) as checked:
        size = checked.file_size
    contents = bytearray(size)
    with open(model, "rb") as file:
        if file.readinto(contents) != size:
            raise GGUFError(f"{model} changed size while it was read")
    # After the read: GGUFReader's field objects alone take ~60 MB on a 30k vocabulary, and a cell
    # that thrashes there (64m) never reaches the load this control exists to show.
    reader = GGUFReader(model)
    loaded = {}
    for tensor in reader.tensors:
        stored = np.frombuffer(
            contents, dtype=tensor.data.dtype, count=tensor.data.size, offset=int(tensor.data_offset)
        ).reshape(tensor.data.shape)
        # float32 tensors stay views of `contents` (already what a naive loader holds); others are decoded.
        loaded[tensor.name] = np.asarray(dequantize(stored, tensor.tensor_type), dtype=np.float32)
    return loaded


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


REFUSED_EXIT_CODE = 3
# Below this detected limit perturbed-engine nudges its vectors; the reference runs unconstrained (2 GiB).
PERTURB_BELOW = 1 << 30
PERTURBATION = 0.05


class ControlRefusal(Exception):
    """A control that refuses, as the engine's budget would (exit 3 with a JSON error)."""


def refusing_engine(args: argparse.Namespace) -> dict[str, Any]:
    """An engine whose budget refuses everything: the matrix must not call that a success."""
    raise ControlRefusal("embedding plan streaming: needs 8,773,632 bytes, only 0 available (control)")


def perturbed_engine(args: argparse.Namespace) -> dict[str, Any]:
    """The embed workload on an engine whose vectors go wrong when memory is constrained."""
    from pathlib import Path

    import numpy as np

    from gguf_sandbox.embed.engine import Embedder
    from gguf_sandbox.workloads.embed import embed

    constrained = budget.detect_limit().limit_bytes < PERTURB_BELOW

    class Perturbed:
        def __init__(self, embedder: Embedder) -> None:
            self._embedder = embedder
            self.plan, self.preferred_plan = embedder.plan, embedder.preferred_plan
            self.degraded, self.pooling = embedder.degraded, embedder.pooling

        def embed(self, texts: Sequence[str]) -> Any:
            vectors = self._embedder.embed(texts)
            if constrained:
                vectors[:, 0] += PERTURBATION
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            return vectors

        def __enter__(self) -> Perturbed:
            return self

        def __exit__(self, *exc: object) -> None:
            self._embedder.close()

    def opener(model: Path, options: argparse.Namespace) -> Perturbed:
        return Perturbed(Embedder.open(model, plan=options.plan, batch_size=options.batch))

    options = argparse.Namespace(count=args.count, batch=1, threads=1, plan="auto", pooling=None)
    report: dict[str, Any] = embed(Path(args.model), options, opener).as_json()
    report["perturbed"] = constrained
    return report


CONTROLS: Mapping[str, Callable[[argparse.Namespace], dict[str, Any]]] = MappingProxyType(
    {
        "naive-load": naive_load,
        "alloc-bomb": alloc_bomb,
        "refusing-engine": refusing_engine,
        "perturbed-engine": perturbed_engine,
    }
)
# The controls that read a model.
NEEDS_MODEL = frozenset({"naive-load", "perturbed-engine"})


def build_parser() -> argparse.ArgumentParser:
    """The controls' command line (its options mirror matrix.CONTROLS; a test keeps them in sync)."""
    parser = argparse.ArgumentParser(prog="python -m gguf_sandbox.controls", description=__doc__)
    parser.add_argument("control", choices=sorted(CONTROLS))
    parser.add_argument("--model", help="GGUF file (naive-load)")
    parser.add_argument("--step", type=_size, default="16m", help="alloc-bomb step (default 16m)")
    parser.add_argument("--max", type=_size, default="4g", help="alloc-bomb cap (default 4g)")
    parser.add_argument("--count", type=int, default=100, help="perturbed-engine embeddings (default 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.control in NEEDS_MODEL and not args.model:
        parser.error(f"{args.control} needs --model")
    started = time.perf_counter()
    try:
        report = CONTROLS[args.control](args)
    except ControlRefusal as refusal:
        print(json.dumps({"error": str(refusal), "kind": "BudgetExceeded"}), flush=True)
        return REFUSED_EXIT_CODE
    except GGUFSandboxError as error:
        from gguf_sandbox.workloads.report import EXIT_BAD_INPUT

        print(json.dumps({"error": str(error), "kind": type(error).__name__}), flush=True)
        return EXIT_BAD_INPUT
    report.setdefault("preferred_plan", report["plan"])
    report.setdefault("degraded", False)
    report.setdefault("errors", 0)
    report.update(
        workload=args.control,
        duration_s=round(time.perf_counter() - started, 3),
        peak_rss=budget.peak_rss(),
    )
    print(json.dumps(report), flush=True)
    return 0
