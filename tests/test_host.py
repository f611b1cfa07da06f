"""Tests for host.py: the facts a run header and a floor record name."""

from __future__ import annotations

import os
import re

from gguf_sandbox.host import host_facts


def test_host_facts_name_the_machine_in_short_strings() -> None:
    facts = host_facts()
    assert set(facts) == {"name", "os", "kernel", "machine", "cpus", "memory", "cgroup", "python"}
    assert all(isinstance(value, str) and value and len(value) < 200 for value in facts.values())
    usable, total = map(int, re.fullmatch(r"(\d+) of (\d+)", facts["cpus"]).groups())  # type: ignore[union-attr]
    assert 1 <= usable <= total == os.cpu_count()
    assert usable == len(os.sched_getaffinity(0))
    assert re.fullmatch(r"\d+\.\d GiB", facts["memory"])
    assert facts["cgroup"] in {"v1", "v2", "none"}
    assert facts["kernel"] == os.uname().release
