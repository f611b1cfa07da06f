"""The Embedder: texts in, unit-length vectors out (BERT or decoder GGUFs), inside the detected budget."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np

from gguf_sandbox.budget import MemoryBudget, Reservation
from gguf_sandbox.embed import bert, ort_bert, ort_kernel
from gguf_sandbox.embed.architectures import Family, TextEncoder, family_of, sequence_limits
from gguf_sandbox.embed.bert import POOLING_NAMES, BertConfig, Pooling, require_finite
from gguf_sandbox.embed.layout import ModelConfig, ModelLayout
from gguf_sandbox.embed.plan import (
    DEFAULT_PASS_TOKENS,
    KERNEL_IMPORT_BYTES,
    ModelSizes,
    Plan,
    PlanName,
    choose_plan,
    describe,
    preferred_plan,
)
from gguf_sandbox.embed.rows import F32, TokenBatch, aligned, rows_per_chunk
from gguf_sandbox.embed.threads import (
    SERIAL,
    ComputePool,
    single_threaded_blas,
    usable_cpus,
    use_pool,
    weighted_spans,
)
from gguf_sandbox.embed.weights import PlannedWeights, load_weights
from gguf_sandbox.errors import BudgetExceeded, GGUFError, KernelRefused
from gguf_sandbox.gguf.reader import GGUFFile

DEFAULT_BATCH_SIZE: Final = 32
# How long embed() waits for other callers of a shared budget to release room before it is refused.
DEFAULT_WAIT_S: Final = 120.0

# Plans whose batches run as one sub-batch per thread: every matrix is held ready to multiply, float32 in
# memory or in one of onnxruntime's kernels. resident-int8, 32 texts on 2 threads: 346-406 texts/s as
# sub-batches against 238-317 as one batch whose kernel runs use both threads (issue #15's notes,
# batch_probe); resident-f32 packed 175 against 147 (batch_ab).
SUB_BATCH_PLANS: Final = frozenset({PlanName.RESIDENT_F32, PlanName.RESIDENT_INT8})


@dataclass(frozen=True)
class _Pass:
    """Consecutive texts embedded by one forward pass: texts [first, first + len(sequences))."""

    first: int
    sequences: list[list[int]]

    @property
    def rows(self) -> int:
        """Activation rows the pass may need: chunks pad to ROW_ALIGN, at most as much as each sequence."""
        return sum(aligned(len(s)) for s in self.sequences)

    def split(self, parts: int) -> list[_Pass]:
        """This pass as up to `parts` consecutive passes of near-equal token counts."""
        return [
            _Pass(self.first + lo, self.sequences[lo:hi])
            for lo, hi in weighted_spans([len(s) for s in self.sequences], parts)
        ]


class Embedder:
    """Embeds texts with a GGUF model under a MemoryBudget; thread-safe, callers queue for memory.

    Open with Embedder.open(); use as a context manager or call close().
    """

    def __init__(
        self,
        *,
        gguf: GGUFFile,
        family: Family,
        tokenizer: TextEncoder,
        weights: PlannedWeights,
        sizes: ModelSizes,
        preferred: PlanName,
        full_length: int,
        budget: MemoryBudget,
        resident: Reservation,
        batch_size: int,
        threads: int,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self._gguf = gguf
        self._family = family
        self._tokenizer = tokenizer
        self._weights = weights
        self._model: ModelConfig = weights.config
        self._sizes = sizes
        self._budget = budget
        self._resident = resident
        self._batch_size = batch_size
        self._wait_s = wait_s
        self._preferred = preferred
        self._full_length = full_length
        self._chunk_rows = rows_per_chunk(weights.config, weights.plan.cap)
        self._closed = False
        self._active = 0
        self._state = threading.Condition()
        # Forward passes running at once: no more than the CPUs can run. Every thread that has called
        # into BLAS keeps a packing buffer of its own for good (OpenBLAS: a few MiB each), so 8 callers
        # filled a 64 MiB cell that 2 fit in, and passes beyond the CPUs only wait inside BLAS anyway.
        self._pass_slots = threading.BoundedSemaphore(max(1, len(os.sched_getaffinity(0))))
        # Each pass splits its products and attention over this pool; BLAS itself stays single-threaded.
        single_threaded_blas()
        self._pool = ComputePool(threads)

    @classmethod
    def open(
        cls,
        model_path: str | os.PathLike[str],
        plan: str | PlanName = "auto",
        budget: MemoryBudget | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        pass_tokens: int = DEFAULT_PASS_TOKENS,
        drop_cache: bool = False,
        wait_s: float = DEFAULT_WAIT_S,
        pooling: str | None = None,
        threads: int | None = None,
        own_process: bool = False,
    ) -> Embedder:
        """Open `model_path`, pick a plan from `budget` (detected when None) and load its weights.

        A decoder whose full-length pass (DEFAULT_SEQUENCE_LIMIT tokens) does not fit beside its weights
        runs shorter texts instead, down to SHORTEST_SEQUENCE_LIMIT tokens (degraded). `pooling` (mean,
        last or cls) replaces the file's pooling.

        `drop_cache` drops the file pages of every block or row read from the model once copied
        (POSIX_FADV_DONTNEED; off by default because it drops them for every process on the host and
        costs a re-read per pass when streaming): the process's peak is then its own working set. `wait_s`
        bounds how long embed() waits for room in a shared budget before raising BudgetExceeded.
        `threads` is how many threads a forward pass runs on (None: the CPUs the process may use, its
        affinity cut to its cgroup's CPU quota; never more than that). `own_process` says nothing else in
        this process uses onnxruntime: onnxruntime's kernels (resident-int8, resident-f32 packed) on several
        threads then share one pool across their matrices (ort_kernel.share_process_pool), which every
        later onnxruntime session in the process must use too.
        Raises BudgetExceeded when the vocabulary, or the requested plan (with "auto" every plan), does
        not fit; GGUFError when the file is not a GGUF the engine can run.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not wait_s > 0:
            raise ValueError(f"wait_s must be positive, got {wait_s}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        cpus = usable_cpus()
        threads_used = cpus if threads is None else min(threads, cpus)
        gguf = GGUFFile.open(Path(model_path))
        try:
            family = family_of(gguf)
            layout = _with_pooling(family.read_layout(gguf), pooling)
            tokenizer = _build_tokenizer(gguf, family, budget)
            # Detected after the tokenizer is built, so its vocabulary counts as already spent.
            budget = MemoryBudget.detect() if budget is None else budget
            sizes = ModelSizes.of(gguf, layout)
            full_length = layout.model.context_length
            wanted = _Wanted(plan, pass_tokens, drop_cache, threads_used, packable=ort_kernel.packable())
            layout, weights, resident = _load(
                gguf, layout, family, sizes, budget, wanted=wanted, own_process=own_process
            )
        except BaseException:
            gguf.close()
            raise
        return cls(
            gguf=gguf,
            family=family,
            tokenizer=tokenizer,
            weights=weights,
            sizes=sizes,
            preferred=preferred_plan(dataclasses.replace(layout.config, context_length=full_length), sizes),
            full_length=full_length,
            budget=budget,
            resident=resident,
            batch_size=batch_size,
            threads=threads_used,
            wait_s=wait_s,
        )

    # -- what was chosen ------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The model's config as its forward pass runs it (BertConfig, DecoderConfig)."""
        return self._weights.config

    @property
    def architecture(self) -> str:
        return self._gguf.architecture or "?"

    @property
    def plan(self) -> str:
        return self._weights.plan.name.value

    @property
    def preferred_plan(self) -> str:
        """The plan this machine would run with all its RAM free; differing from `plan` means degraded."""
        return self._preferred.value

    @property
    def degraded(self) -> bool:
        """Running a slower plan than the unconstrained host would, or shorter texts than the model's
        (resident-int8, asked for by name, is the fastest)."""
        chosen = self._weights.plan.name
        slower = chosen is not self._preferred and chosen is not PlanName.RESIDENT_INT8
        return slower or self.context_length < self._full_length

    @property
    def plan_details(self) -> dict[str, object]:
        return {
            **describe(self._weights.plan, self._sizes),
            "sequence_limit": self.context_length,
            "full_sequence_limit": self._full_length,
        }

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights read from the file by streaming passes so far (0 for resident plans)."""
        return self._weights.streamed.total

    @property
    def dimension(self) -> int:
        return self._model.hidden

    @property
    def model_name(self) -> str:
        name = self._gguf.get("general.name")
        return name if isinstance(name, str) and name else self._gguf.path.stem

    @property
    def context_length(self) -> int:
        return self._model.context_length

    @property
    def pooling(self) -> str:
        return self._model.pooling.name.lower()

    @property
    def threads(self) -> int:
        """Threads a forward pass runs on."""
        return self._pool.threads

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def budget(self) -> MemoryBudget:
        return self._budget

    # -- embedding ------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the model sees them ([CLS] … [SEP], or BOS/EOS per the file), cut to the
        context length."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        return self._tokenizer(text, self.context_length)

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> F32:
        """Vectors float32 [len(texts), dimension], in the order of `texts`; unit length unless `normalize`
        is False (then the pooled vectors as the model computes them)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)  # [n, dim]
        if not texts:
            return out
        with self._use():
            plan = self._weights.plan
            for work in self._passes(texts, plan):
                with self._pass_slots:
                    reservation, parts = self._reserve_pass(work, plan)
                    with reservation:
                        self._encode(parts, plan, out, normalize=normalize)
        return out

    def _reserve_pass(self, work: _Pass, plan: Plan) -> tuple[Reservation, list[_Pass]]:
        """Memory for one pass, and the parts it runs as: one sub-batch per thread, each encoded whole on
        its own thread, when every matrix is held ready to multiply (SUB_BATCH_PLANS) and the sub-batches'
        transients fit now; else the whole pass, waiting for room like any other.

        Sub-batches are what lets a second core pay off on a batch: a thread that runs a whole pass
        calls numpy a few times per chunk-sized array, so the threads rarely wait for each other or the
        GIL (issue #15, bench/embed.py, MiniLM, 32 texts: with products split by column spans a batch ran
        1.36x as fast on 2 threads as on 1 in one run, as sub-batches 1.71x, the median of 3; 1.84x once
        GELU's numpy calls were four times fewer).
        Quantized and streamed matrices stay with one batch, whose pool decodes each piece once for all
        chunks instead of once per sub-batch; so does a BERT held whole in one session (plan.fused), whose
        own pool runs each chunk's products on every thread: 32 texts on 2 threads 298 texts/s as one
        batch, 245 as sub-batches calling the session at once (issue #15's notes, fused_p50).
        """
        groups = self._pool.threads if plan.name in SUB_BATCH_PLANS and not plan.fused else 1
        parts = work.split(groups)
        if len(parts) > 1:
            nbytes = sum(plan.pass_bytes(self.config, part.rows) for part in parts)
            try:
                return self._budget.reserve(
                    "embedding pass", nbytes, cap=max(nbytes, self._budget.cap)
                ), parts
            except BudgetExceeded:
                pass  # one batch needs fewer transients
        nbytes = plan.pass_bytes(self.config, work.rows)
        reservation = self._budget.reserve_blocking(
            "embedding pass", nbytes, self._wait_s, cap=max(nbytes, self._budget.cap)
        )
        return reservation, [work]

    def _encode(self, parts: list[_Pass], plan: Plan, out: F32, *, normalize: bool) -> None:
        """Vectors of a pass into its rows of `out`: one part on the pool, or each part alone on a thread.

        Non-finite vectors are refused once for the whole pass, numbered among the caller's texts: a
        sub-batch's own count would name only its texts.
        """
        if len(parts) == 1:
            self._encode_part(parts[0], plan, out, self._pool, normalize=normalize)
        else:
            self._pool.run(
                [
                    functools.partial(self._encode_part, part, plan, out, SERIAL, normalize=normalize)
                    for part in parts
                ]
            )
        first, last = parts[0].first, parts[-1].first + len(parts[-1].sequences)
        require_finite(out[first:last], first)

    def _encode_part(self, part: _Pass, plan: Plan, out: F32, pool: ComputePool, *, normalize: bool) -> None:
        batch = TokenBatch.from_sequences(part.sequences, self._chunk_rows)
        fused = self._weights.fused
        with use_pool(pool):
            if fused is not None:  # a BERT held whole by onnxruntime (ort_bert)
                vectors = bert.encode(
                    self._weights, batch, plan.cap, unit_length=normalize, check_finite=False, fused=fused
                )
            else:
                vectors = self._family.encode(
                    self._weights, batch, plan.cap, unit_length=normalize, check_finite=False
                )
        out[part.first : part.first + len(part.sequences)] = vectors  # [n, dim]

    def _passes(self, texts: Sequence[str], plan: Plan) -> Iterator[_Pass]:
        """Consecutive texts grouped into passes of at most batch_size texts and plan.max_tokens rows."""
        current = _Pass(0, [])
        rows = 0
        for index, text in enumerate(texts):
            ids = self.tokenize(text)
            full = len(current.sequences) >= self._batch_size or rows + aligned(len(ids)) > plan.max_tokens
            if current.sequences and full:
                yield current
                current, rows = _Pass(index, []), 0
            current.sequences.append(ids)
            rows += aligned(len(ids))
        if current.sequences:
            yield current

    # -- lifetime -------------------------------------------------------------------------------------
    @contextmanager
    def _use(self) -> Iterator[None]:
        """Count a running embed() call so close() can wait for it; refuse new calls once closed."""
        with self._state:
            if self._closed:
                raise GGUFError("this Embedder is closed; open a new one with Embedder.open()")
            self._active += 1
        try:
            yield
        finally:
            with self._state:
                self._active -= 1
                self._state.notify_all()

    def close(self) -> None:
        """Wait for running embed() calls, then release the weights, the file and the reservation."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.wait_for(lambda: self._active == 0)
        self._pool.close()
        self._weights.close()
        self._gguf.close()
        self._resident.release()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Embedder({self.model_name!r}, plan={self.plan}, preferred={self.preferred_plan}, "
            f"dimension={self.dimension}, pooling={self.pooling})"
        )


@dataclass(frozen=True)
class _Wanted:
    """What open() asks of a plan: a plan by name (or auto), the pass's tokens, whether read pages are
    dropped, the threads a pass runs on, whether resident-f32 may be held packed, and a packed BERT whole
    in one session; and the bytes of onnxruntime's libraries imported for a packed plan given up, which
    stay in the process."""

    requested: str | PlanName
    pass_tokens: int
    drop_cache: bool
    threads: int
    packable: bool
    imported: int = 0
    whole: bool = True


def _plan_for(
    layout: ModelLayout, family: Family, sizes: ModelSizes, budget: MemoryBudget, wanted: _Wanted
) -> tuple[ModelLayout, Plan]:
    """The fastest plan at the longest sequence limit that fits, with the layout cut to that limit; the
    refusal of the shortest limit when none fits."""
    refusal: BudgetExceeded | None = None
    for limit in sequence_limits(family, layout.model.context_length):
        config = dataclasses.replace(layout.config, context_length=limit)
        streaming = family.streaming_config(config)
        try:
            plan = choose_plan(
                config,
                sizes,
                budget.available - wanted.imported,  # reserved with the weights
                requested=wanted.requested,
                cap=budget.cap,
                pass_tokens=wanted.pass_tokens,
                drop_cache=wanted.drop_cache,
                streaming=streaming,
                threads=wanted.threads,
                packable=wanted.packable,
                fused_bytes=_fused_bytes(config, budget.cap) if wanted.whole else None,
            )
        except BudgetExceeded as error:
            refusal = error
            continue
        chosen = streaming if plan.name is PlanName.STREAMING else config
        return dataclasses.replace(layout, config=chosen), plan
    assert refusal is not None  # sequence_limits yields at least one limit
    raise refusal


def _fused_bytes(config: ModelConfig, cap: int) -> int | None:
    """What a pass of this model held whole in one session (ort_bert.FusedBert) needs beside numpy's, or
    None where it is not: a decoder, or a BERT whose Q, K and V are wider than its widest activation."""
    if isinstance(config, BertConfig) and ort_bert.fusable(config, cap):
        return ort_bert.pass_transient(config, cap)
    return None


def _load(
    gguf: GGUFFile,
    layout: ModelLayout,
    family: Family,
    sizes: ModelSizes,
    budget: MemoryBudget,
    *,
    wanted: _Wanted,
    own_process: bool,
) -> tuple[ModelLayout, PlannedWeights, Reservation]:
    """The chosen plan's weights, loaded under their reservation, with the layout they run.

    resident-f32 holds its matrices packed by onnxruntime's float32 kernel where `wanted.packable` (the
    `fast` extra installed, no address-space limit) and that fits; where the libraries then do not load,
    the process's kernel pool cannot serve the threads, or the kernel cannot hold the matrices (no
    threads, pages or memory for it, rows it would read again), it holds them for numpy instead: the same
    vectors, more slowly, and the libraries it imported reserved beside them. A BERT held whole in one
    session (ort_bert) that the kernel refuses (its layer norm not numpy's, among the above) is tried a
    session per matrix before that.
    """
    planned, chosen = _plan_for(layout, family, sizes, budget, wanted)
    threads = wanted.threads

    def unpacked() -> tuple[ModelLayout, PlannedWeights, Reservation]:
        imported = KERNEL_IMPORT_BYTES if ort_kernel.imported() else 0
        given_up = dataclasses.replace(wanted, packable=False, imported=imported)
        return _load(gguf, layout, family, sizes, budget, wanted=given_up, own_process=own_process)

    if chosen.packed and not ort_kernel.importable():
        return unpacked()
    try:
        if chosen.name is PlanName.RESIDENT_INT8 or chosen.packed:
            if own_process and threads > 1:
                ort_kernel.share_process_pool(threads)
            else:
                ort_kernel.check_process_pool(threads)
    except GGUFError:
        if chosen.packed:
            return unpacked()
        raise
    held = chosen.resident_bytes + chosen.cached_bytes + wanted.imported
    what = f"{chosen.name.value} weights of {gguf.path.name}"
    if chosen.cached_bytes:
        what += f" ({chosen.cached_bytes:,} bytes of them in page cache)"
    if wanted.imported:
        what += f" (and {wanted.imported:,} bytes of onnxruntime's libraries, imported)"
    resident = budget.reserve(what, held, cap=max(held, budget.cap))
    weights: PlannedWeights | None = None
    try:
        loading = chosen.load_bytes
        with budget.reserve(f"loading {what}", loading, cap=max(loading, budget.cap)):
            weights = load_weights(gguf, planned, chosen, threads=threads)
    except (KernelRefused, MemoryError):
        resident.release()  # and the matrices made so far go with the exception, before numpy's load
        if not chosen.packed:
            raise
    except BaseException:
        resident.release()
        raise
    if weights is None:
        gc.collect()  # their sessions' threads and memory
        if chosen.fused:  # a session per matrix may hold what one for the whole encoder could not
            by_matrix = dataclasses.replace(wanted, whole=False)
            return _load(gguf, layout, family, sizes, budget, wanted=by_matrix, own_process=own_process)
        return unpacked()
    resident.mark_allocated()
    return planned, weights, resident


def _with_pooling(layout: ModelLayout, pooling: str | None) -> ModelLayout:
    """The layout with `pooling` (mean, last, cls) instead of the file's; None keeps the file's."""
    if pooling is None:
        return layout
    if pooling not in POOLING_NAMES:
        raise GGUFError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING_NAMES)}")
    config = dataclasses.replace(layout.config, pooling=Pooling[pooling.upper()])
    return dataclasses.replace(layout, config=config)


def _build_tokenizer(gguf: GGUFFile, family: Family, budget: MemoryBudget | None) -> TextEncoder:
    """The file's tokenizer, refused with BudgetExceeded when its vocabulary cannot fit in memory."""
    needed = family.vocabulary_bytes(gguf)
    room = MemoryBudget.detect() if budget is None else budget
    # Held only while building: afterwards the vocabulary is part of what the budget measures as spent.
    with room.reserve(f"tokenizer vocabulary of {gguf.path.name}", needed, cap=max(needed, room.cap)):
        return family.tokenizer(gguf)
