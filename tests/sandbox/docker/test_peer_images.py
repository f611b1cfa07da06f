"""Peer images: tagged per Python, rebuilt when the cell image, requirements or wheels change."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.docker.peer_images import DOCKERFILE, peer_hash, peer_tag
from gguf_sandbox.sandbox.wheelhouse import PEER_REQUIREMENTS

REPO = Path(__file__).resolve().parents[3]


def test_peer_images_are_tagged_per_python() -> None:
    assert peer_tag("3.12") == "gguf-sandbox-peers:py3.12"
    with pytest.raises(SandboxError, match=r"not of the form 3\.X"):
        peer_tag("3.12; rm -rf /")


def test_the_hash_follows_the_cell_image_the_requirements_and_the_wheels(tmp_path: Path) -> None:
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"one")
    first = peer_hash("sha256:aa", PEER_REQUIREMENTS, [wheel])
    assert first == peer_hash("sha256:aa", PEER_REQUIREMENTS, [wheel])
    assert first != peer_hash("sha256:bb", PEER_REQUIREMENTS, [wheel])
    assert first != peer_hash("sha256:aa", PEER_REQUIREMENTS[:-1], [wheel])
    wheel.write_bytes(b"two")
    assert first != peer_hash("sha256:aa", PEER_REQUIREMENTS, [wheel])


def test_the_peer_dockerfile_installs_from_the_wheelhouse_and_compiles_nothing() -> None:
    text = (REPO / DOCKERFILE).read_text()
    assert "FROM ${BASE_IMAGE}" in text and "COPY wheels/ /wheels/" in text
    assert "pip install --find-links /wheels ${PEER_REQUIREMENTS}" in text
    assert "--no-binary" not in text and "libgomp1" in text
    assert text.rstrip().splitlines()[-1] == "USER ${SANDBOX_UID}:${SANDBOX_UID}"
