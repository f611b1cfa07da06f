"""The Docker engine: a client that answered, image labels and tags, builds on a private connection."""

from __future__ import annotations

import collections
import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gguf_sandbox.errors import SandboxError

if TYPE_CHECKING:
    import docker


Log = Callable[[str], None]


def quiet(_: str) -> None:
    """The default progress sink: say nothing."""


def engine_address() -> str:
    """The engine the docker SDK talks to (DOCKER_HOST, else the default socket)."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def engine_client() -> docker.DockerClient:
    """A docker SDK client whose engine answered a ping, else SandboxError saying how to get one."""
    try:
        import docker
    except ImportError as error:
        raise SandboxError(
            f"the docker SDK is not installed ({error}); hint: pip install 'gguf-sandbox[docker]'"
        ) from error
    import requests

    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise SandboxError(
            f"no Docker engine reachable at {engine_address()}: {error}; "
            "hint: start dockerd or use --backend cgroup"
        ) from error
    return client


def labels_of(client: docker.DockerClient, ref: str) -> dict[str, str] | None:
    """The labels of a local image, {} when it has none, None when there is no such image."""
    import docker

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    return dict(labels)


def image_id_of(client: docker.DockerClient, ref: str) -> str:
    return str(client.images.get(ref).id)


def tag_image(client: docker.DockerClient, image_id: str, ref: str) -> None:
    """Point `ref` at a finished image and drop the image it replaces (kept if something still uses it)."""
    import docker

    try:
        previous: str | None = image_id_of(client, ref)
    except docker.errors.ImageNotFound:
        previous = None
    repository, tag = ref.rsplit(":", 1)
    if not client.api.tag(image_id, repository, tag, force=True):
        raise SandboxError(f"docker refused to tag {image_id} as {ref}")
    if previous is not None and previous != image_id:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(previous)


def docker_build(
    context: Path,
    *,
    buildargs: dict[str, str],
    labels: dict[str, str],
    network_mode: str,
    log: Log,
) -> str:
    """Build a tar context on a private connection; returns the image id. Nothing is tagged here.

    The connection is private so that closing it on any exit (Ctrl-C included) cancels the build on the
    daemon side; forcerm makes the daemon remove the intermediate containers of a failed build.
    """
    client = engine_client()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    image_id: str | None = None
    try:
        with open(context, "rb") as fileobj:
            stream = client.api.build(
                fileobj=fileobj,
                custom_context=True,
                dockerfile="Dockerfile",
                buildargs=buildargs,
                labels=labels,
                network_mode=network_mode,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    lines = "\n".join(tail)
                    raise SandboxError(f"docker build failed: {chunk['error'].strip()}\n{lines}")
                text = str(chunk.get("stream", ""))
                for line in text.splitlines():
                    if line.strip():
                        tail.append(line)
                        log(line)
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = str(aux["ID"])
                built = re.match(r"Successfully built ([0-9a-f]+)", text)
                if built and image_id is None:
                    image_id = image_id_of(client, built.group(1))
    finally:
        client.close()
    if image_id is None:
        raise SandboxError("docker build finished without reporting an image id:\n" + "\n".join(tail))
    return image_id


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
