"""Hostile matrix.yaml files: each is a MatrixError naming its key, exit 2, no traceback, hang or OOM kill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.matrix.load import MAX_MATRIX_BYTES, load
from gguf_sandbox.sandbox.cgroup.placement import cgroups_writable
from gguf_sandbox.sandbox.cgroup.process import run_limited

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
CELL_LIMIT = 64 * MIB

# A small valid matrix the corpus entries below break one key at a time.
VALID = """\
version: 1
pythons: ["3.11"]
memory: [64m]
timeout: 5m
models:
  tiny: {synthesize: {size: 1m, hidden: 64, vocab_size: 64}}
workloads:
  embed: {args: {count: 10}, models: [tiny]}
  bomb: {control: alloc-bomb, args: {step: 16m, max: 64m}}
"""


def variant(old: str, new: str) -> bytes:
    assert old in VALID
    return VALID.replace(old, new, 1).encode()


def laughs(levels: int) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return (VALID + "\n".join(lines).replace("a", "zz_a") + "\n").encode()


# name → (file content, regex the MatrixError must match: the key or position it names).
CORPUS: dict[str, tuple[bytes, str]] = {
    "not-utf8": (VALID.encode() + b"# caf\xe9\n", r"matrix\.yaml:10: not UTF-8 \(byte 0xe9"),
    "utf16": (("\ufeff" + VALID).encode("utf-16-le"), r"not UTF-8"),
    "nested-10000": (
        b"pythons: " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
        r":1:\d+: not valid YAML: nested deeper",
    ),
    "nested-maps": (("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 200))).encode(), r"nested deeper"),
    "oversized": (VALID.encode() + b"#" + b"x" * (300 << 10) + b"\n", r"larger than 256k"),
    "many-values": (b"pythons: [" + b"1, " * 30_000 + b"1]\n", r"more than 10,000 values"),
    "billion-laughs": (laughs(9), r"aliases expand to more than"),
    "recursive-alias": (VALID.encode() + b"zz: &r [*r]\n", r"an alias refers to the value that contains it"),
    "duplicate-key": (
        VALID.encode() + b"timeout: 1s\n",
        r":10:1: not valid YAML: duplicate key 'timeout' \(first on line 4\)",
    ),
    "duplicate-nested-key": (variant("{count: 10}", "{count: 10, count: 20}"), r":8:.*duplicate key 'count'"),
    "huge-integer": (variant("count: 10", "count: " + "9" * 5000), r"not valid YAML: .*digits"),
    "bad-date": (VALID.encode() + b"zz: 2001-13-45\n", r"not valid YAML: month must be in 1\.\.12"),
    "control-character": (VALID.encode() + b"zz: \x00\n", r"not valid YAML: unacceptable character"),
    "top-level-list": (b"- 1\n- 2\n", r"matrix: expected a mapping, got list"),
    "timeout-nan": (variant("timeout: 5m", "timeout: .nan"), r"^timeout: duration nan is out of range"),
    "timeout-inf": (variant("timeout: 5m", "timeout: .inf"), r"^timeout: duration inf is out of range"),
    "timeout-negative": (variant("timeout: 5m", "timeout: -1"), r"^timeout: duration -1 is out of range"),
    "timeout-zero": (variant("timeout: 5m", "timeout: 0s"), r"^timeout: duration '0s' is out of range"),
    "timeout-years": (variant("timeout: 5m", "timeout: 100000h"), r"^timeout: .*at most 24h"),
    "default-not-bool": (
        variant("models: [tiny]}", "models: [tiny], default: 'no'}"),
        r"workloads\.\w+\.default: expected true or false",
    ),
    "workload-timeout-nan": (
        variant("models: [tiny]}", "models: [tiny], timeout: .nan}"),
        r"workloads\.embed\.timeout",
    ),
    "memory-1k": (
        variant("memory: [64m]", "memory: [1k]"),
        r"^memory\[0\]: size '1k' is out of range: give 4m",
    ),
    "memory-1t": (variant("memory: [64m]", "memory: [1t]"), r"^memory\[0\]: size '1t' is out of range"),
    "memory-1e23t": (variant("memory: [64m]", "memory: [100000000000000000000000t]"), r"^memory\[0\]: size"),
    "memory-huge-int": (variant("memory: [64m]", "memory: [" + "9" * 40 + "]"), r"^memory\[0\]: size"),
    "memory-64ib": (variant("memory: [64m]", "memory: [64ib]"), r"^memory\[0\]: '64ib' is not a size"),
    "memory-inf": (variant("memory: [64m]", "memory: [.inf]"), r"^memory\[0\]: inf is not a size"),
    "memory-65-values": (
        variant("memory: [64m]", "memory: [" + ", ".join(f"{64 + i}m" for i in range(65)) + "]"),
        r"^memory: 65 values; at most 64",
    ),
    "reference-memory-1k": (VALID.encode() + b"reference_memory: 1k\n", r"^reference_memory: size '1k'"),
    "reference-memory-1t": (VALID.encode() + b"reference_memory: 1t\n", r"^reference_memory: size '1t'"),
    "include-memory-1t": (
        VALID.encode() + b"include: [{workload: bomb, memory: 1t}]\n",
        r"^include\[0\]\.memory",
    ),
    "profile-memory-1k": (VALID.encode() + b"profiles: {p: {memory: [1k]}}\n", r"^profiles\.p\.memory\[0\]"),
    "profile-timeout-nan": (VALID.encode() + b"profiles: {p: {timeout: .nan}}\n", r"^profiles\.p\.timeout"),
    "synth-hidden-0": (
        variant("hidden: 64", "hidden: 0"),
        r"models\.tiny\.synthesize\.hidden: expected a whole",
    ),
    "synth-hidden-odd": (
        variant("hidden: 64", "hidden: 100, type: q8_0"),
        r"models\.tiny\.synthesize: hidden",
    ),
    "synth-size-1t": (
        variant("size: 1m", "size: 1t"),
        r"models\.tiny\.synthesize\.size: size '1t' is out of range",
    ),
    "synth-vocab-1e11": (variant("vocab_size: 64", "vocab_size: 100000000000"), r"synthesize\.vocab_size"),
    "synth-vocab-float": (variant("vocab_size: 64", "vocab_size: 1e11"), r"synthesize\.vocab_size: expected"),
    "synth-layers": (variant("size: 1m", "size: 8g"), r"models\.tiny\.synthesize: makes [\d,]+ layers"),
    "synth-bytes": (
        variant("hidden: 64, vocab_size: 64", "hidden: 8192, vocab_size: 1000000"),
        r"models\.tiny\.synthesize: makes 33\.5 GiB of tensors, at most 16g",
    ),
    "synth-unknown-key": (variant("hidden: 64", "hidden: 64, layers: 3"), r"synthesize\.layers: unknown key"),
    "synth-type": (variant("hidden: 64", "hidden: 64, type: q4_k"), r"synthesize\.type: unknown tensor type"),
    "synth-seed": (variant("hidden: 64", "hidden: 64, seed: -1"), r"synthesize\.seed: expected"),
    **{
        f"packaged-{name}": (
            variant("  tiny: {synth", f"  pk: {{packaged: {source}}}\n  tiny: {{synth"),
            rf"^models\.pk\.packaged{message}",
        )
        for name, source, message in [
            (
                "dotdot",
                "{package: p, file: ../../etc/passwd}",
                r"\.file: '\.\./\.\./etc/passwd' must not contain",
            ),
            ("absolute", "{package: p, file: /etc/passwd}", r"\.file: '/etc/passwd' must be relative"),
            ("unknown-key", "{package: p, file: f, sha256: x}", r"\.sha256: unknown key"),
            ("no-file", "{package: p}", r": expected \{package: <PyPI package>, file:"),
            (
                "package-option",
                "{package: --index-url=http://x, file: f}",
                r"\.package: .* is not a PyPI package",
            ),
            ("package-int", "{package: 5, file: f}", r"\.package: expected a PyPI package name, got 5"),
            ("file-list", "{package: p, file: [a]}", r"\.file: expected a path inside the package"),
            ("part-text", "[p]", r"\[0\]: expected a mapping, got str"),
            ("part-key", "[{package: p, file: f}, {package: p, flie: f}]", r"\[1\]\.flie: unknown key"),
            ("no-parts", "[]", r": expected 1 to 16 parts, got 0"),
            (
                "17-parts",
                "[" + ", ".join(["{package: p, file: f}"] * 17) + "]",
                r": expected 1 to 16 parts, got 17",
            ),
        ]
    },
    **{
        f"decoder-{name}": (
            variant("  tiny: {synth", f"  dec: {{synthesize: {{{recipe}}}}}\n  tiny: {{synth"),
            rf"^models\.dec\.synthesize{message}",
        )
        for name, recipe, message in [
            ("arch", "architecture: gpt9", r"\.architecture: unknown architecture 'gpt9'"),
            ("unknown-key", "architecture: qwen2, layer: 3", r"\.layer: unknown key; did you mean 'layers'"),
            ("hidden-0", "architecture: qwen2, hidden: 0", r"\.hidden: expected a whole number from 32"),
            (
                "layers-2000",
                "architecture: qwen2, layers: 2000",
                r"\.layers: expected a whole number from 1 to 1,024",
            ),
            (
                "size-and-layers",
                "architecture: qwen2, size: 1m, layers: 2",
                r": give 'size' .* or 'layers', not both",
            ),
            ("size-1t", "architecture: qwen2, size: 1t", r"\.size: size '1t' is out of range"),
            (
                "size-many-layers",
                "architecture: qwen2, size: 16g, hidden: 32, ffn: 32, head_dim: 16",
                r": needs [\d,]+ layers or more",
            ),
            ("gqa", "architecture: qwen2, kv_heads: 3", r": 4 query heads cannot share 3 KV heads"),
            (
                "k-quant-rows",
                "architecture: qwen2, type: q4_k",
                r": blk\.0\.attn_q\.weight: rows of 128 values are not whole Q4_K",
            ),
            ("type", "architecture: qwen2, type: iq2_xxs", r"\.type: unknown tensor type 'iq2_xxs'"),
            ("vocab", "architecture: qwen2, vocab_size: 10", r": vocab_size 10 is too small"),
            (
                "bytes",
                "architecture: qwen2, hidden: 16384, ffn: 65536, layers: 64, heads: 128, head_dim: 128",
                r": makes [\d.,]+ GiB",
            ),
            ("seed-float", "architecture: qwen2, seed: 1.5", r"\.seed: expected a whole number"),
        ]
    },
    "args-count-negative": (
        variant("count: 10", "count: -5"),
        r"workloads\.embed\.args\.count: -5 is out of range",
    ),
    "args-count-float": (
        variant("count: 10", "count: 1.5"),
        r"workloads\.embed\.args\.count: expected a whole",
    ),
    "args-count-text": (
        variant("count: 10", "count: many"),
        r"workloads\.embed\.args\.count: expected a whole",
    ),
    "args-threads-huge": (variant("count: 10", "threads: 100000"), r"workloads\.embed\.args\.threads"),
    "args-plan": (
        variant("count: 10", "plan: fastest"),
        r"workloads\.embed\.args\.plan: expected one of auto",
    ),
    "args-unknown": (variant("count: 10", "cuont: 10"), r"workloads\.embed\.args\.cuont: unknown option"),
    "args-step-1t": (
        variant("step: 16m", "step: 1t"),
        r"workloads\.bomb\.args\.step: size '1t' is out of range",
    ),
    "args-max-nan": (variant("max: 64m", "max: .nan"), r"workloads\.bomb\.args\.max: expected"),
    "profile-args": (
        VALID.encode() + b"profiles: {p: {args: {embed: {count: 0}}}}\n",
        r"profiles\.p\.args\.embed",
    ),
    "command-model": (
        VALID.encode() + b"  cmd: {command: ['-c', 'open(\"{model}\")']}\n",
        r"workloads\.cmd\.command: uses \{model\} but the entry lists no models",
    ),
    "too-many-cells": (
        variant('pythons: ["3.11"]', "pythons: [" + ", ".join(f'"3.{i}"' for i in range(40)) + "]").replace(
            b"memory: [64m]", b"memory: [" + b", ".join(f"{64 + i}m".encode() for i in range(64)) + b"]"
        )
        + b"".join(f"  w{i}: {{workload: embed, models: [tiny]}}\n".encode() for i in range(10)),
        r"^matrix: about [\d,]+ cells, more than 10,000",
    ),
    "long-key": (VALID.encode() + b"? " + b"x" * 5000 + b"\n: 1\n", r"^matrix\.'x{20,}…: unknown key"),
    "newline-key": (VALID.encode() + b'"a\\nb": 1\n', r"^matrix\.'a\\nb': unknown key"),
    "version-true": (VALID.replace("version: 1", "version: true").encode(), r"^version: unsupported"),
    "same-cell-ids": (
        VALID.encode() + b"  embed-tiny: {command: ['-c', 'import sys; sys.exit(1)']}\n",
        r"^workloads: 'embed' on model 'tiny' and 'embed-tiny' \(no model\) give the same cell ids",
    ),
}


@pytest.fixture
def corpus_file(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    content, message = CORPUS[request.param]
    path = tmp_path / "matrix.yaml"
    path.write_bytes(content)
    return path, message


def test_the_valid_base_loads(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_text(VALID)
    assert set(load(path).workloads) == {"embed", "bomb"}


@pytest.mark.parametrize("corpus_file", list(CORPUS), indirect=True)
def test_hostile_matrix_is_a_matrix_error_naming_the_key(corpus_file: tuple[Path, str]) -> None:
    path, message = corpus_file
    with pytest.raises(MatrixError) as caught:
        load(path)
    text = str(caught.value)
    assert "\n" not in text and len(text) < 700, text
    assert __import__("re").search(message, text), text


def _cli_in_64m(path: Path) -> tuple[int | None, str, bool]:
    """`gguf-sandbox run --list PATH` in a 64 MiB cgroup when possible: (exit code, stderr, OOM-killed)."""
    argv = [sys.executable, "-m", "gguf_sandbox", "run", "--list", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cgroups_writable() is None:
        result = run_limited(argv, CELL_LIMIT, timeout=120, env=env, cwd=path.parent)
        assert not result.timed_out, result.stderr
        return result.exit_code, result.stderr, result.oom_killed_flag or result.oom_kill_count > 0
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    return done.returncode, done.stderr, False


@pytest.mark.parametrize("corpus_file", list(CORPUS), indirect=True)
def test_hostile_matrix_exits_2_from_run_list_without_traceback_in_64m(corpus_file: tuple[Path, str]) -> None:
    path, _ = corpus_file
    code, stderr, oom = _cli_in_64m(path)
    assert not oom, stderr
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line and not line.startswith("[gguf-sandbox]")]
    assert len(lines) == 1 and lines[0].startswith("gguf-sandbox run: error: "), stderr
    assert "Traceback" not in stderr


def test_a_directory_or_a_fifo_is_not_a_matrix(tmp_path: Path) -> None:
    with pytest.raises(MatrixError, match="not a regular file"):
        load(tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(MatrixError, match="not a regular file"):  # opening it would wait for a writer
        load(fifo)


def test_merge_keys_and_benign_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_text(
        VALID
        + "  embed-b: &entry {workload: embed, args: {count: 5}, models: [tiny]}\n"
        + "  embed-c: {<<: *entry, args: {count: 7}}\n"
    )
    entries = load(path).workloads
    assert entries["embed-b"].options == {"count": "5"}
    assert entries["embed-c"].options == {"count": "7"}


def test_the_shipped_matrix_is_within_every_bound() -> None:
    load(REPO / "matrix.yaml")
    assert (REPO / "matrix.yaml").stat().st_size < MAX_MATRIX_BYTES // 16


# --------------------------------------------------------------------------- declared options in sync
