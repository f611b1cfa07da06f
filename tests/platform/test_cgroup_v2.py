"""The driver's pure parts: the plan for the guest, selections, the models key, the summary."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.platform.cgroup_v2 import (
    K_ROOT,
    K_USER,
    PROFILE,
    Selection,
    kvm_problem,
    models_key,
    plan_env,
    selections,
    summarize,
)
from tests.platform.qemu import RunOutcome, parse_markers

REPO = Path(__file__).resolve().parents[2]


def test_plan_env_is_shell_that_guest_sh_reads_back_verbatim(tmp_path: Path) -> None:
    chosen = [Selection("root", "cgroup-v2", "64m and (a or b)"), Selection("user", None, "it's")]
    script = tmp_path / "plan.env"
    script.write_text(plan_env(chosen, ["tests/a.py", "tests/b"], [], ["t.py::a", "t.py::b"]))
    # The same expansion guest.sh uses: MATRIX_<NAME> into an argument array.
    shown = subprocess.run(
        [
            "bash",
            "-c",
            f". {shlex.quote(str(script))};"
            ' printf \'%s|\' "$PYTEST_PATHS" "$PYTEST_USER_PATHS" "$PYTEST_DESELECT";'
            ' for name in $MATRIX_RUNS; do var="MATRIX_${name^^}"; eval "args=(${!var})";'
            " printf '[%s]' \"${args[@]}\"; printf '|'; done",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.split("|") == [
        "tests/a.py tests/b",
        "",
        "--deselect=t.py::a --deselect=t.py::b",
        "[--profile][cgroup-v2][-k][64m and (a or b)]",
        "[-k][it's]",
        "",
    ]


def test_empty_selections_are_left_out() -> None:
    assert selections("a", "") == ([Selection("root", PROFILE, "a")], [])
    assert selections("", "b", "p") == ([], [Selection("user", "p", "b")])
    assert Selection("root", "ci", "x").run_args() == ["--profile", "ci", "-k", "x"]


def test_default_selections_pick_cells_of_the_repos_matrix() -> None:
    from gguf_sandbox.matrix.expand import expand_cells
    from gguf_sandbox.matrix.load import load

    matrix = load(str(REPO / "matrix.yaml"), profile=PROFILE)
    root = [cell.cell_id for cell in expand_cells(matrix, ["cgroup"], K_ROOT)]
    user = [cell.cell_id for cell in expand_cells(matrix, ["cgroup"], K_USER)]
    workloads = (
        "parse",
        "stream",
        "embed",
        "mcp",
        "naive-load",
        "alloc-bomb",
        "refusing-engine",
        "perturbed-engine",
    )
    for workload in workloads:
        assert any(f"-64m-{workload}-" in f"{cell}-" for cell in root), workload
    assert all(cell.startswith("cgroup-py3.11-64m-") for cell in [*root, *user])
    assert user and set(user) <= set(root)


def test_models_key_follows_names_sizes_and_times(tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"1")
    second.write_bytes(b"22")
    key = models_key([first, second])
    assert models_key([second, first]) == key
    os.utime(first, ns=(0, 0))
    assert models_key([first, second]) != key


def _outcome(text: str, killed: str | None = None) -> RunOutcome:
    return RunOutcome(
        returncode=None if killed else 0, killed=killed, seconds=1.0, report=parse_markers(text)
    )


def _results(path: Path, verdicts: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"kind": "cell", "cell_id": c, "verdict": v}) + "\n" for c, v in verdicts.items())
    )


GOOD = (
    "@@gguf-v2 fact controllers cpuset cpu io memory pids\n@@gguf-v2 step a rc=0 seconds=1\n@@gguf-v2 done\n"
)


def test_summary_passes_when_verdicts_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _results(tmp_path / "v1-root.jsonl", {"c-py3.11-64m-parse": "pass", "c-py3.11-64m-alloc-bomb": "oom"})
    _results(
        tmp_path / "guest/out/v2-root.jsonl",
        {"c-py3.11-64m-parse": "pass", "c-py3.11-64m-alloc-bomb": "oom"},
    )
    _results(tmp_path / "guest/out/v2-user.jsonl", {"c-py3.11-64m-alloc-bomb": "oom"})
    chosen = [Selection("root", "ci", "py3.11"), Selection("user", "ci", "alloc-bomb")]
    assert summarize(_outcome(GOOD), tmp_path, chosen, host=True) == 0
    printed = capsys.readouterr().out
    assert "controllers: cpuset cpu io memory pids" in printed
    assert "DIFF" not in printed


@pytest.mark.parametrize(
    "case",
    [
        (GOOD, {"x": "timeout"}, None, "x: v1 pass vs v2 timeout"),
        (GOOD.replace("rc=0", "rc=1"), {"x": "pass"}, None, "guest step a failed"),
        (GOOD.replace("memory ", ""), {"x": "pass"}, None, "lacks memory"),
        (GOOD.replace("@@gguf-v2 done\n", ""), {"x": "pass"}, None, "never reported done"),
        (GOOD, {}, "timeout after 5 s", "the VM was killed: timeout after 5 s"),
    ],
    ids=["verdict-differs", "step-failed", "no-memory-controller", "not-done", "killed"],
)
def test_summary_fails_with_the_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, dict[str, str], str | None, str],
) -> None:
    guest, v2, killed, problem = case
    _results(tmp_path / "v1-root.jsonl", {"x": "pass"})
    _results(tmp_path / "guest/out/v2-root.jsonl", v2)
    (tmp_path / "console.log").write_text("booting\n")
    assert summarize(_outcome(guest, killed), tmp_path, [Selection("root", "ci", "x")], host=True) == 1
    assert problem in capsys.readouterr().out


def test_kvm_on_a_pvm_host_is_refused_with_a_hint(tmp_path: Path) -> None:
    module = tmp_path / "kvm_pvm"
    assert kvm_problem(module) is None
    module.mkdir()
    assert "--accel tcg" in (kvm_problem(module) or "")
