"""JUnit XML of matrix results: one testcase per cell, failed when its verdict is outside its expect."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gguf_sandbox.atomic import check_replaceable, write_atomic
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.grid import cell_text
from gguf_sandbox.matrix.results import CELL, ERROR, RUN, SKIP, CellRecord
from gguf_sandbox.matrix.verdicts import Outcome

SUITE_NAME = "gguf-sandbox matrix"
# What XML 1.0 cannot hold at all, escaped or not (control characters, lone surrogates, U+FFFE/U+FFFF):
# log tails carry whatever a crashing cell printed.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# How much of an existing file is read to tell whether it is a JUnit document of ours (its first element
# names the suite within the first few hundred bytes).
OWNERSHIP_PROBE_BYTES = 4096
# Run-header fields shown as the suite's properties, when the runs recorded them.
HEADER_PROPERTIES = ("version", "matrix", "profile", "k", "shard")


def xml_text(value: object) -> str:
    """`value` as text XML can carry: characters it cannot are replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", str(value))


def junit_document(records: Iterable[Mapping[str, Any]]) -> ET.Element:
    """The document for a results file's records: the latest record of each cell, in first-seen order."""
    headers: list[Mapping[str, Any]] = []
    latest: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if record.get("kind") == RUN:
            headers.append(record)
        elif record.get("kind") in (CELL, SKIP, ERROR):
            latest[str(record["cell_id"])] = record
    cases = [_testcase(CellRecord.from_json(data), data) for data in latest.values()]
    counts = {
        "tests": len(cases),
        "failures": sum(case.find("failure") is not None for case in cases),
        "errors": sum(case.find("error") is not None for case in cases),
        "skipped": sum(case.find("skipped") is not None for case in cases),
    }
    seconds = sum(float(case.get("time", "0")) for case in cases)
    suites = ET.Element("testsuites", {k: str(v) for k, v in counts.items()}, name=SUITE_NAME)
    suites.set("time", f"{seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", {k: str(v) for k, v in counts.items()}, name=SUITE_NAME)
    suite.set("time", f"{seconds:.3f}")
    properties = _header_properties(headers)
    if properties:
        _properties(suite, properties)
    suite.extend(cases)
    ET.indent(suites)
    return suites


def junit_bytes(records: Iterable[Mapping[str, Any]]) -> bytes:
    text: bytes = ET.tostring(junit_document(records), encoding="utf-8", xml_declaration=True)
    return text + b"\n"


def is_junit_file(path: Path) -> bool:
    """Whether an existing regular file is a JUnit document we wrote (or empty): the only file --junit
    replaces."""
    with path.open("rb") as handle:
        head = handle.read(OWNERSHIP_PROBE_BYTES)
    return not head or (head.startswith(b"<?xml") and f'name="{SUITE_NAME}"'.encode() in head)


def check_junit_path(path: Path) -> None:
    """Refuse a --junit path holding anything but a JUnit file of ours (checked before a run starts too)."""
    check_replaceable(path, "--junit", "a gguf-sandbox JUnit file", is_junit_file, file_name="junit.xml")


def write_junit(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write the JUnit XML of `records` to `path` atomically, replacing only nothing or a JUnit file of
    ours; a one-line error when it cannot."""
    check_junit_path(path)
    try:
        write_atomic(path, junit_bytes(records))
    except OSError as error:
        raise GGUFSandboxError(f"--junit {path}: cannot write ({error.strerror})") from None


def _testcase(record: CellRecord, data: Mapping[str, Any]) -> ET.Element:
    duration = data.get("duration_s")
    seconds = float(duration) if isinstance(duration, int | float) and not isinstance(duration, bool) else 0.0
    case = ET.Element(
        "testcase",
        name=xml_text(record.cell_id),
        classname=xml_text(f"{record.backend}.{record.workload}"),
        time=f"{seconds if math.isfinite(seconds) and seconds > 0 else 0.0:.3f}",
    )
    expected = "|".join(sorted(v.value for v in record.expected)) or "?"
    properties = {"verdict": record.verdict.value if record.verdict else record.kind, "expect": expected}
    report = data.get("report")
    versions = report.get("versions") if isinstance(report, dict) else None
    if isinstance(versions, dict):
        properties.update({f"version.{k}": str(v) for k, v in versions.items()})
    _properties(case, properties)
    if record.kind == SKIP:
        ET.SubElement(case, "skipped", message=xml_text(record.reason))
    elif record.kind == ERROR or record.verdict is None:
        message = f"harness error: {record.reason}"
        error = ET.SubElement(case, "error", message=xml_text(message), type="error")
        error.text = xml_text(f"{message}\nreproduce: {record.repro}" if record.repro else message)
    elif not record.ok:
        failure = ET.SubElement(
            case,
            "failure",
            message=xml_text(f"{cell_text(record)} (expected {expected})"),
            type=record.verdict.value,
        )
        outcome = Outcome.from_json(data, repro=record.repro, expected=record.expected)
        failure.text = xml_text(outcome.failure_message())
    return case


def _header_properties(headers: list[Mapping[str, Any]]) -> dict[str, str]:
    """Each header field's distinct values across the runs, joined (`shard: 1/4, 2/4`)."""
    out: dict[str, str] = {}
    for key in HEADER_PROPERTIES:
        values = dict.fromkeys(str(h[key]) for h in headers if h.get(key) is not None)
        if values:
            out[key] = ", ".join(values)
    listed = [h["backends"] for h in headers if isinstance(h.get("backends"), list)]
    backends = dict.fromkeys(str(b) for names in listed for b in names)
    if backends:
        out["backends"] = ", ".join(backends)
    return out


def _properties(parent: ET.Element, properties: Mapping[str, str]) -> None:
    holder = ET.SubElement(parent, "properties")
    for name, value in properties.items():
        ET.SubElement(holder, "property", name=xml_text(name), value=xml_text(value))
