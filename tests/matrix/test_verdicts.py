"""The verdict rule: every verdict, and the combinations of OOM signals that fool single-signal checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from gguf_sandbox.matrix.verdicts import (
    Outcome,
    Reference,
    Verdict,
    checksums_match,
    comparable,
    decide,
    limit_slack,
    parse_report,
)
from gguf_sandbox.sandbox.base import RunResult

MIB = 1 << 20
LIMIT = 64 * MIB
OK_REPORT = {"workload": "embed", "plan": "resident-f32", "preferred_plan": "resident-f32", "degraded": False}


def result(**overrides: Any) -> RunResult:
    values: dict[str, Any] = {
        "exit_code": 0,
        "timed_out": False,
        "oom_killed_flag": False,
        "oom_kill_count": 0,
        "peak_bytes": 30 * MIB,
        "limit_bytes": LIMIT,
        "duration_s": 1.5,
        "stdout": json.dumps(OK_REPORT) + "\n",
        "stderr": "",
    }
    values.update(overrides)
    return RunResult(**values)


@dataclass(frozen=True)
class Case:
    id: str
    result: RunResult
    verdict: Verdict
    reference: Reference | None = None
    needs_report: bool = True
    report: dict[str, Any] | None = field(default_factory=lambda: dict(OK_REPORT))
    use_stdout_report: bool = True


def refusal(kind: str = "BudgetExceeded") -> str:
    return json.dumps({"error": "embedding weights: needs 90 MB, only 30 MB available", "kind": kind}) + "\n"


CASES = [
    Case("pass", result(), Verdict.PASS),
    Case(
        "degraded",
        result(stdout=json.dumps({**OK_REPORT, "plan": "streaming", "degraded": True}) + "\n"),
        Verdict.DEGRADED,
    ),
    Case("refused-json-on-stdout", result(exit_code=3, stdout=refusal()), Verdict.REFUSED),
    Case(
        "refused-json-on-stderr", result(exit_code=3, stdout="", stderr="log\n" + refusal()), Verdict.REFUSED
    ),
    Case("exit-3-without-json-is-crash", result(exit_code=3, stdout="", stderr="Traceback …"), Verdict.CRASH),
    Case(
        "oom-all-signals",
        result(exit_code=137, oom_killed_flag=True, oom_kill_count=1, peak_bytes=LIMIT),
        Verdict.OOM,
    ),
    Case(
        "oom-flag-missing-counter-set", result(exit_code=137, oom_kill_count=2, peak_bytes=LIMIT), Verdict.OOM
    ),
    Case("oom-flag-only", result(exit_code=137, oom_killed_flag=True, peak_bytes=None), Verdict.OOM),
    Case(
        "oom-137-no-counter-peak-at-limit",
        result(exit_code=137, stdout="", peak_bytes=LIMIT - 4096),
        Verdict.OOM,
    ),
    Case("oom-minus-9-peak-at-limit", result(exit_code=-9, stdout="", peak_bytes=LIMIT), Verdict.OOM),
    Case("137-below-limit-is-crash", result(exit_code=137, stdout="", peak_bytes=20 * MIB), Verdict.CRASH),
    Case("137-unknown-peak-is-crash", result(exit_code=137, stdout="", peak_bytes=None), Verdict.CRASH),
    Case(
        "counter-set-but-main-exited-0",
        result(oom_kill_count=1, peak_bytes=LIMIT),
        Verdict.OOM,
    ),
    Case(
        "counter-set-and-refused",
        result(exit_code=3, stdout=refusal(), oom_kill_count=1),
        Verdict.OOM,
    ),
    Case("timeout", result(exit_code=-9, timed_out=True, stdout="", peak_bytes=40 * MIB), Verdict.TIMEOUT),
    Case(
        "timeout-while-thrashing-at-limit",
        result(exit_code=137, timed_out=True, stdout="", peak_bytes=LIMIT),
        Verdict.TIMEOUT,
    ),
    Case(
        "timeout-with-oom-record-is-oom",
        result(exit_code=137, timed_out=True, oom_kill_count=1, stdout="", peak_bytes=LIMIT),
        Verdict.OOM,
    ),
    Case("exit-0-without-report", result(stdout="hello\n"), Verdict.CRASH, report=None),
    Case(
        "traceback-exit-1", result(exit_code=1, stdout="", stderr="Traceback\nValueError: x"), Verdict.CRASH
    ),
    Case("bad-input-exit-4", result(exit_code=4, stdout=refusal("FileNotFoundError")), Verdict.CRASH),
    Case("segfault", result(exit_code=-11, stdout=""), Verdict.CRASH),
    Case("no-exit-code", result(exit_code=None, stdout=""), Verdict.CRASH),
    Case(
        "wrong-checksum",
        result(stdout=json.dumps({**OK_REPORT, "checksum": "abc"}) + "\n"),
        Verdict.WRONG,
        reference=Reference("def"),
    ),
    Case(
        "right-checksum",
        result(stdout=json.dumps({**OK_REPORT, "checksum": "abc"}) + "\n"),
        Verdict.PASS,
        reference=Reference("abc"),
    ),
    Case(
        "fingerprint-within-tolerance",
        result(stdout=json.dumps({**OK_REPORT, "checksum": "x1", "fingerprint": [0.1, -0.2]}) + "\n"),
        Verdict.PASS,
        reference=Reference([0.10002, -0.20001]),
    ),
    Case(
        "fingerprint-off",
        result(stdout=json.dumps({**OK_REPORT, "checksum": "x1", "fingerprint": [0.1, -0.2]}) + "\n"),
        Verdict.WRONG,
        reference=Reference([0.1, 0.2]),
    ),
    Case(
        "wrong-beats-degraded",
        result(stdout=json.dumps({**OK_REPORT, "degraded": True, "checksum": "abc"}) + "\n"),
        Verdict.WRONG,
        reference=Reference("xyz"),
    ),
    Case(
        "not-compared-no-wrong",
        result(stdout=json.dumps({**OK_REPORT, "checksum": "abc"}) + "\n"),
        Verdict.PASS,
        reference=None,
    ),
    Case(
        "swapped-texts-are-wrong",
        result(stdout=json.dumps({**OK_REPORT, "fingerprint": [0.05, -0.03, 0.01]}) + "\n"),
        Verdict.WRONG,
        reference=Reference([-0.03, 0.05, 0.01]),
    ),
    Case(
        "missing-texts-are-wrong",
        result(stdout=json.dumps({**OK_REPORT, "fingerprint": [0.05, -0.03]}) + "\n"),
        Verdict.WRONG,
        reference=Reference([0.05, -0.03, 0.01]),
    ),
    Case(
        "failed-reference-is-error-not-pass",
        result(stdout=json.dumps({**OK_REPORT, "fingerprint": [0.1]}) + "\n"),
        Verdict.ERROR,
        reference=Reference.failed("its reference run ended crash"),
    ),
    Case(
        "valueless-reference-is-error",
        result(stdout=json.dumps({**OK_REPORT, "fingerprint": [0.1]}) + "\n"),
        Verdict.ERROR,
        reference=Reference(None),
    ),
    Case(
        "compared-report-without-vectors-is-error",
        result(),
        Verdict.ERROR,
        reference=Reference([0.1]),
    ),
    Case(
        "failed-reference-does-not-hide-an-oom",
        result(exit_code=137, oom_kill_count=1, stdout="", peak_bytes=LIMIT),
        Verdict.OOM,
        reference=Reference.failed("its reference run ended crash"),
    ),
    Case("command-exit-0-passes-without-report", result(stdout="hello\n"), Verdict.PASS, needs_report=False),
    Case("command-exit-1-crashes", result(exit_code=1, stdout=""), Verdict.CRASH, needs_report=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    outcome = decide(
        case.result, parse_report(case.result.stdout), case.reference, needs_report=case.needs_report
    )
    assert outcome.verdict is case.verdict, outcome.reason


def test_peak_falls_back_to_the_report_from_inside() -> None:
    stdout = json.dumps({**OK_REPORT, "cgroup_peak": 41 * MIB}) + "\n"
    outcome = decide(result(peak_bytes=None, stdout=stdout), parse_report(stdout))
    assert outcome.peak == 41 * MIB
    assert outcome.cell_text() == "pass 41/64M"


def test_limit_slack_is_a_sixty_fourth_but_at_least_a_mebibyte() -> None:
    assert limit_slack(64 * MIB) == MIB
    assert limit_slack(512 * MIB) == 8 * MIB
    below = decide(result(exit_code=137, stdout="", peak_bytes=LIMIT - 2 * MIB), None)
    assert below.verdict is Verdict.CRASH and not below.oom.limit_reached


def test_parse_report_takes_the_last_json_object_line() -> None:
    stdout = 'loading…\n{"a": 1}\nnot json {\n{"b": 2}\n[1, 2]\n'
    assert parse_report(stdout) == {"b": 2}
    assert parse_report("no report\n") is None
    assert parse_report('{"broken": \n') is None
    # Nested past json's recursion limit: a RecursionError ended the whole matrix run.
    deep = '{"vectors": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert parse_report(f'{{"b": 2}}\n{deep}\n') == {"b": 2}


def test_comparable_prefers_the_fingerprint() -> None:
    assert comparable({"checksum": "abc", "fingerprint": [1.0]}) == [1.0]
    assert comparable({"checksum": "abc", "fingerprint": []}) == "abc"
    assert comparable({"checksum": ""}) is None
    assert comparable(None) is None
    assert checksums_match([1.0, 2.0], [1.0, 2.00001])
    assert not checksums_match([1.0, 2.0], [1.0])
    assert not checksums_match("a", "b")
    # An int no float holds (JSON's 10**400) in a hostile report: math.isclose raised OverflowError.
    assert not checksums_match([10**400], [1.0]) and checksums_match([10**400], [10**400])


def test_failure_message_shows_the_evidence_and_the_repro_line() -> None:
    stderr = "\n".join(f"line {i}" for i in range(30)) + "\n"
    stdout = json.dumps({**OK_REPORT, "plan": "streaming"}) + "\n"
    outcome = decide(
        result(exit_code=137, oom_kill_count=1, peak_bytes=LIMIT, stdout=stdout, stderr=stderr),
        parse_report(stdout),
        cell_id="docker-py3.12-64m-embed-minilm_q8_0",
        repro="gguf-sandbox repro --python 3.12 --memory 64m --backend docker --workload embed --model m",
        expected=frozenset({Verdict.PASS, Verdict.DEGRADED, Verdict.REFUSED}),
    )
    message = outcome.failure_message()
    assert "cell docker-py3.12-64m-embed-minilm_q8_0: oom (expected degraded|pass|refused)" in message
    assert "limit 64.0 MiB, peak 64.0 MiB, exit code 137" in message
    assert "oom_kill counter=1" in message and "SIGKILL/137=yes" in message
    assert "peak reached limit=yes" in message
    assert "plan: streaming" in message
    assert "| line 29" in message and "| line 9" not in message  # the last 20 lines
    assert message.rstrip().endswith("--workload embed --model m")


def test_outcome_json_round_trips_the_evidence() -> None:
    data = decide(result(), parse_report(result().stdout)).to_json()
    assert data["verdict"] == "pass"
    assert data["oom"] == {"flag": False, "counter": 0, "sigkill": False, "limit_reached": False}
    assert json.loads(json.dumps(data)) == data


def test_our_own_vectors_are_compared_within_the_fingerprint_tolerance() -> None:
    """An `embed` cell with `vectors: N` in its args offers whole vectors for the comparison with its twin:
    they were compared exactly, so a plan's last-digit difference (1e-6) was a WRONG cell."""
    reference = {"0": [0.6, 0.8], "5": [1.0, 0.0]}
    near = {"0": [0.600001, 0.799999], "5": [1.0, 0.0]}
    assert checksums_match(near, reference)
    report = {"workload": "embed", "vectors": near, "fingerprint": [0.6, 1.0]}
    result = RunResult(0, False, False, 0, 30 << 20, 64 << 20, 1.0, json.dumps(report), "")
    assert decide(result, report, Reference(reference)).verdict is Verdict.PASS
    far = {**near, "5": [0.0, 1.0]}
    outcome = decide(result, {**report, "vectors": far}, Reference(reference))
    assert outcome.verdict is Verdict.WRONG
    assert "the vectors of 1 of 2 texts, e.g. text 5: 2 of 2 differ" in outcome.reason
    assert not checksums_match({"0": [0.6, 0.8]}, reference)


@pytest.mark.parametrize("peak", [10**400, -1, 2**61], ids=["10^400", "negative", "over-1-EiB"])
def test_a_reports_hostile_cgroup_peak_is_no_peak(peak: int) -> None:
    """Where the backend measured no peak the report's cgroup_peak stood in as given: 10**400 ended the
    run's grid line (peak in MiB) in an OverflowError, and Outcome.from_json in another (math.isfinite)."""
    report = {"workload": "embed", "fingerprint": [1.0], "cgroup_peak": peak}
    result = RunResult(0, False, False, 0, None, 64 << 20, 1.0, json.dumps(report), "")
    outcome = decide(result, report, None)
    assert outcome.peak is None and outcome.cell_text() == "pass ?/64M"
    if peak > 0:  # a record's negative peak is refused where results are read (CellRecord)
        assert Outcome.from_json({**outcome.to_json(), "peak": peak}).peak is None
