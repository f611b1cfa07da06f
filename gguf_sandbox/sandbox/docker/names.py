"""What the images are called: repositories, per-Python tags and the labels they carry."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gguf_sandbox.errors import SandboxError

if TYPE_CHECKING:
    pass


IMAGE_REPOSITORY = "gguf-sandbox"
BASE_REPOSITORY = "gguf-sandbox-base"
ROOTFS_REPOSITORY = "gguf-sandbox-rootfs"
HASH_LABEL = "org.gguf-sandbox.content-hash"
BASE_LABEL = "org.gguf-sandbox.base-image"


def image_tag(python: str) -> str:
    """The tag of the cell image for a Python version, e.g. gguf-sandbox:py3.12."""
    return f"{IMAGE_REPOSITORY}:py{checked_version(python)}"


def base_tag(python: str) -> str:
    """The tag of the offline base image for a Python version, e.g. gguf-sandbox-base:py3.12."""
    return f"{BASE_REPOSITORY}:py{checked_version(python)}"


def checked_version(python: str) -> str:
    if re.fullmatch(r"3\.\d{1,2}", python) is None:
        raise SandboxError(f"Python version {python!r} is not of the form 3.X; hint: use e.g. 3.12")
    return python
