"""Products of activation rows by weight matrices, x @ W.T (+ bias) (+ residual) (then GELU), cut into tasks
for the compute pool: by chunk and output-column span, or by decoded piece of a quantized matrix."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import numpy as np

from gguf_sandbox.embed.rows import F32, FLOAT_BYTES, Ids, Rows
from gguf_sandbox.embed.threads import SCRATCH_BYTES, SERIAL, Task, current_pool, spans, thread_scratch

# What a product applies to its output in place once computed (GELU): inside each task on one thread, per
# chunk after the product's tasks on several.
Epilogue: TypeAlias = Callable[[F32], object]
# Decodes one piece of a quantized matrix, into the flat float32 scratch it is given when its type allows.
Decoder: TypeAlias = Callable[[F32 | None], F32]
# A piece of a stored weight block: (first output row, rows, its decoder).
Part: TypeAlias = tuple[int, int, Decoder]
# Output columns of a product are split across threads at multiples of this (a 64-byte line of floats).
COLUMN_ALIGN: Final = 16
# A product task smaller than this many multiply-adds (~80 µs of single-threaded BLAS here) gains less from
# another thread than handing it over costs: waking an idle helper takes 35-90 µs on this VM. One ~26-token
# text, resident-f32, 2 threads, `after` as below: 11.1 ms with 2M, 10.9 with this, 12.0 with 8M (whose
# 1536-wide products stay whole), 12.4 on 1 thread (issue #15's notes, defer_probe).
MIN_TASK_MACS: Final = 1 << 22
# A row-major weight block multiplies at most this many activation rows as block @ x.T, transposed into y
# afterwards: BLAS then vectorizes along the block's rows rather than a few tokens. Six MiniLM layers of
# row-major float32, 25 rows: 13.9 ms as x @ W.T, 11.9 ms so (8 rows: 10.2 and 7.7); at 147 rows it is
# slower (probe_tn in issue #15's notes).
FEW_ROWS: Final = 64
# Tasks a product aims for per thread: a batch's ~5 chunks as 5 tasks kept one of 2 threads idle a fifth of
# the time; cut into 10 (and chunks of unequal size spread over more tasks) the threads end together.
TASKS_PER_THREAD: Final = 4


class Weights(Protocol):
    """Where a forward pass gets its weights, by GGUF tensor name; every plan in weights.py implements it."""

    def vector(self, name: str) -> F32:
        """A 1-D tensor (bias, norm) as float32 [n]."""
        ...

    def rows(self, name: str, ids: Ids) -> F32:
        """Rows `ids` of an embedding table as float32 [len(ids), row_len]."""
        ...

    def blocks(self, name: str) -> Iterable[tuple[int, F32]]:
        """A 2-D weight [out, in] as (first_row, float32 [rows, in]) blocks in row order.

        Blocks decoded for the call stay within the cap; weights held resident may come as one block.
        """
        ...


class Kernel(Protocol):
    """Matrices multiplied by a kernel of their own (ort_kernel's Int8Matrix and PackedMatrix), on threads of
    its own."""

    def applies(self, after: Epilogue | None) -> bool:
        """Whether multiply() applies `after` itself."""
        ...

    def multiply(self, x: F32, *, after: Epilogue | None = None) -> F32:
        """x @ W.T (+ the bias it holds), then `after` if it applies it, for x [rows, in], as a new
        [rows, out] array."""
        ...


@dataclass(frozen=True)
class KernelSlice:
    """A matrix in a kernel that may hold others beside it (a layer's Q, K and V): its output columns, and
    whether the kernel adds its bias."""

    kernel: Kernel
    columns: slice
    biased: bool


def multiply(x: F32, block: F32, out: F32, spare: F32) -> F32:
    """out = x @ block.T, for x [rows, in] and block [count, in]; `spare` is flat scratch no argument uses.

    A row-major block times at most FEW_ROWS rows is multiplied as block @ x.T into `spare`, when it has
    room, and transposed into out.
    """
    rows, count = x.shape[0], block.shape[0]
    if rows > FEW_ROWS or not block.flags.c_contiguous or rows * count > spare.size:
        return np.matmul(x, block.T, out=out)  # [rows, count]
    transposed = spare[: count * rows].reshape(count, rows)  # [count, rows]
    np.matmul(block, x.T, out=transposed)
    np.copyto(out, transposed.T)
    return out


def _product(
    x: F32,
    block: F32,
    y: F32,
    columns: slice,
    *,
    bias: F32 | None,
    residual: F32 | None,
    after: Epilogue | None,
) -> None:
    """y[:, columns] = after(x @ block.T (+ bias) (+ residual)): one task, every step on the same columns."""
    out = y[:, columns]  # [rows, span]
    multiply(x, block, out, thread_scratch())  # [rows, span]
    _epilogue(out, columns, bias, residual, after)


def _decoded_product(xs: Rows, ys: Rows, part: Part) -> None:
    """One piece of a quantized matrix decoded into this thread's scratch, then multiplied for every chunk."""
    first, count, decode = part
    scratch = thread_scratch()
    size = count * xs[0].shape[1]  # floats of the decoded piece
    fits = size * FLOAT_BYTES <= SCRATCH_BYTES
    block = decode(scratch if fits else None)  # [count, in]
    spare = scratch[size:] if fits else scratch  # what the piece leaves of the scratch
    for x, y in zip(xs, ys, strict=True):
        multiply(x, block, y[:, first : first + count], spare)  # [rows, count]


def _kernel_products(
    kernel: Kernel, x: F32, outputs: Sequence[tuple[KernelSlice, F32]], *, after: Epilogue | None = None
) -> None:
    """One chunk through a kernel once (with `after`, which it applies), its columns for each matrix into
    that matrix's output y [rows, out]."""
    product = kernel.multiply(x, after=after)  # [rows, kernel's out]
    for held, y in outputs:
        np.copyto(y, product[:, held.columns])  # [rows, out]


def _bias_left(held: KernelSlice, weights: Weights, name: str, bias: bool) -> F32 | None:
    """The bias a kernel's product still needs: the matrix's own where the kernel does not hold it, or the
    held one taken off where the caller asked for none (no model's pass does that; it stays exact)."""
    if bias == held.biased:
        return None
    vector = weights.vector(f"{name}.bias")  # [out]
    return vector if bias else -vector


def _epilogue(
    out: F32, columns: slice, bias: F32 | None, residual: F32 | None, after: Epilogue | None
) -> None:
    """Bias, residual and `after` on columns of one chunk's product, in place."""
    if bias is not None:
        out += bias[columns]  # [rows, span]
    if residual is not None:
        out += residual[:, columns]  # [rows, span]
    if after is not None:
        after(out)  # [rows, span]


def column_parts(xs: Rows, columns: int, threads: int) -> int:
    """Output-column spans per chunk for the products of `xs` by a block of `columns` output rows: about
    TASKS_PER_THREAD tasks per thread in all, none below MIN_TASK_MACS (so at least one per chunk)."""
    if threads == 1:
        return 1
    wanted = -(-TASKS_PER_THREAD * threads // len(xs))
    macs_per_chunk = sum(int(x.shape[0]) for x in xs) * int(xs[0].shape[1]) * columns // len(xs)
    return max(1, min(wanted, macs_per_chunk // MIN_TASK_MACS))


@dataclass(frozen=True)
class _LinearWork:
    """A product's tasks: `runs` (one list per weight block, produced as the blocks are read) and then
    `epilogues`, per chunk, for what the runs do not apply themselves (quantized matrices: bias, residual and
    `after`; float32 ones on several threads: `after`)."""

    runs: Iterator[list[Task]]
    epilogues: list[Task]
    # A kernel runs on threads of its own: its runs go one after the other on the caller's.
    on_caller: bool = False


def _linear_work(
    xs: Rows,
    ys: Rows,
    weights: Weights,
    name: str,
    *,
    bias: bool,
    residual: Rows | None,
    after: Epilogue | None,
) -> _LinearWork:
    """The tasks of ys = after(xs @ W.T (+ b) (+ residual)) for the current pool."""
    threads = current_pool().threads
    b = weights.vector(f"{name}.bias") if bias else None  # [out]
    residuals: Sequence[F32 | None] = residual if residual is not None else [None] * len(xs)
    held = _kernel(weights, name)
    if held is not None:
        # The kernel's products run one after the other on the caller (the kernel has threads of its own);
        # what it does not apply itself runs per chunk on the pool, as after float32 products. It applies
        # `after` only where nothing comes between: after(x @ W.T + b + residual) is the contract.
        added = _bias_left(held, weights, name, bias)
        inside = residual is None and added is None and held.kernel.applies(after)
        products: list[Task] = [
            functools.partial(_kernel_products, held.kernel, x, [(held, y)], after=after if inside else None)
            for x, y in zip(xs, ys, strict=True)
        ]
        rest = None if inside else after
        every = slice(0, ys[0].shape[1])
        epilogues: list[Task] = (
            []
            if added is None and residual is None and rest is None
            else [
                functools.partial(_epilogue, y, every, added, r, rest)
                for y, r in zip(ys, residuals, strict=True)
            ]
        )
        return _LinearWork(iter([products]), epilogues, on_caller=True)
    stored = getattr(weights, "parts", None)
    pieces = stored(f"{name}.weight") if stored is not None else None
    if pieces is not None:
        # A quantized matrix: each task decodes a piece of a stored block and multiplies every chunk by it;
        # then one task per chunk applies bias, residual and `after` to all its columns (per piece, those
        # ~16 numpy calls would cost more than the product for a short text).
        every = slice(0, ys[0].shape[1])
        runs: Iterator[list[Task]] = (
            [functools.partial(_decoded_product, xs, ys, part) for part in parts] for parts in pieces
        )
        if b is None and residual is None and after is None:
            return _LinearWork(runs, [])
        epilogues = [
            functools.partial(_epilogue, y, every, b, r, after) for y, r in zip(ys, residuals, strict=True)
        ]
        return _LinearWork(runs, epilogues)

    # On one thread `after` runs inside each task, on columns still in cache. On several, it runs once per
    # chunk after every block: GELU is ~20 numpy calls per slice, and two threads making short ones at once
    # hand the GIL to each other at every call, each handover a thread wake (35-90 µs here); per chunk, a
    # text within one chunk runs it on the calling thread, and several chunks share the threads in whole-
    # chunk slices. One text on 2 threads, 68 to 256 tokens: 1-8% faster so (issue #15's notes, defer_len).
    # Batches on resident-f32 run as one-thread sub-batches (engine.py), so theirs stays in the tasks.
    in_task = after if threads == 1 else None
    finals: list[Task] = (
        [] if in_task is not None or after is None else [functools.partial(after, y) for y in ys]
    )

    def block_tasks(first: int, block: F32) -> list[Task]:  # block [block_rows, in]
        parts = column_parts(xs, block.shape[0], threads)
        return [
            functools.partial(
                _product, x, block[lo:hi], y, slice(first + lo, first + hi), bias=b, residual=r, after=in_task
            )
            for x, y, r in zip(xs, ys, residuals, strict=True)
            for lo, hi in spans(block.shape[0], parts, COLUMN_ALIGN)
        ]

    return _LinearWork(
        (block_tasks(first, block) for first, block in weights.blocks(f"{name}.weight")), finals
    )


def _kernel(weights: Weights, name: str) -> KernelSlice | None:
    """Where a kernel of its own holds the matrix, if the plan has one (weights.kernel: resident-int8,
    resident-f32 packed)."""
    kernel = getattr(weights, "kernel", None)
    found: KernelSlice | None = kernel(f"{name}.weight") if kernel is not None else None
    return found


def linear(
    xs: Rows,
    weights: Weights,
    name: str,
    out_dim: int,
    *,
    bias: bool = True,
    residual: Rows | None = None,
    after: Epilogue | None = None,
    out: Rows | None = None,
) -> Rows:
    """x @ W.T (+ b) (+ residual), then `after` in place, per chunk, into `out` (new arrays when None).

    W [out, in] comes block by block, each used for every chunk, then dropped. Each block's products are
    split into tasks by chunk and, when chunks are too few to keep the pool's threads busy, by output-column
    spans too (column_parts). For float32 matrices bias and residual run inside each task, on columns that
    are still in cache, and so does `after` (an elementwise function: GELU) on one thread; on several it
    runs per chunk once the chunk's columns are all done. A quantized matrix's tasks each decode a piece,
    and bias, residual and `after` run per chunk afterwards. A matrix with a kernel of its own (resident-
    int8, resident-f32 packed) is multiplied chunk by chunk on the caller's thread, the kernel using its
    own threads.
    """
    ys = out if out is not None else [np.empty((x.shape[0], out_dim), dtype=np.float32) for x in xs]
    work = _linear_work(xs, ys, weights, name, bias=bias, residual=residual, after=after)
    pool = current_pool()
    for tasks in work.runs:
        (SERIAL if work.on_caller else pool).run(tasks)
    pool.run(work.epilogues)
    return ys


def _one_kernel(
    xs: Rows,
    weights: Weights,
    outputs: Sequence[tuple[str, Rows]],
    kernels: Sequence[KernelSlice],
    *,
    bias: bool,
) -> None:
    """Products that one kernel holds side by side (Q, K and V in onnxruntime's kernels): one multiply per
    chunk, on the caller, then the biases the kernel did not add, per chunk on the pool."""
    for index, x in enumerate(xs):
        _kernel_products(
            kernels[0].kernel, x, [(held, ys[index]) for held, (_, ys) in zip(kernels, outputs, strict=True)]
        )
    left = [
        (ys, added)
        for held, (name, ys) in zip(kernels, outputs, strict=True)
        if (added := _bias_left(held, weights, name, bias)) is not None
    ]
    every = slice(0, None)
    current_pool().run([functools.partial(_epilogue, y, every, b, None, None) for ys, b in left for y in ys])


def linears(xs: Rows, weights: Weights, outputs: Sequence[tuple[str, Rows]], *, bias: bool = True) -> None:
    """Several products of the same input (Q, K and V), with their biases if `bias`, each into its output
    rows.

    When every matrix is held in memory (weights.held: the resident plans), all their tasks go to the pool
    at once: a 25-token text's three 384-wide products are each too small to share between threads, but
    together keep two busy. Streamed matrices are read one after the other (linear() each), so no more
    than one block is held at a time. Matrices one kernel holds side by side (a layer's Q, K and V in
    onnxruntime's kernels) are multiplied together, once per chunk, on the caller's thread and the
    kernel's own.
    """
    kernels = [held for name, _ in outputs if (held := _kernel(weights, name)) is not None]
    shared = {id(held.kernel) for held in kernels}
    if len(shared) == 1 and len(kernels) == len(outputs):
        _one_kernel(xs, weights, outputs, kernels, bias=bias)
        return
    held = getattr(weights, "held", None)
    if shared or held is None or not all(held(f"{name}.weight") for name, _ in outputs):
        for name, ys in outputs:
            linear(xs, weights, name, ys[0].shape[1], bias=bias, out=ys)
        return
    works = [
        _linear_work(xs, ys, weights, name, bias=bias, residual=None, after=None) for name, ys in outputs
    ]
    pool = current_pool()
    pool.run([task for work in works for tasks in work.runs for task in tasks])
    pool.run([task for work in works for task in work.epilogues])
