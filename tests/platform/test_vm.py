"""The platform end to end: boots the guest (minutes under TCG), so only when GGUF_SANDBOX_VM=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.platform.cgroup_v2 import main
from tests.platform.image import missing_tools

VM_VARIABLE = "GGUF_SANDBOX_VM"

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get(VM_VARIABLE) != "1", reason=f"boots a QEMU guest: set {VM_VARIABLE}=1"),
]


def test_guest_runs_a_control_cell_on_cgroup_v2_as_root_and_as_a_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing host tools: {' '.join(missing)}")
    k = "64m-alloc-bomb"
    status = main(["--out", str(tmp_path), "--no-pytest", "-k", k, "--k-user", k])
    printed = capsys.readouterr().out
    assert (
        "controllers: " in printed
        and " memory " in printed.split("controllers: ", 1)[1].splitlines()[0] + " "
    )
    assert "oom_kill" in printed  # the control's OOM kill came from memory.events, as root and as the user
    assert status == 0, printed[-3000:]
