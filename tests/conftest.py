"""Shared fixtures: skip cleanly where the machine lacks what a test needs."""

from __future__ import annotations

import pytest

from gguf_sandbox.sandbox.cgroup import cgroups_writable


@pytest.fixture(scope="session")
def writable_cgroups() -> None:
    """Skip unless run_limited can create limited child memory cgroups here (reason from cgroups_writable)."""
    reason = cgroups_writable()
    if reason is not None:
        pytest.skip(reason)
