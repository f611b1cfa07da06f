"""From what a backend observed (RunResult + the workload's JSON report) to a Verdict, purely.

The rule, in order (the first that applies decides):

1. OOM      the kernel recorded an OOM kill in the cell (Docker's OOMKilled flag or the cgroup's
            oom_kill counter — either one: the flag is missed in documented cases, the counter can be
            lost with the cgroup), or the cell died by SIGKILL (exit 137 / -9) without timing out
            while its peak reached the limit (within LIMIT_SLACK). Any OOM kill makes the cell OOM,
            even when the main process survived: something inside the limit died.
2. TIMEOUT  the backend stopped the cell at its wall-clock timeout (thrashing ends here, not in pass).
3. exit 0   CRASH without a JSON report. For a cell compared with its unconstrained reference:
            ERROR when that reference run failed or either side carries nothing to compare (a cell that
            cannot be judged never passes by accident); WRONG when the vectors differ (compared on
            `fingerprint` — floats, within FINGERPRINT_TOL — when the report has one, else on `checksum`
            exactly; see comparable()); a peer, compared with ours, is WRONG when the cosine of its
            `vectors` to ours falls below the reference's min_cosine (agreement.py).
            Then DEGRADED when the report says `degraded: true`, else PASS.
4. exit 3   REFUSED when stdout or stderr carries the JSON error ({"error": …, "kind": …});
            CRASH when it does not (a bare exit 3 is not a graceful refusal).
5. anything else (tracebacks, other signals, SIGKILL below the limit) → CRASH.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gguf_sandbox.sandbox.base import IsolationReport, RunResult
from gguf_sandbox.sandbox.sampling import Timeline

if TYPE_CHECKING:
    # Imported where used: the mcp workload reads reports with this module inside a cell.
    from gguf_sandbox.matrix.agreement import Agreement


class Verdict(str, enum.Enum):
    """How a cell ended. Graceful verdicts are what a well-behaved workload may produce."""

    PASS = "pass"
    DEGRADED = "degraded"
    REFUSED = "refused"
    OOM = "oom"
    CRASH = "crash"
    TIMEOUT = "timeout"
    WRONG = "wrong"
    # The harness could not judge the cell (e.g. its unconstrained reference run failed).
    ERROR = "error"

    @property
    def graceful(self) -> bool:
        return self in (Verdict.PASS, Verdict.DEGRADED, Verdict.REFUSED)


REFUSAL_EXIT_CODE = 3
LOG_TAIL_LINES = 20
# Within this much of the limit counts as "reached": cgroup peaks stop a few pages short of it.
LIMIT_SLACK_MIN = 1 << 20
LIMIT_SLACK_FRACTION = 1 / 64
# Plans may differ by ~1e-6 per vector element; a broken forward pass differs by orders more.
FINGERPRINT_TOL = 1e-4
# The largest memory size a report or record may state (1 EiB): beyond it a size is damage, and 10**400
# bytes has no float in MiB for a grid to show.
MAX_SIZE = 1 << 60


@dataclass(frozen=True)
class Reference:
    """What a cell's unconstrained twin produced: the values to compare with, or why there are none.

    With `min_cosine` the twin is ours and the cell a peer: their `vectors` are compared by cosine.
    """

    values: object = None
    failure: str | None = None
    min_cosine: float | None = None

    @classmethod
    def failed(cls, why: str) -> Reference:
        return cls(None, why)


def limit_slack(limit: int) -> int:
    return max(LIMIT_SLACK_MIN, int(limit * LIMIT_SLACK_FRACTION))


@dataclass(frozen=True)
class OomSignals:
    """The three independent OOM signals (flag and counter count as one: 'the kernel said so')."""

    flag: bool
    counter: int
    sigkill: bool
    limit_reached: bool

    @property
    def kernel_kill(self) -> bool:
        return self.flag or self.counter > 0

    def describe(self) -> str:
        def yes(value: bool) -> str:
            return "yes" if value else "no"

        return (
            f"OOMKilled flag={yes(self.flag)}, oom_kill counter={self.counter}, "
            f"SIGKILL/137={yes(self.sigkill)}, peak reached limit={yes(self.limit_reached)}"
        )


@dataclass(frozen=True)
class Outcome:
    """A decided cell: verdict, why, and the evidence a failure message needs."""

    verdict: Verdict
    reason: str
    limit: int
    peak: int | None
    oom: OomSignals
    plan: str | None
    exit_code: int | None
    duration_s: float
    log_tail: tuple[str, ...]
    report: Mapping[str, Any] | None
    cell_id: str = ""
    repro: str = ""
    expected: frozenset[Verdict] = field(default_factory=frozenset)
    timeline: Timeline = field(default_factory=Timeline)
    isolation: IsolationReport | None = None
    # A peer's vectors against ours (None: not a peer, or nothing to compare).
    agreement: Agreement | None = None

    def cell_text(self) -> str:
        """Grid text: `pass 41/64M`."""
        return f"{self.verdict.value} {peak_over_limit(self.peak, self.limit)}"

    def failure_message(self) -> str:
        """Everything needed to understand and rerun a cell whose verdict was not allowed."""
        expected = "|".join(sorted(v.value for v in self.expected)) or "?"
        lines = [
            f"cell {self.cell_id or '(command)'}: {self.verdict.value} (expected {expected}) — {self.reason}",
            f"  limit {_mib(self.limit)}, peak {_mib(self.peak)}, exit code {self.exit_code}, "
            f"{self.duration_s:.1f}s",
            f"  OOM signals: {self.oom.describe()}",
            f"  plan: {self.plan or 'not reported'}",
        ]
        if self.log_tail:
            lines.append(f"  last {len(self.log_tail)} log lines:")
            lines += [f"    | {line}" for line in self.log_tail]
        else:
            lines.append("  (no log output)")
        if self.repro:
            lines.append(f"  reproduce: {self.repro}")
        return "\n".join(lines)

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, repro: str = "", expected: frozenset[Verdict] = frozenset()
    ) -> Outcome:
        """The outcome a `cell` record holds (to_json's inverse, for messages about a results file): a field
        of the wrong type reads as absent; ValueError when the verdict is no verdict."""
        signals = data.get("oom")
        oom: Mapping[str, Any] = signals if isinstance(signals, dict) else {}
        report = data.get("report")
        tail = data.get("log_tail")
        return cls(
            verdict=Verdict(data.get("verdict")),
            reason=str(data.get("reason") or ""),
            limit=_number(data.get("limit"), int) or 0,
            peak=_number(data.get("peak"), int),
            oom=OomSignals(
                flag=oom.get("flag") is True,
                counter=_number(oom.get("counter"), int) or 0,
                sigkill=oom.get("sigkill") is True,
                limit_reached=oom.get("limit_reached") is True,
            ),
            plan=data["plan"] if isinstance(data.get("plan"), str) else None,
            exit_code=_number(data.get("exit_code"), int),
            duration_s=float(_number(data.get("duration_s"), float) or 0.0),
            log_tail=tuple(str(line) for line in tail) if isinstance(tail, list) else (),
            report=report if isinstance(report, dict) else None,
            cell_id=str(data.get("cell_id") or ""),
            repro=repro,
            expected=expected,
            agreement=_agreement_of(data.get("cosine_to_ours")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "limit": self.limit,
            "peak": self.peak,
            "oom": {
                "flag": self.oom.flag,
                "counter": self.oom.counter,
                "sigkill": self.oom.sigkill,
                "limit_reached": self.oom.limit_reached,
            },
            "plan": self.plan,
            "exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "log_tail": list(self.log_tail),
            "report": dict(self.report) if self.report is not None else None,
            **self.timeline.to_json(),
            **({"isolation": self.isolation.to_json()} if self.isolation is not None else {}),
            **({"cosine_to_ours": self.agreement.to_json()} if self.agreement is not None else {}),
        }


def _agreement_of(data: object) -> Agreement | None:
    if data is None:
        return None
    from gguf_sandbox.matrix.agreement import Agreement

    return Agreement.from_json(data)


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """`value` when it is a finite number of `kind` (an int is a float too; a bool is neither), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int and not isinstance(value, int):
        return None
    if isinstance(value, int):  # always finite, but math.isfinite(10**400) raises OverflowError
        return value if abs(value) <= MAX_SIZE else None
    return value if math.isfinite(value) else None


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / (1 << 20):.1f} MiB"


def peak_over_limit(peak: int | None, limit: int) -> str:
    """`41/64M` (peak and limit in MiB, rounded)."""
    peak_text = "?" if peak is None else str(round(peak / (1 << 20)))
    return f"{peak_text}/{round(limit / (1 << 20))}M"


def parse_report(stdout: str, required: Collection[str] = ()) -> dict[str, Any] | None:
    """The workload's report: the last line that is a JSON object having the `required` keys, or None."""
    for line in reversed(stdout.splitlines()):
        text = line.strip()
        if not (text.startswith("{") and text.endswith("}")):
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # a line nested 100,000 deep is no report either
            continue
        if isinstance(value, dict) and all(key in value for key in required):
            return value
    return None


def comparable(report: Mapping[str, Any] | None) -> object:
    """What a report offers for the reference comparison: its whole vectors of some texts (ours, for the
    peers compared with it), else its fingerprint floats, else its checksum."""
    if report is None:
        return None
    vectors = report.get("vectors")
    if isinstance(vectors, dict) and vectors:
        return vectors
    fingerprint = report.get("fingerprint")
    if isinstance(fingerprint, list) and fingerprint:
        return fingerprint
    return report.get("checksum") or None


def checksums_match(actual: object, reference: object) -> bool:
    """Numbers (and lists of numbers) within FINGERPRINT_TOL; anything else exactly."""
    if isinstance(actual, (int, float)) and isinstance(reference, (int, float)):
        try:
            return math.isclose(actual, reference, rel_tol=FINGERPRINT_TOL, abs_tol=FINGERPRINT_TOL)
        except OverflowError:  # an int no float holds (JSON's 10**400): equal only to itself
            return actual == reference
    if isinstance(actual, list) and isinstance(reference, list):
        return len(actual) == len(reference) and all(map(checksums_match, actual, reference))
    if isinstance(actual, Mapping) and isinstance(reference, Mapping):
        # Whole vectors of some texts (our workload's --vectors): each within tolerance, as a fingerprint.
        return actual.keys() == reference.keys() and all(
            checksums_match(actual[k], reference[k]) for k in actual
        )
    return actual == reference


def log_tail(result: RunResult, lines: int = LOG_TAIL_LINES) -> tuple[str, ...]:
    """The last lines of stderr, or of stdout when stderr is empty."""
    text = result.stderr if result.stderr.strip() else result.stdout
    return tuple(line.rstrip() for line in text.rstrip().splitlines()[-lines:])


def decide(
    result: RunResult,
    report: Mapping[str, Any] | None,
    reference: Reference | None = None,
    *,
    needs_report: bool = True,
    cell_id: str = "",
    repro: str = "",
    expected: frozenset[Verdict] = frozenset(),
) -> Outcome:
    """Apply the module's rule to one cell's RunResult and parsed report (`reference`: None when the cell
    is not compared with an unconstrained run)."""
    peak = result.peak_bytes if result.peak_bytes is not None else _report_int(report, "cgroup_peak")
    limit = result.limit_bytes
    signals = OomSignals(
        flag=result.oom_killed_flag,
        counter=result.oom_kill_count,
        sigkill=result.killed_by_sigkill,
        limit_reached=peak is not None and limit > 0 and peak >= limit - limit_slack(limit),
    )
    agreed = None
    if reference is not None and reference.min_cosine is not None:
        from gguf_sandbox.matrix.agreement import agreement

        agreed = agreement(comparable(report), reference.values)
    verdict, reason = _verdict(result, report, reference, signals, needs_report, agreed=agreed)
    plan = report.get("plan") if report is not None else None
    return Outcome(
        verdict=verdict,
        reason=reason,
        limit=limit,
        peak=peak,
        oom=signals,
        plan=str(plan) if plan is not None else None,
        exit_code=result.exit_code,
        duration_s=result.duration_s,
        log_tail=log_tail(result),
        report=report,
        cell_id=cell_id,
        repro=repro,
        expected=expected,
        timeline=result.timeline,
        isolation=result.isolation if result.isolation.held or result.isolation.missing else None,
        agreement=agreed,
    )


def _verdict(
    result: RunResult,
    report: Mapping[str, Any] | None,
    reference: Reference | None,
    signals: OomSignals,
    needs_report: bool,
    *,
    agreed: Agreement | None = None,
) -> tuple[Verdict, str]:
    if signals.kernel_kill:
        return Verdict.OOM, "the kernel OOM-killed a process in the cell"
    if signals.sigkill and signals.limit_reached and not result.timed_out:
        return Verdict.OOM, "SIGKILL with the peak at the limit (no OOM record survived)"
    if result.timed_out:
        return Verdict.TIMEOUT, "stopped at the wall-clock timeout"
    if result.exit_code == 0:
        if report is None and not needs_report:
            return Verdict.PASS, "exit 0 (a command: no report is expected)"
        return _finished(report, reference, agreed)
    if result.exit_code == REFUSAL_EXIT_CODE:
        error = _refusal(report, result.stderr)
        if error is not None:
            return Verdict.REFUSED, f"refused: {error}"
        return Verdict.CRASH, "exit 3 without a JSON error (not a graceful refusal)"
    if signals.sigkill:
        return Verdict.CRASH, "SIGKILL below the limit and without an OOM record"
    return Verdict.CRASH, f"exit code {result.exit_code}"


def _finished(
    report: Mapping[str, Any] | None, reference: Reference | None, agreed: Agreement | None = None
) -> tuple[Verdict, str]:
    if report is None:
        return Verdict.CRASH, "exit 0 without a JSON report on stdout"
    if reference is not None and reference.min_cosine is not None:
        return _agreeing(reference, agreed)
    if reference is not None:
        actual = comparable(report)
        if reference.failure is not None:
            return Verdict.ERROR, f"cannot be judged: {reference.failure}"
        if reference.values is None:
            return Verdict.ERROR, "cannot be judged: the unconstrained reference reported no vectors"
        if actual is None:
            return Verdict.ERROR, "cannot be judged: the report carries no vectors to compare"
        if not checksums_match(actual, reference.values):
            return (
                Verdict.WRONG,
                f"vectors differ from the unconstrained reference: {_difference(actual, reference.values)}",
            )
    if report.get("degraded") is True:
        preferred = report.get("preferred_plan")
        return Verdict.DEGRADED, f"finished on plan {report.get('plan')!r} instead of {preferred!r}"
    return Verdict.PASS, "finished"


def _agreeing(reference: Reference, agreed: Agreement | None) -> tuple[Verdict, str]:
    """A peer's verdict against ours: PASS when its vectors agree to min_cosine, else WRONG (or ERROR)."""
    if reference.failure is not None:
        return Verdict.ERROR, f"cannot be judged: {reference.failure}"
    if agreed is None:
        return (
            Verdict.ERROR,
            "cannot be judged: the peer and ours carry no vectors of common texts to compare",
        )
    if reference.min_cosine is not None and agreed.smallest < reference.min_cosine:
        return Verdict.WRONG, f"vectors differ from ours: {agreed.describe()} < {reference.min_cosine}"
    return Verdict.PASS, f"finished; {agreed.describe()}"


def _difference(actual: object, reference: object) -> str:
    """Where two compared values part: the first differing items of fingerprint lists, else both values."""
    if isinstance(actual, list) and isinstance(reference, list):
        if len(actual) != len(reference):
            return f"{len(actual)} values against the reference's {len(reference)}"
        differing = [
            i for i, (a, r) in enumerate(zip(actual, reference, strict=True)) if not checksums_match(a, r)
        ]
        shown = ", ".join(f"[{i}] {actual[i]!r} vs {reference[i]!r}" for i in differing[:3])
        return f"{len(differing)} of {len(actual)} differ, e.g. {shown}"
    if isinstance(actual, Mapping) and isinstance(reference, Mapping):
        if actual.keys() != reference.keys():
            return f"vectors of other texts than the reference's ({len(actual)} against {len(reference)})"
        texts = [k for k in actual if not checksums_match(actual[k], reference[k])]
        first = texts[0]
        example = _difference(actual[first], reference[first])
        return f"the vectors of {len(texts)} of {len(actual)} texts, e.g. text {first}: {example}"
    return f"{actual!r} vs {reference!r}"


def _refusal(report: Mapping[str, Any] | None, stderr: str) -> str | None:
    """The refusal's message when a JSON error was printed (stdout report or a stderr line)."""
    for candidate in (report, parse_report(stderr)):
        if candidate is not None and "error" in candidate:
            kind = candidate.get("kind")
            return f"{kind}: {candidate['error']}" if kind else str(candidate["error"])
    return None


def _report_int(report: Mapping[str, Any] | None, key: str) -> int | None:
    """A size the report states (cgroup_peak), when one from 0 to MAX_SIZE: the report is untrusted."""
    value = report.get(key) if report is not None else None
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE else None
    )
