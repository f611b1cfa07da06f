"""`gguf-sandbox floor`: the bisection against fake probes, and one real bisection in a memory cgroup."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.floors import Floor, FloorsError, FloorTable, load_floors, record_floor, save_floors
from gguf_sandbox.matrix.expand import expand_cells
from gguf_sandbox.matrix.floor import FINISHED, FloorContext, Probe, Prober, Run, bisect
from gguf_sandbox.matrix.verdicts import Verdict

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
TOUCH_100_MIB = "b = bytearray(100 << 20); b[::4096] = b'x' * len(b[::4096])"


def fake(needs: int, flaky: set[int] | None = None) -> tuple[Callable[[int], Probe], list[int]]:
    """A cell that finishes from `needs` bytes up (except at `flaky` limits), refusing below."""
    probed: list[int] = []

    def probe(limit: int) -> Probe:
        probed.append(limit)
        ok = limit >= needs and limit not in (flaky or set())
        verdict = Verdict.PASS if ok else Verdict.REFUSED
        return Probe(limit, (Run(verdict, min(limit, needs), 0.1, "fake"),))

    return probe, probed


@pytest.mark.parametrize(
    ("needs_mib", "low", "high", "resolution", "floor_mib"),
    [
        (50, 16, 1024, 1, 50),
        (50, 16, 1024, 4, 52),  # the smallest multiple of the resolution that finishes
        (1024, 16, 1024, 1, 1024),
        (16, 16, 1024, 1, 16),
        (3, 16, 1024, 1, 16),  # finishes at the lowest limit probed: said so, not hidden
    ],
    ids=["1m", "4m", "at-max", "at-min", "below-min"],
)
def test_bisect_finds_the_smallest_finishing_limit(
    needs_mib: int, low: int, high: int, resolution: int, floor_mib: int
) -> None:
    probe, probed = fake(needs_mib * MIB)
    search = bisect(probe, low * MIB, high * MIB, resolution * MIB)
    assert search.floor is not None and search.floor.limit == floor_mib * MIB
    assert probed[0] == high * MIB  # the upper bound first
    assert len(probed) <= 12
    assert search.lower_bound_finished == (floor_mib == low)
    assert all(p.finished == (p.limit >= needs_mib * MIB) for p in search.probes)


def test_bisect_reports_no_floor_when_the_upper_bound_fails() -> None:
    probe, probed = fake(2048 * MIB)
    search = bisect(probe, 16 * MIB, 1024 * MIB, MIB)
    assert search.floor is None and probed == [1024 * MIB]


@pytest.mark.parametrize(("low", "high", "resolution"), [(0, 10, 1), (10, 5, 1), (10, 20, 0), (5, 7, 8)])
def test_bisect_rejects_bad_bounds(low: int, high: int, resolution: int) -> None:
    probe, _ = fake(1)
    with pytest.raises(MatrixError, match="floor"):
        bisect(probe, low, high, resolution)


def test_a_probe_finishes_only_when_every_run_did() -> None:
    runs = (Run(Verdict.PASS, 10, 1.0, ""), Run(Verdict.DEGRADED, 12, 1.0, ""), Run(Verdict.OOM, 64, 1.0, ""))
    assert Probe(64, runs[:2]).finished and Probe(64, runs[:2]).peak == 12
    assert not Probe(64, runs).finished
    assert {Verdict.PASS, Verdict.DEGRADED} == FINISHED


def test_a_failed_probes_line_says_why_in_one_line() -> None:
    refusal = "BudgetExceeded: the pass (12.0 MiB) does not fit beside the weights\nTraceback (most recent …"
    finished = Run(Verdict.DEGRADED, 50 << 20, 1.0, "finished on plan 'streaming' instead of 'resident-f32'")
    line = Probe(52 << 20, (finished, Run(Verdict.REFUSED, 51 << 20, 1.0, refusal))).line()
    assert "failed" in line and "\n" not in line
    assert line.endswith("(BudgetExceeded: the pass (12.0 MiB) does not fit beside the weights)")
    long = Probe(52 << 20, (Run(Verdict.OOM, None, 1.0, "x" * 1000),)).line()
    assert long.endswith("…)") and len(long) < 300
    # A finished probe needs no reason, even when its runs carry one (degraded: which plan).
    assert "(" not in Probe(52 << 20, (finished,)).line().split("M", 1)[1]


def floor_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "floor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--min", "0", "--", "python", "-c", "pass"],
        ["--repeat", "0", "--", "python", "-c", "pass"],
        ["--resolution", "lots", "--", "python", "-c", "pass"],
        ["--workload", "embed", "--", "python", "-c", "pass"],
        [],
        ["--record", "--", "python", "-c", "pass"],
    ],
    ids=["min-0", "repeat-0", "resolution", "both", "neither", "record-a-command"],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    done = floor_cli("--backend", "cgroup", *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("gguf-sandbox floor: error:") and "Traceback" not in done.stderr


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_a_real_bisection_finds_an_allocations_floor() -> None:
    """100 MiB of touched memory plus the interpreter: the floor lies a few MiB above 100 MiB."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = floor_cli(
        "--python", python, "--backend", "cgroup", "--min", "64m", "--max", "160m", "--resolution", "2m",
        "--repeat", "2", "--json", "--", "python", "-c", TOUCH_100_MIB,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 100 * MIB < result["floor"] <= 120 * MIB
    assert result["verdict"] in ("pass", "degraded") and result["backend"] == "cgroup"
    assert {"floor", "peak", "verdict", "python", "backend", "probes"} <= set(result)
    below = [p for p in result["probes"] if p["limit"] < result["floor"]]
    assert below and all(not p["finished"] for p in below)
    assert all(p["finished"] for p in result["probes"] if p["limit"] >= result["floor"])


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_no_floor_below_the_upper_bound_exits_1_and_says_so() -> None:
    done = floor_cli(
        "--backend", "cgroup", "--min", "32m", "--max", "48m", "--repeat", "1",
        "--", "python", "-c", TOUCH_100_MIB.replace("100", "200"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "does not finish even at --max 48m (oom" in done.stderr


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_record_writes_the_workloads_floor(tmp_path: Path, minilm_gguf: Callable[[str], Path]) -> None:
    model = minilm_gguf("q8_0")
    floors = tmp_path / "floors.json"
    done = floor_cli(
        "--backend", "cgroup", "--workload", "parse", "--model", str(model),
        "--min", "24m", "--max", "64m", "--resolution", "8m", "--repeat", "1", "--record", str(floors),
        cwd=tmp_path,  # no matrix.yaml there: the built-in workload and the file are enough
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (recorded,) = load_floors(floors).floors
    assert recorded.workload == "parse" and recorded.backend == "cgroup"
    assert recorded.floor % (8 * MIB) == 0 and recorded.repeat == 1
    assert recorded.measured_on["python"].startswith(recorded.python)
    assert "numpy" in recorded.measured_on and "date" in recorded.measured_on


@pytest.mark.cgroup
@pytest.mark.slow
@pytest.mark.usefixtures("writable_cgroups", "minilm_dir")
def test_the_recorded_mcp_floor_still_holds() -> None:
    """CI's re-measurement at 4 MiB: the mcp workload (1000 calls, cold cache) still serves at its recorded
    floor on the cgroup backend. A new mcp, numpy or Python that raised it fails here, not in a user's cell.
    (serve refuses below its recorded floor, so the search cannot land lower: only a rise is visible.)"""
    python = "3.12"
    recorded = load_floors().find("mcp", "minilm_q8_0", python, "cgroup")
    assert recorded is not None, "no recorded mcp floor for Python 3.12 on cgroup"
    done = floor_cli(
        "--workload", "mcp", "--model", "minilm_q8_0", "--python", python, "--backend", "cgroup",
        "--min", f"{(recorded.floor >> 20) - 4}m", "--max", f"{recorded.floor >> 20}m", "--resolution", "4m",
        "--repeat", "1", "--json",
        cwd=REPO, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"the mcp floor moved above the recorded {recorded.floor >> 20} MiB: {done.stderr}"
    )
    assert json.loads(done.stdout)["floor"] <= recorded.floor


@pytest.mark.parametrize(
    "seconds",
    [math.nan, math.inf, -1.0, True, 10**400, "12"],
    ids=["nan", "inf", "negative", "bool", "huge-int", "text"],
)
def test_a_hostile_reports_seconds_never_reach_the_floors_file(tmp_path: Path, seconds: object) -> None:
    """A run's report is untrusted: its seconds were recorded as given, and a NaN left a floors file that
    load_floors (every run, serve) refused afterwards — or 10**400 ended the probe in an OverflowError."""
    from tests.matrix.test_runner import FakeSandbox, build, finished, report

    cell = next(
        c
        for c in expand_cells(build(tmp_path), backends=["cgroup"], cache_dir=tmp_path)
        if c.workload == "embed"
    )
    sandbox = FakeSandbox("cgroup", behave=lambda spec: finished(spec, report(seconds=seconds)))
    prober = Prober(sandbox, cell, 1, cold=False, out=lambda line: None)
    probe = prober(cell.spec.memory)
    assert probe.finished and probe.seconds is None
    context = FloorContext(cell, "3.11", "cgroup", MIB, 1, cold=False)
    record_floor(context.record(probe, {}), tmp_path / "floors.json")
    (recorded,) = load_floors(tmp_path / "floors.json").floors
    assert recorded.seconds is None and recorded.floor == cell.spec.memory


def test_a_floor_with_a_number_json_lacks_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "floors.json"
    good = Floor("embed", "m", "3.12", "cgroup", 64 * MIB, None, MIB, 1)
    save_floors(FloorTable((good,)), path)
    with pytest.raises(FloorsError, match=r"not written, floors\[1\]\.seconds: expected a finite number"):
        record_floor(replace(good, workload="llama-cpp", seconds=math.nan), path)
    # A peak of 0 (a report's cgroup_peak stands in where the backend measured none) load_floors refuses.
    with pytest.raises(
        FloorsError, match=r"not written, floors\[1\]\.peak: expected a positive integer, got 0"
    ):
        record_floor(replace(good, workload="mcp", peak=0), path)
    assert load_floors(path).floors == (good,)
