"""Per-Python Docker images for the matrix: a registry base when one can be pulled, else an offline base."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.docker.context import (
    build_ca_bundle,
    build_lock,
    content_hash,
    context_tar,
    find_project_dir,
    project_files,
)
from gguf_sandbox.sandbox.docker.engine import (
    Log,
    docker_build,
    engine_client,
    image_id_of,
    labels_of,
    one_line,
    quiet,
    tag_image,
)
from gguf_sandbox.sandbox.docker.names import (
    BASE_LABEL,
    HASH_LABEL,
    IMAGE_REPOSITORY,
    checked_version,
    image_tag,
)
from gguf_sandbox.sandbox.docker.offline import resolve_base

if TYPE_CHECKING:
    import docker

SANDBOX_UID = 10001
DEFAULT_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# Network of build containers: the daemon may run with --bridge=none, and pip must reach PyPI.
BUILD_NETWORK = "host"


@dataclass(frozen=True)
class ImageBuild:
    """The outcome of ensure/build: which tag, whether the cache answered, what it was built on."""

    tag: str
    image_id: str
    content_hash: str
    cached: bool
    base_image: str
    seconds: float


def build_image(
    python: str,
    project_dir: str | Path,
    *,
    client: docker.DockerClient | None = None,
    force: bool = False,
    log: Log = quiet,
    repository: str = IMAGE_REPOSITORY,
) -> ImageBuild:
    """Make <repository>:py3.X current for the sources in `project_dir`; rebuild only when they changed."""
    client = client or engine_client()
    import docker
    import requests

    try:
        return _build_image(
            python, Path(project_dir), client=client, force=force, log=log, repository=repository
        )
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise SandboxError(
            f"the Docker engine failed while making {repository}:py{python}: {one_line(error)}; "
            "hint: check `docker info` and retry with `gguf-sandbox images build -v`"
        ) from error


def _build_image(
    python: str,
    project_dir: Path,
    *,
    client: docker.DockerClient,
    force: bool,
    log: Log,
    repository: str,
) -> ImageBuild:
    started = time.monotonic()
    tag = f"{repository}:py{checked_version(python)}"
    files = project_files(project_dir)
    digest = content_hash(python, files)

    def cached() -> ImageBuild | None:
        labels = labels_of(client, tag)
        if force or labels is None or labels.get(HASH_LABEL) != digest:
            return None
        base = labels.get(BASE_LABEL, "")
        return ImageBuild(tag, image_id_of(client, tag), digest, True, base, time.monotonic() - started)

    hit = cached()
    if hit is not None:
        return hit
    with build_lock(f"{repository}-py{python}"):
        hit = cached()
        if hit is not None:
            return hit
        base = resolve_base(python, client, log)
        log(f"building {tag} on {base}")
        with context_tar(files + build_ca_bundle()) as context:
            image_id = docker_build(
                context,
                buildargs={"PYTHON_VERSION": python, "BASE_IMAGE": base, "SANDBOX_UID": str(SANDBOX_UID)},
                labels={HASH_LABEL: digest, BASE_LABEL: base},
                network_mode=BUILD_NETWORK,
                log=log,
            )
        tag_image(client, image_id, tag)
    return ImageBuild(tag, image_id, digest, False, base, time.monotonic() - started)


def ensure_image(python: str, project_dir: str | Path) -> str:
    """The tag of an up-to-date cell image for `python` (3.X), building it when missing or stale."""
    return build_image(python, project_dir).tag


def image_is_current(python: str, project_dir: str | Path, client: docker.DockerClient) -> bool:
    """True when gguf-sandbox:py3.X exists and was built from the current sources."""
    labels = labels_of(client, image_tag(python))
    digest = content_hash(python, project_files(Path(project_dir)))
    return labels is not None and labels.get(HASH_LABEL) == digest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="images_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build (or confirm cached) gguf-sandbox:py3.X images")
    listing = actions.add_parser("list", help="show each version's image and whether it is current")
    for sub in (build, listing):
        sub.add_argument(
            "--python",
            nargs="+",
            default=list(DEFAULT_PYTHONS),
            metavar="3.X",
            help=f"Python versions (default: {' '.join(DEFAULT_PYTHONS)})",
        )
        sub.add_argument("--project", type=Path, default=None, help="source checkout to install")
    build.add_argument("--force", action="store_true", help="rebuild even when the content hash matches")
    build.add_argument("-v", "--verbose", action="store_true", help="stream the build output")


def run(args: argparse.Namespace) -> int:
    project = find_project_dir(args.project)
    client = engine_client()
    if args.images_action == "list":
        for python in args.python:
            labels = labels_of(client, image_tag(python))
            state = (
                "missing"
                if labels is None
                else ("current" if image_is_current(python, project, client) else "stale")
            )
            print(f"{image_tag(python):24} {state:8} base={(labels or {}).get(BASE_LABEL, '-')}")
        return 0

    def log(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    failures = 0
    for python in args.python:
        print(f"{image_tag(python)}: ", end="", flush=True)
        try:
            outcome = build_image(
                python, project, client=client, force=args.force, log=log if args.verbose else quiet
            )
        except SandboxError as error:
            failures += 1
            print(f"FAILED\n  {error}", flush=True)
            continue
        how = "cached" if outcome.cached else "built"
        print(
            f"{how} in {outcome.seconds:.1f} s on {outcome.base_image} ({outcome.image_id[:19]})", flush=True
        )
    return 1 if failures else 0
