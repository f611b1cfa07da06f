"""Tests for matrix/junit.py: one testcase per cell, parsed back with the stdlib parser."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.matrix.junit import junit_bytes, write_junit, xml_text

MIB = 1 << 20
REPRO = "gguf-sandbox repro --python 3.12 --memory 64m --backend cgroup --workload embed --model m"


def cell(cell_id: str, verdict: str | None, expected: list[str], **extra: Any) -> dict[str, Any]:
    record = {
        "kind": "cell",
        "cell_id": cell_id,
        "backend": "cgroup",
        "python": "3.12",
        "memory": 64 * MIB,
        "memory_label": "64m",
        "workload": "embed",
        "model": "m",
        "expected": expected,
        "verdict": verdict,
        "peak": 64 * MIB,
        "limit": 64 * MIB,
        "duration_s": 2.5,
    }
    return {**record, **extra}


RECORDS: list[dict[str, Any]] = [
    {
        "kind": "run",
        "cell_id": "",
        "version": "0.1.0",
        "shard": "1/2",
        "backends": ["cgroup"],
        "selected": [],
    },
    {"kind": "run", "cell_id": "", "version": "0.1.0", "shard": "2/2", "backends": "not a list"},
    {"kind": "reference", "cell_id": "ref", "checksum": "c"},
    cell("ok", "pass", ["pass"], report={"versions": {"python": "3.12.1", "numpy": "2.5.5"}}),
    cell(
        "killed",
        "oom",
        ["pass", "degraded"],
        reason="the kernel OOM-killed the cell",
        oom={"flag": True, "counter": 1, "sigkill": True, "limit_reached": True},
        exit_code=137,
        log_tail=['loading <model> & "weights"', "\x1b[31mred\x00 \ud800 \ufffe"],
        repro=REPRO,
    ),
    {**cell("skipped", None, ["pass"]), "kind": "skip", "reason": "no python3.12 here"},
    {**cell("broken", None, ["pass"]), "kind": "error", "reason": "docker: engine went away"},
    cell("killed", "oom", ["oom"], duration_s=float("nan")),  # the same id again: the latest counts
]


def parse(data: bytes) -> ET.Element:
    return ET.fromstring(data)


def test_one_testcase_per_cell_with_counts_and_properties() -> None:
    root = parse(junit_bytes(RECORDS))
    assert root.tag == "testsuites" and root.get("tests") == "4"
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "1", "1")
    properties = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert properties == {"version": "0.1.0", "shard": "1/2, 2/2", "backends": "cgroup"}
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert list(cases) == ["ok", "killed", "skipped", "broken"]
    assert cases["ok"].get("classname") == "cgroup.embed" and cases["ok"].get("time") == "2.500"
    ok_properties = {p.get("name"): p.get("value") for p in cases["ok"].findall("properties/property")}
    assert ok_properties["version.python"] == "3.12.1" and ok_properties["verdict"] == "pass"
    assert cases["killed"].get("time") == "0.000" and cases["killed"].find("failure") is None
    skipped = cases["skipped"].find("skipped")
    assert skipped is not None and skipped.get("message") == "no python3.12 here"
    error = cases["broken"].find("error")
    assert error is not None and "docker: engine went away" in (error.get("message") or "")


def test_a_cell_outside_expect_fails_with_its_verdict_expect_and_repro(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(path, RECORDS[:-1])
    case = ET.parse(path).getroot().find("testsuite/testcase[@name='killed']")
    assert case is not None
    failure = case.find("failure")
    assert failure is not None
    assert failure.get("type") == "oom" and failure.get("message") == "oom! 64/64M (expected degraded|pass)"
    text = failure.text or ""
    assert "OOMKilled flag=yes, oom_kill counter=1" in text and "exit code 137" in text
    assert f"reproduce: {REPRO}" in text
    assert 'loading <model> & "weights"' in text  # escaped on the way out, intact on the way back
    assert "\x1b" not in text and "\x00" not in text and "red\ufffd" in text  # XML cannot hold those


def test_xml_text_keeps_what_xml_can_hold() -> None:
    assert xml_text("tab\tnewline\nüñí 𝄞") == "tab\tnewline\nüñí 𝄞"
    assert xml_text("\x07\x1b\ud800\uffff") == "\ufffd" * 4


def test_no_records_is_an_empty_suite() -> None:
    root = parse(junit_bytes([]))
    assert root.get("tests") == "0" and root.find("testsuite/testcase") is None


def test_junit_replaces_only_nothing_an_empty_file_or_its_own(tmp_path: Path) -> None:
    path = tmp_path / "cells.xml"
    path.write_bytes(b"")
    write_junit(path, RECORDS)
    write_junit(path, RECORDS)  # its own file again
    assert ET.parse(path).getroot().tag == "testsuites"
    other = tmp_path / "other.xml"
    other.write_bytes(b"<?xml version='1.0'?>\n<testsuites name=\"pytest\"/>\n")
    with pytest.raises(GGUFSandboxError, match=r"other\.xml: exists and is not a gguf-sandbox JUnit file"):
        write_junit(other, RECORDS)
    with pytest.raises(GGUFSandboxError, match=r"is a directory; give a file path such as .*junit\.xml"):
        write_junit(tmp_path, RECORDS)
