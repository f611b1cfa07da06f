"""The README's generated parts equal what they are generated from."""

from __future__ import annotations

import re
from pathlib import Path

from gguf_sandbox.floors import FLOORS_FILE, load_floors, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
FLOORS_BLOCK = re.compile(r"<!-- floors: .*? -->\n(.*?)\n<!-- /floors -->", re.S)
PEERS_BLOCK = re.compile(r"<!-- peers: .*? -->\n(.*?)\n<!-- /peers -->", re.S)


def test_the_floor_table_is_the_floors_file() -> None:
    block = FLOORS_BLOCK.search(README.read_text(encoding="utf-8"))
    assert block is not None, "README.md has no <!-- floors: … --> block"
    assert block.group(1) == markdown_table(load_floors(FLOORS_FILE)), (
        "README's floor table is stale; regenerate it: "
        "python -c 'from gguf_sandbox.floors import *; print(markdown_table(load_floors()))'"
    )


def test_the_peers_table_is_the_floors_of_the_peers_profile() -> None:
    from gguf_sandbox.matrix.load import load

    block = PEERS_BLOCK.search(README.read_text(encoding="utf-8"))
    assert block is not None, "README.md has no <!-- peers: … --> block"
    profile = load(README.parent / "matrix.yaml", profile="peers")
    expected = markdown_table(load_floors(FLOORS_FILE), set(profile.workloads), set(profile.pythons))
    assert block.group(1) == expected, (
        "README's peers table is stale; regenerate it from floors.json over the peers profile's workloads"
    )
