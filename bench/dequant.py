"""Benchmark: our chunked dequantization against gguf-py's numpy kernels, in MB/s of float32 output."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from numpy.typing import NDArray

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_sandbox.gguf.dequant import SUPPORTED_TYPES, dequantize

# Byte offsets of the fp16 scale fields of each block; random bytes there would give inf/nan scales.
F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    GGMLQuantizationType.Q8_0: (0,),
    GGMLQuantizationType.Q4_0: (0,),
    GGMLQuantizationType.Q4_1: (0, 2),
    GGMLQuantizationType.Q5_0: (0,),
    GGMLQuantizationType.Q5_1: (0, 2),
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}

CHUNK_BYTES = 1 << 20  # the reader's cap on one float32 output chunk
ROW_ELEMENTS = 4096  # gguf-py sees the whole tensor as rows of this length, as GGUFReader would give it
MB = 1e6


@dataclass(frozen=True)
class DequantRow:
    """Throughput of one type: ours chunked as the reader does vs gguf-py whole-tensor and chunked."""

    type_name: str
    ours_mb_s: float
    gguf_mb_s: float
    ratio: float
    gguf_chunk_mb_s: float
    chunk_ratio: float


def random_tensor(qtype: GGMLQuantizationType, n_elements: int, seed: int = 0) -> NDArray[np.uint8]:
    """Raw bytes of a random tensor of `qtype` with finite, normal-range fp16 scales (or values)."""
    rng = np.random.default_rng(seed)
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // elements
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal(n_elements, dtype=np.float32).view(np.uint8)
    if qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        values = rng.standard_normal(n_elements, dtype=np.float32)
        if qtype == GGMLQuantizationType.F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks, dtype=np.float32) * 0.01).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def _chunks(raw: NDArray[np.uint8], qtype: GGMLQuantizationType) -> list[NDArray[np.uint8]]:
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    step = (CHUNK_BYTES // 4 // elements) * nbytes
    return [raw[start : start + step] for start in range(0, raw.size, step)]


def _best_seconds(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each run; runs alternate within a repeat so all see the same machine load."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def _gguf_owned(raw: NDArray[np.uint8], qtype: GGMLQuantizationType) -> NDArray[np.float32]:
    # gguf-py returns F32 data as a view of its input without reading it; copy so it does the same work.
    result = gguf_dequantize(raw, qtype)
    return np.array(result, dtype=np.float32) if np.shares_memory(result, raw) else result


def measure(
    types: Iterable[GGMLQuantizationType] = tuple(sorted(SUPPORTED_TYPES)),
    n_elements: int = 16 * 2**20,
    repeats: int = 5,
) -> list[DequantRow]:
    """Throughput of every type on a random tensor of `n_elements` (best of `repeats` runs).

    Ours runs over the tensor in chunks of at most 1 MiB of float32 output, as the reader calls it;
    gguf-py runs on the whole tensor shaped (rows, 4096 elements) and, separately, on the same chunks.
    """
    rows = []
    for qtype in types:
        raw = random_tensor(qtype, n_elements)
        chunks = _chunks(raw, qtype)
        rows_2d = raw.reshape(-1, ROW_ELEMENTS // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
        out_mb = n_elements * 4 / MB

        def ours(chunks: Sequence[NDArray[np.uint8]] = chunks, qtype: GGMLQuantizationType = qtype) -> None:
            for chunk in chunks:
                dequantize(chunk, qtype)

        def theirs_chunked(
            chunks: Sequence[NDArray[np.uint8]] = chunks, qtype: GGMLQuantizationType = qtype
        ) -> None:
            for chunk in chunks:
                _gguf_owned(chunk, qtype)

        def theirs_whole(raw: NDArray[np.uint8] = rows_2d, qtype: GGMLQuantizationType = qtype) -> None:
            _gguf_owned(raw, qtype)

        with np.errstate(all="ignore"):
            ours_s, whole_s, chunked_s = _best_seconds((ours, theirs_whole, theirs_chunked), repeats)
        rows.append(
            DequantRow(
                type_name=qtype.name,
                ours_mb_s=out_mb / ours_s,
                gguf_mb_s=out_mb / whole_s,
                ratio=whole_s / ours_s,
                gguf_chunk_mb_s=out_mb / chunked_s,
                chunk_ratio=chunked_s / ours_s,
            )
        )
    return rows


def format_table(rows: Sequence[DequantRow]) -> str:
    header = (
        f"{'type':<6} {'ours MB/s':>10} {'gguf-py MB/s':>13} {'ratio':>6} "
        f"{'gguf-py chunked':>16} {'ratio':>6}"
    )
    lines = [header, "-" * len(header)]
    lines += [
        f"{row.type_name:<6} {row.ours_mb_s:>10,.0f} {row.gguf_mb_s:>13,.0f} {row.ratio:>6.2f} "
        f"{row.gguf_chunk_mb_s:>16,.0f} {row.chunk_ratio:>6.2f}"
        for row in rows
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("types", nargs="*", help="GGML type names (default: every supported type)")
    parser.add_argument("--elements", type=int, default=16 * 2**20, help="tensor size in elements")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best counts")
    args = parser.parse_args(argv)
    if args.elements <= 0 or args.elements % ROW_ELEMENTS:
        parser.error(f"--elements must be a positive multiple of {ROW_ELEMENTS}")
    names = args.types or [t.name for t in sorted(SUPPORTED_TYPES)]
    rows = measure([GGMLQuantizationType[name] for name in names], args.elements, args.repeats)
    print("dequantize: ours in <= 1 MiB float32 chunks vs gguf-py on the whole tensor and chunked")
    print(format_table(rows))
    print(f"min ratio whole {min(r.ratio for r in rows):.2f}, chunked {min(r.chunk_ratio for r in rows):.2f}")


if __name__ == "__main__":
    main()
