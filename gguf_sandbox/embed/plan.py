"""Weight plans and their sizes: which plan a model gets under a memory limit, and what each pass needs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from gguf_sandbox.budget import physical_memory
from gguf_sandbox.embed import ort_kernel
from gguf_sandbox.embed.file_reads import column_read_cache
from gguf_sandbox.embed.layout import ModelConfig, ModelLayout
from gguf_sandbox.embed.q8_block import Q8_BLOCK, is_q8_0
from gguf_sandbox.embed.rows import DEFAULT_CAP, FLOAT_BYTES, aligned
from gguf_sandbox.errors import BudgetExceeded, GGUFError
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo

# A pass never needs more tokens than this; more would only grow the working set, not the speed.
DEFAULT_PASS_TOKENS: Final = 4096
# Transients of a pass beyond its activations, in units of the cap: one decoded weight block plus its raw
# bytes and the dequantizer's byte-sized scratch, or attention scores plus a gathered K and V.
TRANSIENT_CAPS: Final = 3
# Passes grow past the context length only into this share of the room left: allocator slack, page
# cache and Python objects are real but not reserved, and the cgroup counts them all.
PASS_SHARE: Final = (3, 4)


class PlanName(str, Enum):
    """Where the weights live while embedding, and how they are multiplied; fastest first."""

    RESIDENT_INT8 = "resident-int8"
    RESIDENT_F32 = "resident-f32"
    RESIDENT_QUANT = "resident-quant"
    STREAMING = "streaming"


class TableMode(str, Enum):
    """How embedding-table rows are looked up: decoded in memory, raw in memory, or read from the file."""

    F32 = "f32"
    RAW = "raw"
    FILE = "file"


# Table modes a plan may use, best first: a plan keeps its tables in memory when they fit, else reads rows.
PLAN_TABLES: Final[Mapping[PlanName, tuple[TableMode, ...]]] = {
    PlanName.RESIDENT_INT8: (TableMode.RAW, TableMode.FILE),
    PlanName.RESIDENT_F32: (TableMode.F32, TableMode.FILE),
    PlanName.RESIDENT_QUANT: (TableMode.RAW, TableMode.FILE),
    PlanName.STREAMING: (TableMode.FILE,),
}

# The plans auto chooses from, fastest first: their products are float32 throughout, so their vectors agree
# within float rounding. resident-int8 runs only when asked for by name: it rounds activations to 8 bits,
# as llama.cpp does for Q8_0, and its vectors agree with the others' to a cosine of >= 0.998 (the lowest on
# the sentence-transformers fixture is the empty text's, 0.9985; llama.cpp has 0.9984 there).
PLAN_ORDER: Final = (PlanName.RESIDENT_F32, PlanName.RESIDENT_QUANT, PlanName.STREAMING)

# What onnxruntime's kernels hold beyond the matrices, as bounds that tests/embed/test_ort_kernel.py checks
# against a real process's RSS: importing onnxruntime and onnx (36 MiB here); and per matrix a session
# (0.43 MiB for Q8_0; Q, K and V share one) whose own pool has threads - 1 workers (~60 KiB each; counted
# per matrix even where the process shares one pool, ort_kernel.share_process_pool, which has fewer).
KERNEL_IMPORT_BYTES: Final = 48 << 20
KERNEL_SESSION_BYTES: Final = 1 << 20
KERNEL_THREAD_BYTES: Final = 128 << 10
# resident-int8 holds the quants, scales and the session's packed copy: 2.6-3.3x the Q8_0 bytes (issue
# #15's ort_mem probes and review).
INT8_HELD_PER_STORED: Final = 4
# resident-f32 held packed (ort_kernel.PackedMatrix) holds only the GEMM's packed copy, whose output rows
# go in panels of PACKED_PANEL (MLAS's packed B): 0.92-0.99x the panels' float32 bytes once the load gives
# the C heap's free pages back (issue #15's notes, sizes), bounded by 1.1x. While a group of matrices is
# made (at most 3: a layer's Q, K and V), its rows are held twice more, in the pages handed to the session
# and in the copy onnxruntime packs from: reserved for the load only (Plan.load_bytes).
PACKED_PANEL: Final = 16
PACKED_HELD_PER_F32: Final = 1.1
PACKED_LOAD_COPIES: Final = 2 * 3
# A BERT held whole in one session (ort_bert.FusedBert) is made in one go: every matrix's rows are in the
# pages handed to it at once, and onnxruntime may copy them before it packs. Its load peaked 44 MB above its
# RSS once loaded for MiniLM's 42.5 MB of matrices (issue #15's notes, fused_check): reserved as both
# copies of the panels' bytes.
FUSED_LOAD_COPIES: Final = 2


@dataclass(frozen=True)
class Plan:
    """A chosen plan: where weights and tables live, what stays resident, and how big a pass may be."""

    name: PlanName
    tables: TableMode
    resident_bytes: int  # held for the Embedder's lifetime
    max_tokens: int  # token rows of one forward pass
    cap: int = DEFAULT_CAP
    # Pages of weights read from the file are dropped (POSIX_FADV_DONTNEED) as soon as they are copied:
    # chosen when streamed weights do not fit beside a pass (keeping them cached would only evict other
    # pages and count toward the cgroup's peak), or asked for with drop_cache.
    uncached: bool = False
    # Page cache the plan keeps on purpose (streamed weights re-read every pass, or the pages uncached
    # column slabs share): the budget holds it.
    cached_bytes: int = 0
    # resident-f32's matrices are held packed by onnxruntime's float32 kernel (ort_kernel.PackedMatrix):
    # chosen where the `fast` extra is installed and its libraries fit the budget too.
    packed: bool = False
    # Held while the weights load, beside resident_bytes, and given back once they are loaded (the rows
    # packed matrices are made from).
    load_bytes: int = 0
    # A packed BERT is held whole in one session (ort_bert.FusedBert), whose activations every pass
    # reserves beside numpy's (fused_bytes).
    fused: bool = False
    fused_bytes: int = 0

    def pass_bytes(self, config: ModelConfig, tokens: int) -> int:
        return pass_bytes(config, tokens, self.cap) + self.fused_bytes


def pass_bytes(config: ModelConfig, tokens: int, cap: int = DEFAULT_CAP) -> int:
    """Working set of one forward pass over `tokens` token rows."""
    return config.row_bytes * tokens + TRANSIENT_CAPS * cap


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the model's tensors by role: decoded to float32 and as stored in the file."""

    vectors: int
    tables_f32: int
    tables_raw: int
    matrices_f32: int
    matrices_raw: int
    matrices_kept: int  # as resident-quant keeps them (Q8_0 split into quants and float32 scales)
    quantized: bool  # some matrix is stored smaller than float32
    densest: float  # the most bytes per element any matrix is stored in
    matrix_count: int = 0
    q8_only: bool = False  # every matrix is little-endian Q8_0: the int8 kernel can multiply them all
    largest_f32: int = 0  # the largest matrix decoded to float32
    paneled_f32: int = 0  # the matrices decoded to float32, their rows rounded up to whole PACKED_PANELs

    def matrices_int8(self, threads: int) -> int:
        """Bytes resident-int8 holds for the matrices, with the kernel's libraries, when its sessions run
        on `threads` threads."""
        return self._kernel_bytes(threads) + INT8_HELD_PER_STORED * self.matrices_raw

    def matrices_packed(self, threads: int) -> int:
        """Bytes resident-f32 holds for the matrices when onnxruntime's float32 kernel holds them packed,
        with the kernel's libraries and sessions (each a pool of at most PACKED_SESSION_THREADS)."""
        workers = min(threads, ort_kernel.PACKED_SESSION_THREADS)
        return self._kernel_bytes(workers) + math.ceil(PACKED_HELD_PER_F32 * self.paneled_f32)

    def _kernel_bytes(self, threads: int) -> int:
        """The kernel's libraries and a session per matrix, each with a pool of `threads`."""
        per_matrix = KERNEL_SESSION_BYTES + (threads - 1) * KERNEL_THREAD_BYTES
        return KERNEL_IMPORT_BYTES + per_matrix * self.matrix_count

    @classmethod
    def of(cls, gguf: GGUFFile, layout: ModelLayout) -> ModelSizes:
        vectors = tables_f32 = tables_raw = matrices_f32 = matrices_raw = matrices_kept = count = 0
        largest = paneled = 0
        quantized, densest, q8_only = False, 0.0, True
        for name in layout.shapes:
            info = gguf.tensor(name)
            decoded = info.n_elements * FLOAT_BYTES
            if name in layout.tables:
                tables_f32 += decoded
                tables_raw += info.nbytes
            elif name in layout.matrices:
                matrices_f32 += decoded
                largest = max(largest, decoded)
                paneled += -(-info.n_rows // PACKED_PANEL) * PACKED_PANEL * info.row_len * FLOAT_BYTES
                matrices_raw += info.nbytes
                matrices_kept += kept_bytes(info, gguf.byte_order)
                quantized = quantized or info.nbytes < decoded
                densest = max(densest, info.nbytes / info.n_elements)
                count += 1
                q8_only = q8_only and is_q8_0(info, gguf.byte_order)
            else:
                vectors += decoded
        return cls(
            vectors,
            tables_f32,
            tables_raw,
            matrices_f32,
            matrices_raw,
            matrices_kept,
            quantized,
            densest,
            count,
            q8_only and count > 0,
            largest,
            paneled,
        )

    def resident(self, plan: PlanName, tables: TableMode, threads: int = 1, *, packed: bool = False) -> int:
        """Bytes a plan keeps for the Embedder's lifetime (those of onnxruntime's kernels grow with its
        `threads`); `packed`: resident-f32's matrices held packed by its float32 kernel."""
        matrices = {
            PlanName.RESIDENT_INT8: self.matrices_int8(threads),
            PlanName.RESIDENT_F32: self.matrices_packed(threads) if packed else self.matrices_f32,
            PlanName.RESIDENT_QUANT: self.matrices_kept,
            PlanName.STREAMING: 0,
        }[plan]
        table = {TableMode.F32: self.tables_f32, TableMode.RAW: self.tables_raw, TableMode.FILE: 0}[tables]
        return self.vectors + matrices + table


def preferred_plan(config: ModelConfig, sizes: ModelSizes, memory: int | None = None) -> PlanName:
    """The plan an unconstrained host runs for this model: auto's choice with `memory` bytes free.

    `memory` defaults to the machine's physical RAM, so a model whose float32 weights exceed it prefers
    resident-quant (or streaming) and is not reported degraded for running that way.
    """
    room = physical_memory() if memory is None else memory
    try:
        return choose_plan(config, sizes, room).name
    except BudgetExceeded:
        return PlanName.STREAMING


def _candidates(sizes: ModelSizes, requested: PlanName | None) -> Iterator[PlanName]:
    if requested is PlanName.RESIDENT_INT8:
        _check_int8(sizes)
    if requested is not None:
        yield requested
        return
    for name in PLAN_ORDER:
        # Keeping float32 bytes "raw" saves nothing over decoding them once, and is slower.
        if name is PlanName.RESIDENT_QUANT and not sizes.quantized:
            continue
        yield name


def _variants(
    sizes: ModelSizes, wanted: PlanName | None, *, packable: bool
) -> Iterator[tuple[PlanName, bool, TableMode]]:
    """Each candidate plan with whether its matrices are held packed and where its tables are, fastest
    first: a packed resident-f32 with its tables read from the file before an unpacked one with them in
    memory (the products are most of a pass; a table row is one pread a token)."""
    for name in _candidates(sizes, wanted):
        for packed in (True, False) if packable and name is PlanName.RESIDENT_F32 else (False,):
            for tables in PLAN_TABLES[name]:
                yield name, packed, tables


def _check_int8(sizes: ModelSizes) -> None:
    """Refuse resident-int8, asked for by name, where it cannot run."""
    if not ort_kernel.available():
        raise GGUFError(
            "plan resident-int8 needs onnxruntime and onnx: pip install 'gguf-sandbox[fast]', or use "
            "--plan auto"
        )
    if not sizes.q8_only:
        raise GGUFError(
            "plan resident-int8 multiplies Q8_0 weights only, and this model has other matrix types "
            "(or is big-endian); use --plan auto"
        )


def parse_plan(plan: str | PlanName | None) -> PlanName | None:
    """A plan name from the command line or API; "auto" and None mean: let the budget choose."""
    if plan is None or plan == "auto":
        return None
    try:
        return PlanName(plan)
    except ValueError:
        names = ", ".join(["auto", *(p.value for p in PlanName)])
        raise GGUFError(f"unknown weight plan {plan!r}; choose one of {names}") from None


def choose_plan(
    config: ModelConfig,
    sizes: ModelSizes,
    available: int,
    *,
    requested: str | PlanName | None = None,
    cap: int = DEFAULT_CAP,
    pass_tokens: int = DEFAULT_PASS_TOKENS,
    drop_cache: bool = False,
    streaming: ModelConfig | None = None,
    threads: int = 1,
    packable: bool = False,
    fused_bytes: int | None = None,
) -> Plan:
    """The fastest plan whose resident weights plus one full-context pass fit in `available` bytes.

    With `requested`, only that plan is considered. With `drop_cache`, every block or row read from the
    file has its pages dropped once copied (POSIX_FADV_DONTNEED): the process's peak is then its own
    working set, at the cost of re-reading streamed weights from disk every pass. `streaming` is the
    config a streaming pass runs, when it differs from `config` (a decoder's FFN slabs: smaller rows).
    `threads` is how many the pass runs on (onnxruntime's kernels keep a pool of them per matrix, or share
    the process's). With `packable`, resident-f32 holds its matrices packed by onnxruntime's float32 kernel
    where that fits, before it tries numpy's; `fused_bytes`, where given, are what a pass of a packed BERT
    held whole in one session needs beside numpy's (ort_bert.pass_transient).
    Raises BudgetExceeded when nothing fits.
    """
    wanted = parse_plan(requested)
    # A full-context sequence, its chunks padded to ROW_ALIGN.
    min_tokens = aligned(config.context_length)
    smallest: tuple[int, PlanName, ModelConfig] | None = None
    for name, packed, tables in _variants(sizes, wanted, packable=packable):
        runs = streaming if streaming is not None and name is PlanName.STREAMING else config
        resident = sizes.resident(name, tables, threads, packed=packed)
        # A packed BERT that fits one session is held whole (ort_bert): its activations in every pass.
        kernel_pass = fused_bytes if packed and fused_bytes is not None else 0
        fused = kernel_pass > 0
        load = PACKED_LOAD_COPIES * sizes.largest_f32 if packed else 0
        if fused:
            load = FUSED_LOAD_COPIES * sizes.paneled_f32
        room = available - resident - TRANSIENT_CAPS * cap - kernel_pass
        uncached, cached = drop_cache, 0
        if name is PlanName.STREAMING:
            if not drop_cache:
                # Streamed weights that fit beside a minimal pass stay in page cache (passes grow only
                # into what is left); larger ones are read uncached, every pass.
                uncached = (room - sizes.matrices_raw) // runs.row_bytes < min_tokens
                cached = 0 if uncached else sizes.matrices_raw
            if uncached:
                # Uncached column slabs still hold pages shared by slabs: page cache the cgroup counts.
                cached = column_read_cache(*runs.column_slabs, sizes.densest)
            room -= cached
        grown = room * PASS_SHARE[0] // PASS_SHARE[1] // runs.row_bytes
        # Tables in memory save a pread per token row, little next to shrinking every pass.
        in_file = tables is PLAN_TABLES[name][-1]
        loads = available - resident >= load  # the load's copies come and go before any pass
        if loads and room // runs.row_bytes >= min_tokens and (in_file or grown >= pass_tokens):
            tokens = max(min_tokens, min(pass_tokens, grown))
            return Plan(
                name, tables, resident, int(tokens), cap, uncached, cached, packed, load, fused, kernel_pass
            )
        needed = resident + cached + pass_bytes(runs, min_tokens, cap) + kernel_pass
        if smallest is None or needed < smallest[0]:
            smallest = (needed, name, runs)
    needed, name, runs = smallest if smallest is not None else (0, PlanName.STREAMING, config)
    raise BudgetExceeded(
        f"embedding plan {name.value}" + ("" if wanted else " (the smallest plan)"),
        needed,
        max(available, 0),
        f"it keeps {sizes.resident(name, PLAN_TABLES[name][-1], threads):,} bytes of weights and needs "
        f"{pass_bytes(runs, min_tokens, cap):,} for a {min_tokens}-token pass; raise the memory limit"
        + ("" if wanted is None or wanted is PlanName.STREAMING else " or use --plan streaming / auto"),
    )


def describe(plan: Plan, sizes: ModelSizes) -> dict[str, object]:
    """A JSON-friendly summary of a plan and the model's sizes."""
    return {
        "plan": plan.name.value,
        "tables": plan.tables.value,
        "resident_bytes": plan.resident_bytes,
        "max_tokens": plan.max_tokens,
        "cap": plan.cap,
        "uncached": plan.uncached,
        "cached_bytes": plan.cached_bytes,
        "packed": plan.packed,
        "load_bytes": plan.load_bytes,
        "fused": plan.fused,
        "fused_bytes": plan.fused_bytes,
        "model_f32_bytes": sizes.vectors + sizes.tables_f32 + sizes.matrices_f32,
        "model_raw_bytes": sizes.vectors + sizes.tables_raw + sizes.matrices_raw,
    }


# What resident-quant keeps per Q8_0 block: the quants plus the scale as float32 (q8_rows.Q8Piece).
Q8_KEPT_BYTES: Final = Q8_BLOCK + FLOAT_BYTES


def kept_bytes(info: TensorInfo, byte_order: str) -> int:
    """Bytes resident-quant keeps for a matrix: Q8_0 split into quants and scales (q8_rows), anything else
    as stored."""
    if is_q8_0(info, byte_order):
        return info.n_elements // Q8_BLOCK * Q8_KEPT_BYTES
    return info.nbytes
