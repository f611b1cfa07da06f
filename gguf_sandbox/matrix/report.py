"""`gguf-sandbox report`: results files → a directory with index.html, summary.md and PNG images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf_sandbox.atomic import check_replaceable, path_argument, starts_with, write_atomic
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.junit import check_junit_path, write_junit
from gguf_sandbox.matrix.report_data import Report, load_report
from gguf_sandbox.matrix.report_html import render_html
from gguf_sandbox.matrix.report_md import render_summary

INDEX = "index.html"
SUMMARY = "summary.md"
# What a report's own files hold near their start: only such files are replaced by the next report (a
# user's index.html in the directory given is not).
INDEX_MARKER = b"<title>gguf-sandbox matrix report</title>"
SUMMARY_MARKER = b"## gguf-sandbox matrix report"


@dataclass(frozen=True)
class Written:
    """What a report wrote, and why images are missing when they are."""

    directory: Path
    index: Path
    summary: Path
    images: tuple[Path, ...]
    images_skipped: str = ""

    def line(self) -> str:
        images = f"{len(self.images)} PNG images" if not self.images_skipped else "no PNG images"
        return f"report: {self.index} ({self.index.stat().st_size:,} bytes), {self.summary.name}, {images}"


def write_report(report: Report, directory: Path, images: bool = True) -> Written:
    """Write the report's files into `directory` (created; files of the same names replaced)."""
    check_report_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        index, summary = directory / INDEX, directory / SUMMARY
        write_atomic(index, render_html(report).encode("utf-8", "backslashreplace"))
        write_atomic(summary, render_summary(report).encode("utf-8", "backslashreplace"))
        if not images:
            return Written(directory, index, summary, (), "not asked for")
        from gguf_sandbox.matrix.report_png import INSTALL_HINT, pyplot, write_pngs

        plt = pyplot()
        if plt is None:
            return Written(directory, index, summary, (), INSTALL_HINT)
        return Written(directory, index, summary, tuple(write_pngs(report, directory, plt)))
    except OSError as error:
        raise GGUFSandboxError(f"--output {directory}: cannot write the report ({error.strerror})") from None


def check_report_directory(directory: Path) -> None:
    """Refuse, before anything is written, a report directory that is a file, or whose index.html or
    summary.md is not a report's (the PNG images' names, grid-* and timeline-*, are the report's own)."""
    try:
        if directory.exists() and not directory.is_dir():
            raise GGUFSandboxError(f"--output {directory}: exists and is not a directory")
    except OSError as error:
        raise GGUFSandboxError(f"--output {directory}: cannot inspect it ({error.strerror})") from None
    for name, marker in ((INDEX, INDEX_MARKER), (SUMMARY, SUMMARY_MARKER)):
        kind = f"a gguf-sandbox report's {name}"
        check_replaceable(directory / name, "--output", kind, starts_with(marker), file_name=name)


def report_files(
    paths: Sequence[Path], directory: Path, floors: Path | None = None, junit: Path | None = None
) -> Written:
    """Read `paths` and write their report (and `junit`, the cells as JUnit XML); the one entry point
    `report` and `run --report` share."""
    check_report_directory(directory)
    if junit is not None:
        check_junit_path(junit)
    report = load_report(paths, floors)
    written = write_report(report, directory)
    if junit is not None:
        write_junit(junit, [*report.headers, *(cell.data for cell in report.cells)])
    if written.images_skipped:
        print(f"gguf-sandbox report: {written.images_skipped}", file=sys.stderr)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="RESULTS", help="results files of `run` or `merge`")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for the report")
    parser.add_argument(
        "--floors",
        metavar="FILE",
        help="also show a floors table from FILE (floors.json, see `floor --record`)",
    )
    parser.add_argument("--junit", metavar="FILE", help="also write the cells as JUnit XML to FILE")


def run(args: argparse.Namespace) -> int:
    written = report_files(
        [Path(p) for p in args.files],
        path_argument(args.output, "--output"),
        path_argument(args.floors, "--floors") if args.floors is not None else None,
        path_argument(args.junit, "--junit") if args.junit is not None else None,
    )
    print(written.line())
    return 0
