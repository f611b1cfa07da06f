"""Matrices held by onnxruntime's kernels, which multiply them on threads of their own.

- Int8Matrix (resident-int8): Q8_0 in MatMulNBits (8 bits, blocks of 32), kept as Q8_0 stores it (quants
  offset to unsigned, one scale per 32 of a row). At accuracy level 4 it quantizes each 32 of an activation
  row to int8 too, as llama.cpp does for Q8_0: the products are integer dot products (AVX512-VNNI / AVX2)
  over a quarter of float32's bytes. Six MiniLM layers at 26 tokens, 1 thread: 4.7 ms against numpy's
  float32 13.3 ms; 2 threads 2.9 ms (issue #15, ort_probe). The price is llama.cpp's: activations rounded
  to 8 bits, a product ~0.6% off at worst.
- PackedMatrix (a decoder's resident-f32 where the libraries are installed; a BERT's is held whole by
  ort_bert.FusedBert): float32 in a Gemm, which packs the matrix into its GEMM's layout once, when the
  session is made. numpy's BLAS packs the weights again on every product, a copy of each matrix per call:
  MiniLM's 24 products at 21 rows take 5.2 ms so against 8.6 (issue #15's notes, ort_f32). The products
  are float32 throughout: the vectors are resident-f32's within float rounding.

Only the `fast` extra installs onnxruntime and onnx; available() says whether they are installed without
importing them (~36 MiB of RSS), importable() whether they load.
"""

from __future__ import annotations

import importlib.util
import mmap
import resource
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np

from gguf_sandbox.budget import release_free_heap
from gguf_sandbox.embed.gelu import gelu
from gguf_sandbox.embed.linear import Epilogue
from gguf_sandbox.embed.q8_block import Q8_BLOCK, Q8_BLOCK_BYTES
from gguf_sandbox.embed.rows import F32, FLOAT_BYTES
from gguf_sandbox.errors import GGUFError, KernelRefused

KERNEL_MODULES: Final = ("onnxruntime", "onnx")
# MatMulNBits' unsigned quants are centred on 2**(bits - 1): Q8_0's int8 quants plus this.
_ZERO_POINT: Final = 128
# Accuracy level 4: int8 activations, the integer kernel; levels 0-3 dequantize to float every call
# (~20 ms for the six MiniLM layers above, slower than numpy).
_INT8_ACTIVATIONS: Final = 4
# A packed session's own pool: one worker beside the caller. A product for a text is too small to share
# among more (waking a worker costs 35-90 µs here), batches run as a sub-batch per thread (engine.py), and
# a pool per matrix of threads - 1 workers each would be ~360 threads at 16 CPUs for MiniLM alone.
PACKED_SESSION_THREADS: Final = 2
# The oldest onnxruntime the extra allows (1.23, the last for Python 3.10) reads models up to IR version 11.
IR_VERSION: Final = 10


def available() -> bool:
    """Whether the kernel's libraries are installed (the `fast` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in KERNEL_MODULES)


def library(name: str) -> Any:
    """A module of the kernel's libraries, imported when first needed; an install that is present but cannot
    be imported (a missing shared library, a build for another numpy) is one GGUFError, not a traceback."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # ImportError, or whatever a broken build raises while it loads
        package = name.partition(".")[0]
        raise GGUFError(
            f"plan resident-int8 cannot import {package} ({failure_words(error)}); reinstall it with "
            f"pip install --force-reinstall 'gguf-sandbox[fast]', or use --plan auto"
        ) from None


def packable() -> bool:
    """Whether resident-f32 may hold its matrices packed in this process: the libraries are installed, and
    no address-space limit is set. A session's worker maps a 64 MiB malloc arena and a stack, which such
    a limit runs out of long before memory, and which stay mapped after the worker ends: numpy's plan
    after a refused packing could then fail too (OpenBLAS aborts the process)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return available() and soft == resource.RLIM_INFINITY


def imported() -> bool:
    """Whether any of the kernel's libraries is loaded in this process (its RSS stays)."""
    return any(name in sys.modules for name in KERNEL_MODULES)


def importable() -> bool:
    """Whether the kernel's libraries are installed and load (which imports them). resident-f32 asks
    before it holds its matrices packed, and multiplies with numpy where they do not: only resident-int8,
    asked for by name, reports a broken install (library()'s words)."""
    try:
        for name in KERNEL_MODULES:
            library(name)
    except GGUFError:
        return False
    return True


class _ProcessPool:
    """onnxruntime's process-wide pool, once share_process_pool() made it: it cannot be remade, and from
    then on every session in the process must use it."""

    def __init__(self) -> None:
        self.threads: int | None = None
        self.lock = threading.Lock()


_PROCESS_POOL: Final = _ProcessPool()


def share_process_pool(threads: int) -> None:
    """Have every kernel matrix (Int8Matrix, PackedMatrix) made from now on in this process multiply on one
    pool of `threads` threads, onnxruntime's process-wide one, instead of a pool per matrix.

    A pass runs its products one after the other, each in its own session: with a pool per session, each
    product wakes a different sleeping worker (35-90 µs a wake on this VM), and a short product is done
    before the worker helps. One shared pool's worker spins between products (~40 ms of CPU after the last,
    then it sleeps): one ~21-token MiniLM text on 2 threads takes 4.6-5.6 ms instead of 5.6-6.7 (bench/
    embed.py, two runs). Batches lose some: 32 texts on 2 threads 257-280 texts/s against 289-315, the
    spinning worker sharing the cores with the pass's two (issue #15's notes). The process pays too:
    onnxruntime then refuses any session with a pool of its own, so only a process that runs nothing else
    on onnxruntime asks for it (the MCP server, whose queries are mostly a text or a few). The pool lives
    as long as the process: its threads stay after the Embedders that use it close.

    Raises GGUFError when the process's pool already has another size, or onnxruntime cannot make it.
    """
    state = library("onnxruntime.capi.onnxruntime_pybind11_state")

    with _PROCESS_POOL.lock:
        if _PROCESS_POOL.threads is None:
            try:
                state.set_global_thread_pool_sizes(threads, 1)
            except Exception as error:  # onnxruntime's own exception types
                raise GGUFError(
                    f"onnxruntime's kernels cannot share a pool of {threads} threads: {failure_words(error)}"
                ) from None
            _PROCESS_POOL.threads = threads
        elif _PROCESS_POOL.threads != threads:
            raise _other_size(_PROCESS_POOL.threads, threads)


def check_process_pool(threads: int) -> None:
    """Raise GGUFError when this process shares a kernel pool (share_process_pool) of another size than
    `threads`: onnxruntime would refuse the sessions of an Embedder that asks for it, so it is refused in
    words before its weights are read."""
    with _PROCESS_POOL.lock:
        if _PROCESS_POOL.threads not in (None, threads):
            raise _other_size(_PROCESS_POOL.threads, threads)


def session_options(threads: int, *, most: int | None = None, spinning: bool = False) -> Any:
    """Options of a session on `threads` threads: the process's shared pool where there is one, else a pool
    of its own, of at most `most` threads where given, whose workers sleep between runs unless `spinning`
    (a session that runs a whole pass, the only one its caller runs)."""
    ort = library("onnxruntime")

    options = ort.SessionOptions()
    # No arena and no memory pattern: a product's buffers are freed when it returns, not kept for reuse.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    # Fatal only: its errors come back as exceptions, put in words here, not as its log lines on stderr.
    options.log_severity_level = 4
    shared = _PROCESS_POOL.threads
    if shared is None:
        options.intra_op_num_threads = threads if most is None else min(threads, most)
        options.inter_op_num_threads = 1
        # A pool per session sleeps when idle: 24 spinning pools (one text's products) take the cores from
        # each other and the pass (one text on 2 threads: 5.6-6.7 ms a text asleep, 90-170 ms spinning).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    elif threads == shared:
        options.use_per_session_threads = False
    else:
        raise _other_size(shared, threads)
    return options


def _other_size(shared: int, threads: int) -> GGUFError:
    return GGUFError(
        f"onnxruntime's kernels share a pool of {shared} threads in this process (share_process_pool); "
        f"open with threads={shared}, not {threads}"
    )


def _model(product: Any, weights: list[Any], rows: int, row_len: int) -> bytes:
    """The model y = product(x, weights...) and y_gelu = Gelu(y), whose weights are external initializers:
    the session takes them from arrays it is given (add_external_initializers), not from the model's bytes,
    which stay small (onnxruntime copies them when the session is made: PackedMatrix gives its rows back).
    A run computes only the output it asks for."""
    helper = library("onnx.helper")
    proto = library("onnx").TensorProto
    # com.microsoft's Gelu is erf's (max abs error 2.5e-7 on a product's outputs, gelu.py's 3.3e-7), and
    # 80 µs a MiniLM layer faster at 26 tokens than numpy's after the product (issue #15, gelu_probe).
    gelu_node = helper.make_node("Gelu", ["y"], ["y_gelu"], domain="com.microsoft")
    graph = helper.make_graph(
        [product, gelu_node],
        "product",
        [helper.make_tensor_value_info("x", proto.FLOAT, ["rows", row_len])],
        [
            helper.make_tensor_value_info("y", proto.FLOAT, ["rows", rows]),
            helper.make_tensor_value_info("y_gelu", proto.FLOAT, ["rows", rows]),
        ],
        weights,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    return bytes(model.SerializeToString())


def _int8_model(rows: int, row_len: int, *, bias: bool) -> bytes:
    """y = MatMulNBits(x, quants, scales) (+ bias): Q8_0 rows, int8 activations."""
    helper = library("onnx.helper")
    proto = library("onnx").TensorProto
    blocks = row_len // Q8_BLOCK
    node = helper.make_node(
        "MatMulNBits",
        ["x", "quants", "scales", "", "", "bias" if bias else ""],  # no zero points, no group index
        ["y"],
        domain="com.microsoft",
        K=row_len,
        N=rows,
        bits=8,
        block_size=Q8_BLOCK,
        accuracy_level=_INT8_ACTIVATIONS,
    )
    weights = [
        external_initializer("quants", proto.UINT8, [rows, blocks, Q8_BLOCK]),
        external_initializer("scales", proto.FLOAT, [rows * blocks]),
    ]
    return _model(
        node, weights + ([external_initializer("bias", proto.FLOAT, [rows])] if bias else []), rows, row_len
    )


def _packed_model(rows: int, row_len: int, *, bias: bool) -> bytes:
    """y = x @ weight.T (+ bias) as a Gemm: float32 rows [rows, row_len], packed when the session is made."""
    helper = library("onnx.helper")
    proto = library("onnx").TensorProto
    node = helper.make_node("Gemm", ["x", "weight", *(["bias"] if bias else [])], ["y"], transB=1)
    weights = [external_initializer("weight", proto.FLOAT, [rows, row_len])]
    return _model(
        node, weights + ([external_initializer("bias", proto.FLOAT, [rows])] if bias else []), rows, row_len
    )


def external_initializer(name: str, data_type: int, dims: list[int]) -> Any:
    """An initializer declared with its data elsewhere (given to the session by name)."""
    proto = library("onnx").TensorProto
    tensor = proto(name=name, data_type=data_type, dims=dims, data_location=proto.EXTERNAL)
    tensor.external_data.add(key="location", value=name)
    return tensor


# onnxruntime's messages that name its sources and functions, by a phrase in them, in words.
_KNOWN_FAILURES: Final = {
    "use_per_session_threads must be false": "other code in this process made onnxruntime's process-wide "
    "thread pool, and onnxruntime then refuses sessions with a pool of their own",
    "Global thread pools have already been created": "other code in this process already made onnxruntime's "
    "process-wide thread pool",
    "pthread_create failed": "onnxruntime cannot start its threads (the process's thread or memory limit)",
}


def failure_words(error: Exception) -> str:
    """onnxruntime's message in words where it is a known one, else its first line (its messages carry
    source paths and newlines)."""
    text = str(error)
    known = next((words for phrase, words in _KNOWN_FAILURES.items() if phrase in text), None)
    lines = text.strip().splitlines()
    return known or (lines[0] if lines else type(error).__name__)


def open_session(
    model: bytes,
    arrays: Mapping[str, np.ndarray],
    threads: int,
    *,
    what: str,
    most: int | None = None,
    spinning: bool = False,
    disabled: Iterable[str] = (),
) -> tuple[Any, list[Any]]:
    """A CPU session of `model` whose external initializers are `arrays` (session_options() for the rest),
    and the values backing them, which must live as long as the session; `disabled`: onnxruntime's graph
    optimizers it must not apply, by name. GGUFError "`what`: <why>" where onnxruntime refuses it."""
    ort = library("onnxruntime")
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
    # Under the process pool's lock: a pool another thread's open shared between these options and the
    # session would make onnxruntime refuse them (a pool of the session's own).
    with _PROCESS_POOL.lock:
        options = session_options(threads, most=most, spinning=spinning)
        options.add_external_initializers(list(arrays), values)
        try:
            # No fallback: onnxruntime would print a banner to stdout and retry the same provider.
            session = ort.InferenceSession(
                model,
                options,
                providers=["CPUExecutionProvider"],
                enable_fallback=0,
                disabled_optimizers=list(disabled),
            )
        except Exception as error:  # onnxruntime's own exception types
            raise GGUFError(f"{what}: {failure_words(error)}") from None
    return session, values


def anonymous_floats(name: str, count: int) -> tuple[mmap.mmap, F32]:
    """Private anonymous pages for `count` float32s and a flat view of them, to hand to a session that
    copies them when it is made (drop_pages() then gives the pages back); KernelRefused when there are no
    pages to map."""
    try:
        pages = mmap.mmap(-1, max(count, 1) * FLOAT_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as error:
        raise KernelRefused(f"{name}: no pages for its float32 rows: {error.strerror or error}") from None
    return pages, np.frombuffer(pages, dtype=np.float32, count=count)


def drop_pages(name: str, pages: mmap.mmap, probe: Callable[[], F32]) -> None:
    """Drop the contents of `pages`, which a session was made from (MADV_DONTNEED: the mapping stays
    valid), and give the C heap's freed pages back (onnxruntime's copy, freed once packed: glibc would keep
    them). `probe` runs the session before and after: were a version of onnxruntime to read the pages again
    at run time, it would read zeros and the two would differ (KernelRefused)."""
    try:
        before = probe()
        pages.madvise(mmap.MADV_DONTNEED)
        release_free_heap()
        after = probe()
    except GGUFError as error:  # the probe's run failed
        raise KernelRefused(str(error)) from None
    if not np.array_equal(after, before, equal_nan=True):
        raise KernelRefused(
            f"{name}: onnxruntime reads float32 weights again after packing them; they cannot be held "
            f"packed alone"
        )


class _SessionMatrix:
    """Rows [rows, row_len] (one matrix, or several with the same input side by side: Q, K and V) in an
    onnxruntime session; multiply() is x @ W.T (+ bias) (then GELU) for float32 x.

    The session's weights are initializers backed by arrays the subclass hands over (no copy), which live
    as long as the session; besides them the session has a pool of threads - 1 worker threads of its own,
    unless the process shares one (share_process_pool).
    """

    kind: str  # in messages: "the int8 kernel", "the float32 kernel"

    def __init__(self, name: str, rows: int, row_len: int) -> None:
        self.name = name
        self.rows, self.row_len = rows, row_len
        self._values: list[Any] = []
        self._session: Any = None

    def _open(
        self, model: bytes, arrays: Mapping[str, np.ndarray], threads: int, *, most: int | None = None
    ) -> None:
        what = f"{self.name}: the {self.kind} kernel cannot hold this matrix"
        self._session, self._values = open_session(model, arrays, threads, what=what, most=most)

    def applies(self, after: Epilogue | None) -> bool:
        """Whether multiply() applies `after` itself (gelu.py's GELU: the graph's Gelu is erf's too)."""
        return after is not None and after in _OUTPUTS

    def multiply(self, x: F32, *, after: Epilogue | None = None) -> F32:
        """x @ W.T (+ bias), then `after` if given (one that applies() says it applies), for x [n, row_len],
        as a new [n, rows] array. A row of x that is not finite gives a NaN row, as a float32 product
        would (the int8 kernel rounds a NaN to some int8)."""
        x = np.ascontiguousarray(x)
        try:
            y: F32 = self._session.run([_OUTPUTS[after]], {"x": x})[0]  # [n, rows]
        except Exception as error:  # onnxruntime's own exception types (bad_alloc among them)
            raise GGUFError(
                f"{self.name}: the {self.kind} kernel failed on {len(x)} rows: {failure_words(error)}"
            ) from None
        # Cheap: NaN or inf in x makes the sum so (and so may an overflow: then rows are checked).
        with np.errstate(over="ignore", invalid="ignore"):
            total = x.sum()
        if not np.isfinite(total):
            y[~np.isfinite(x).all(axis=1)] = np.nan
        return y


class Int8Matrix(_SessionMatrix):
    """Q8_0 rows in MatMulNBits' int8 kernel (resident-int8). The session keeps a packed copy besides the
    quants and scales (together 2.6-3.3x the Q8_0 bytes, plan.INT8_HELD_PER_STORED)."""

    kind = "int8"

    def __init__(
        self,
        name: str,
        rows: int,
        row_len: int,
        raw_blocks: Iterable[tuple[int, bytes]],
        *,
        bias: F32 | None = None,
        threads: int,
    ) -> None:
        super().__init__(name, rows, row_len)
        blocks = row_len // Q8_BLOCK
        self._quants = np.empty((rows, blocks, Q8_BLOCK), dtype=np.uint8)  # [rows, blocks, 32]
        self._scales = np.empty(rows * blocks, dtype=np.float32)  # [rows * blocks]
        for first, raw in raw_blocks:
            stored = np.frombuffer(raw, dtype=np.uint8).reshape(-1, blocks, Q8_BLOCK_BYTES)  # [n, blocks, 34]
            count = stored.shape[0]
            quants = self._quants[first : first + count]  # [n, blocks, 32]
            np.bitwise_xor(stored[..., 2:], _ZERO_POINT, out=quants)  # int8 + 128 as unsigned bytes
            scales = self._scales[first * blocks : (first + count) * blocks]  # [n * blocks]
            scales[:] = stored[..., :2].copy().view("<f2").reshape(-1)
            if not np.isfinite(scales).all():  # per read block: the check's booleans stay within the cap
                # The kernel would not carry a NaN or infinite scale into its products (they come out
                # finite and wrong), so it is refused here, where the float plans refuse the vectors.
                raise GGUFError(f"{name}: a Q8_0 block scale is NaN or infinite; the file is corrupt")
        arrays: dict[str, np.ndarray] = {"quants": self._quants, "scales": self._scales}
        if bias is not None:
            arrays["bias"] = np.ascontiguousarray(bias, dtype=np.float32)  # [rows]
        self._open(_int8_model(rows, row_len, bias=bias is not None), arrays, threads)


class PackedMatrix(_SessionMatrix):
    """Float32 rows in a Gemm session, which packs them into its GEMM's layout when it is made.

    onnxruntime asks that the memory of an initializer outlive its session, yet only copies it when the
    session is made (1.23 and 1.32 alike: products stay right once the rows are gone, issue #15's notes,
    one_big), packs the copy and frees it. The rows are filled into private anonymous pages, handed over,
    and the pages' contents dropped (MADV_DONTNEED) once the session exists: the mapping stays valid, and
    the packed copy is all that is held. Were a version of onnxruntime to read the rows at run time, it
    would read zeros: products of random probe rows before and after the drop would differ.

    The session's own pool has at most PACKED_SESSION_THREADS threads. Raises KernelRefused where the
    kernel cannot hold the matrix (no pages or threads for it, a process-wide pool it cannot use, rows
    read again): the engine then multiplies with numpy instead.
    """

    kind = "float32"

    def __init__(
        self,
        name: str,
        rows: int,
        row_len: int,
        blocks: Iterable[tuple[int, F32]],
        *,
        bias: F32 | None = None,
        threads: int,
    ) -> None:
        super().__init__(name, rows, row_len)
        size = rows * row_len
        self._pages, flat = anonymous_floats(name, size)
        weight = flat.reshape(rows, row_len)
        for first, block in blocks:  # block [n, row_len]
            weight[first : first + block.shape[0]] = block
        arrays: dict[str, np.ndarray] = {"weight": weight}
        if bias is not None:
            arrays["bias"] = np.ascontiguousarray(bias, dtype=np.float32)  # [rows]
        try:
            self._open(
                _packed_model(rows, row_len, bias=bias is not None),
                arrays,
                threads,
                most=PACKED_SESSION_THREADS,
            )
        except GGUFError as error:  # the session could not be made
            raise KernelRefused(str(error)) from None
        del weight, flat, arrays  # the pages' only views besides the session's
        # Random rows: a row of ones would miss rows that sum to zero.
        probe = np.random.default_rng(0).standard_normal((2, row_len)).astype(np.float32)  # [2, row_len]
        drop_pages(name, self._pages, lambda: self.multiply(probe))


# The graph's output for each epilogue the kernel applies itself, by the numpy function it stands for.
_OUTPUTS: Final[Mapping[Epilogue | None, str]] = {None: "y", gelu: "y_gelu"}
