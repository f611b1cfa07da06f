"""The reader workloads: parse (open and touch all metadata) and stream (dequantize every tensor)."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.workloads.report import Report


def parse(model: Path, options: argparse.Namespace) -> Report:
    """Open the file `count` times, touching every metadata value and array length."""
    report = Report("parse", model.name, unit_name="opens")
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(options.count):
        began = time.perf_counter()
        with GGUFFile.open(model) as gguf:
            digest = hashlib.sha256()
            for key, value in gguf.metadata.items():
                described = (
                    f"{value.element_type.name}[{len(value)}]" if isinstance(value, LazyArray) else value
                )
                digest.update(f"{key}={described!r};".encode())
            for info in gguf.tensors.values():
                digest.update(f"{info.name}:{info.type.name}:{info.ne}:{info.offset};".encode())
        report.latencies_s.append(time.perf_counter() - began)
        report.count += 1
    report.seconds = time.perf_counter() - start
    report.units = report.count
    report.checksum = digest.hexdigest()[:16]
    return report


def stream(model: Path, options: argparse.Namespace) -> Report:
    """Dequantize every tensor in ≤1 MiB row blocks; checksum the float32 values."""
    report = Report("stream", model.name, unit_name="MB")
    digest = hashlib.sha256()
    start = time.perf_counter()
    with GGUFFile.open(model) as gguf:
        for info in gguf.tensors.values():
            began = time.perf_counter()
            for _, block in gguf.iter_rows(info.name):
                digest.update(block.data)
                report.units += block.nbytes / 1e6
            report.latencies_s.append(time.perf_counter() - began)
            report.count += 1
    report.seconds = time.perf_counter() - start
    report.checksum = digest.hexdigest()[:16]
    return report
