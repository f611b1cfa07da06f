"""Per-cell overhead of each matrix backend: wall time from Sandbox.run() to the report, trivial workloads.

    python bench/matrix.py [--backend cgroup --backend docker] [--python 3.11] [--repeat 5] [--json]

Workloads: `noop` (the interpreter prints a JSON line) and `parse` (gguf-sandbox's parse workload on a
tiny synthetic model, so the model mount and the package import are included). The `bare` row runs
the same commands as plain subprocesses of this interpreter: the difference is the backend's cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert
from gguf_sandbox.matrix.runner import make_sandbox
from gguf_sandbox.matrix.sizes import size_at
from gguf_sandbox.matrix.verdicts import decide, parse_report
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, CellSpec, Sandbox

NOOP = ("-c", "import json; print(json.dumps({'workload': 'noop'}))")
PARSE = ("-m", "gguf_sandbox", "workload", "parse", "--model", MODEL_PLACEHOLDER, "--count", "1")
WORKLOADS = {"noop": NOOP, "parse": PARSE}
WIDTHS = (3, 8, 8, 8, 9)


@dataclass(frozen=True)
class Row:
    backend: str
    workload: str
    times_ms: tuple[float, ...]
    verdicts: tuple[str, ...]

    @property
    def p50(self) -> float:
        return statistics.median(self.times_ms)

    def as_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "workload": self.workload,
            "n": len(self.times_ms),
            "p50_ms": round(self.p50, 1),
            "max_ms": round(max(self.times_ms), 1),
            "min_ms": round(min(self.times_ms), 1),
            "verdicts": sorted(set(self.verdicts)),
        }


def bare(argv: Sequence[str], model: Path) -> str:
    command = [sys.executable, *(a.replace(MODEL_PLACEHOLDER, str(model)) for a in argv)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return "pass" if done.returncode == 0 and parse_report(done.stdout) else f"exit {done.returncode}"


def in_sandbox(sandbox: Sandbox, spec: CellSpec) -> Callable[[], str]:
    def once() -> str:
        result = sandbox.run(spec)
        return decide(result, parse_report(result.stdout)).verdict.value

    return once


def bench(backends: Sequence[str], python: str, memory: int, repeat: int, model: Path) -> list[Row]:
    """Round-robin over bare and each backend, so load from elsewhere hits every variant alike."""
    sandboxes = []
    for backend in backends:
        sandbox = make_sandbox(backend)
        reason = sandbox.unavailable_reason(python)
        if reason is None:
            sandboxes.append(sandbox)
        else:
            print(f"{backend}: skipped ({reason})", file=sys.stderr)
    rows = []
    for name, argv in WORKLOADS.items():
        variants: dict[str, Callable[[], str]] = {"bare": lambda argv=argv: bare(argv, model)}  # type: ignore[misc]
        for sandbox in sandboxes:
            spec = CellSpec(f"bench-{sandbox.name}-{name}", sandbox.name, python, memory, argv, 120.0, model)
            variants[sandbox.name] = in_sandbox(sandbox, spec)
        times: dict[str, list[float]] = {v: [] for v in variants}
        verdicts: dict[str, list[str]] = {v: [] for v in variants}
        for call in variants.values():
            call()  # warm-up: the first use may build a venv or an image
        for _ in range(repeat):
            for variant, call in variants.items():
                started = time.perf_counter()
                verdicts[variant].append(call())
                times[variant].append(1e3 * (time.perf_counter() - started))
        rows += [Row(v, name, tuple(times[v]), tuple(verdicts[v])) for v in variants]
    return rows


def render(rows: Sequence[Row]) -> str:
    base = {r.workload: r.p50 for r in rows if r.backend == "bare"}
    columns = ("n", "p50 ms", "min ms", "max ms", "overhead")
    header = f"{'backend':8} {'workload':8} " + " ".join(
        f"{c:>{w}}" for c, w in zip(columns, WIDTHS, strict=True)
    )
    lines = [header + "  verdicts"]
    for row in rows:
        overhead = "" if row.backend == "bare" else f"{row.p50 - base[row.workload]:+.0f} ms"
        values = (len(row.times_ms), f"{row.p50:.1f}", f"{min(row.times_ms):.1f}", f"{max(row.times_ms):.1f}")
        cells = " ".join(f"{v:>{w}}" for v, w in zip((*values, overhead), WIDTHS, strict=True))
        lines.append(f"{row.backend:8} {row.workload:8} {cells}  {','.join(sorted(set(row.verdicts)))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", action="append", choices=("cgroup", "docker"))
    parser.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    parser.add_argument("--memory", default="256m")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
        model = write_synthetic_bert(Path(tmp) / "tiny.gguf", SyntheticBert())
        model.chmod(0o644)
        rows = bench(
            args.backend or ["cgroup", "docker"],
            args.python,
            size_at(args.memory, "--memory"),
            args.repeat,
            model,
        )
    print(json.dumps([r.as_json() for r in rows], indent=1) if args.json else render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
