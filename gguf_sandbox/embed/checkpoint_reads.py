"""A checkpoint's files read within bounds: a byte cap, UTF-8, JSON, fields of the expected type — any flaw
one line naming the file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.units import show

# Bytes read at most from a JSON file (a real config.json takes ~1 KB; tokenizer.json has a cap of its own):
# parsed JSON can take 20 times its size in memory.
MAX_JSON_BYTES = 4 << 20
READ_CHUNK = 1 << 20
FIX_HINT = "fix or remove the file"


def read_capped(path: Path, limit: int, what: str) -> bytes:
    """The whole file, refused beyond `limit` bytes (read no further: a size on disk can lie, /proc's do)."""
    chunks: list[bytes] = []
    size = 0
    try:
        # In chunks: read(n) allocates n bytes before it reads, whatever the file holds.
        with path.open("rb", buffering=0) as handle:
            while size <= limit and (chunk := handle.read(min(READ_CHUNK, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
    except OSError as error:
        raise GGUFSandboxError(f"{path}: cannot read it ({strerror(error)}); {what}") from error
    if size > limit:
        raise GGUFSandboxError(f"{path} is larger than {limit >> 20} MiB, far beyond a real one; {what}")
    return b"".join(chunks)


def decode(path: Path, data: bytes, what: str) -> str:
    """`data` as UTF-8 text; else one line naming the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GGUFSandboxError(
            f"{path}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); {what}"
        ) from error


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be a `kind` (object or array); any flaw is one line."""
    text = decode(path, read_capped(path, limit, what), what)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise GGUFSandboxError(f"{path}: not valid JSON ({error}); {what}") from error
    except ValueError as error:  # an integer longer than int() converts (sys.get_int_max_str_digits)
        raise GGUFSandboxError(f"{path}: holds a number too long to read; {what}") from error
    except RecursionError as error:
        raise GGUFSandboxError(f"{path}: JSON nested too deeply to read; {what}") from error
    if not isinstance(loaded, kind):
        raise GGUFSandboxError(f"{path}: expected {_json_type(kind)}, found {shown(loaded)}; {what}")
    return loaded


def optional_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no such file."""
    found: dict[str, Any] | None = read_json(path, FIX_HINT, limit) if path.is_file() else None
    return found


def _json_type(kind: type) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "an integer"}
    return names.get(kind, "a number" if kind is float else kind.__name__)


def shown(value: object) -> str:
    """A JSON value for a one-line message: scalars as written (cut short), containers by their kind."""
    if isinstance(value, (dict, list)):
        return _json_type(type(value))
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return show(value)  # a str's repr escapes newlines; json.loads refused ints too long for repr


def json_field(
    path: Path, data: Mapping[str, Any], key: str, kind: type, default: Any = None, *, hint: str = FIX_HINT
) -> Any:
    """data[key] when it is a `kind` (true/false is no number here), `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise GGUFSandboxError(f"{path}: {key} is {shown(value)}, expected {_json_type(kind)}; {hint}")


def require_utf8(where: str, text: str, hint: str) -> None:
    """GGUF strings are UTF-8: a lone surrogate (JSON's "\\ud800", a non-UTF-8 argument) has no encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise GGUFSandboxError(
            f"{where} holds {text[error.start]!r} at {error.start}, which UTF-8 cannot encode; {hint}"
        ) from error


def strerror(error: OSError) -> str:
    """`[Errno 28] No space left on device: 'path'` as `path: No space left on device`."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename is not None else reason
