"""Cell images with the peers: gguf-sandbox:py3.X plus the wheelhouse's wheels and the peer engines."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.docker.context import build_ca_bundle, build_lock, context_tar
from gguf_sandbox.sandbox.docker.engine import Log, docker_build, image_id_of, labels_of, quiet, tag_image
from gguf_sandbox.sandbox.docker.images import BUILD_NETWORK, SANDBOX_UID, ImageBuild, build_image
from gguf_sandbox.sandbox.docker.names import BASE_LABEL, HASH_LABEL, checked_version
from gguf_sandbox.sandbox.interpreters import find_interpreter
from gguf_sandbox.sandbox.wheelhouse import SOURCE_BUILT, ensure_wheels, find_wheel

if TYPE_CHECKING:
    import docker

PEERS_REPOSITORY = "gguf-sandbox-peers"
DOCKERFILE = Path("images") / "peers.Dockerfile"


def peer_tag(python: str) -> str:
    """e.g. gguf-sandbox-peers:py3.12."""
    return f"{PEERS_REPOSITORY}:py{checked_version(python)}"


def build_peer_image(
    python: str,
    project_dir: Path,
    requirements: Sequence[str],
    *,
    client: docker.DockerClient,
    log: Log = quiet,
) -> ImageBuild:
    """The peer image for `python`, rebuilt when the cell image, the requirements or the wheels changed.

    The wheels PyPI has only as source come from the wheelhouse (compiled on the host by a Python of the
    same version, once); everything else pip fetches from the index during the build.
    """
    started = time.monotonic()
    base = build_image(python, project_dir, client=client, log=log)
    host = find_interpreter(python)
    if host is None:
        raise SandboxError(
            f"no Python {python} on this host to compile the peers' wheels with; hint: install it (pyenv, uv)"
        )
    wheelhouse = ensure_wheels(host.path, python, requirements)
    wheels = [
        wheel
        for requirement in requirements
        if requirement in SOURCE_BUILT
        for wheel in [find_wheel(wheelhouse, requirement, python)]
        if wheel is not None
    ]
    dockerfile = project_dir / DOCKERFILE
    if not dockerfile.is_file():
        raise SandboxError(f"cannot build a peer image: {dockerfile} is missing; hint: pass the project root")
    digest = peer_hash(base.image_id, requirements, [*wheels, dockerfile])
    tag = peer_tag(python)
    labels = labels_of(client, tag)
    if labels is not None and labels.get(HASH_LABEL) == digest:
        return ImageBuild(tag, image_id_of(client, tag), digest, True, base.tag, time.monotonic() - started)
    with build_lock(f"{PEERS_REPOSITORY}-py{python}"):
        files = [("Dockerfile", dockerfile), *((f"wheels/{w.name}", w) for w in wheels), *build_ca_bundle()]
        log(f"building {tag} on {base.tag}")
        with context_tar(files) as context:
            image_id = docker_build(
                context,
                buildargs={
                    "BASE_IMAGE": base.tag,
                    "PEER_REQUIREMENTS": " ".join(requirements),
                    "SANDBOX_UID": str(SANDBOX_UID),
                },
                labels={HASH_LABEL: digest, BASE_LABEL: base.tag},
                network_mode=BUILD_NETWORK,
                log=log,
            )
        tag_image(client, image_id, tag)
    return ImageBuild(tag, image_id, digest, False, base.tag, time.monotonic() - started)


def peer_hash(base_image_id: str, requirements: Sequence[str], files: Sequence[Path]) -> str:
    """What a peer image is made of: the cell image, the requirements, the wheels and the Dockerfile."""
    digest = hashlib.sha256(f"gguf-sandbox-peers:{base_image_id}\0{' '.join(requirements)}\0".encode())
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
