"""`gguf-sandbox inspect`: a summary of a GGUF file from its header alone, as text or JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from typing import Any

from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.metadata import LazyArray
from gguf_sandbox.gguf.reader import GGUFFile, TensorInfo

ARRAY_PREVIEW = 3
STRING_PREVIEW = 60


def summarize(gguf: GGUFFile) -> dict[str, Any]:
    """Everything `inspect --json` prints; arrays are described by type and length, not expanded."""
    metadata: dict[str, Any] = {}
    for key, value in gguf.metadata.items():
        if isinstance(value, LazyArray):
            metadata[key] = {
                "array": value.element_type.name.lower(),
                "length": len(value),
                "head": [_jsonable(v) for v in value[:ARRAY_PREVIEW]],
            }
        else:
            metadata[key] = _jsonable(value)
    tensors = [_tensor_entry(info) for info in gguf.tensors.values()]
    return {
        "path": str(gguf.path),
        "version": gguf.version,
        "byte_order": "little" if gguf.byte_order == "<" else "big",
        "file_size": gguf.file_size,
        "alignment": gguf.alignment,
        "data_offset": gguf.data_offset,
        "architecture": gguf.architecture,
        "metadata": metadata,
        "tensors": tensors,
        "totals": _totals(gguf.tensors.values()),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, LazyArray):
        return f"<array of {len(value)}>"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN or Infinity: "nan", "inf", "-inf" as strings
    return value


def _tensor_entry(info: TensorInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "type": info.type.name,
        "shape": list(info.shape),
        "ne": list(info.ne),
        "offset": info.offset,
        "nbytes": info.nbytes,
    }


def _totals(tensors: Any) -> dict[str, dict[str, int]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    for info in tensors:
        counts[info.type.name] += 1
        sizes[info.type.name] += info.nbytes
        elements[info.type.name] += info.n_elements
    return {
        name: {"tensors": counts[name], "nbytes": sizes[name], "elements": elements[name]}
        for name in sorted(counts, key=lambda n: -sizes[n])
    }


def render_text(summary: dict[str, Any]) -> str:
    """The human-readable form: header, metadata, tensor table, totals per type."""
    lines = [
        f"{summary['path']}",
        f"  GGUF v{summary['version']} ({summary['byte_order']}-endian), {_size(summary['file_size'])}, "
        f"architecture {summary['architecture'] or '(none)'}, alignment {summary['alignment']}",
        "",
        f"metadata ({len(summary['metadata'])} keys)",
    ]
    width = max((len(k) for k in summary["metadata"]), default=0)
    for key, value in summary["metadata"].items():
        lines.append(f"  {key:<{width}}  {_describe(value)}")
    tensors = summary["tensors"]
    lines += ["", f"tensors ({len(tensors)})"]
    name_width = max((len(t["name"]) for t in tensors), default=4)
    for tensor in tensors:
        shape = "×".join(str(d) for d in tensor["shape"])
        size = _size(tensor["nbytes"])
        lines.append(f"  {tensor['name']:<{name_width}}  {tensor['type']:<6}  {shape:>16}  {size}")
    lines += ["", "totals by type"]
    for type_name, total in summary["totals"].items():
        lines.append(
            f"  {type_name:<6}  {total['tensors']:>5} tensors  {total['elements']:>14,} elements  "
            f"{_size(total['nbytes'])}"
        )
    return "\n".join(lines)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        head = ", ".join(_short(v) for v in value["head"])
        more = ", …" if value["length"] > len(value["head"]) else ""
        return f"[{value['array']} × {value['length']:,}] [{head}{more}]"
    return _short(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= STRING_PREVIEW else text[: STRING_PREVIEW - 1] + "…"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


EXIT_OK = 0
EXIT_BAD_INPUT = 4
EPILOG = """\
exit codes: 0 the file parsed; 2 bad arguments; 4 it is not a readable GGUF file (malformed, truncated,
hostile or unreadable: one line on stderr names the field and its offset). inspect checks the format, not
whether a model in it can run: `gguf-sandbox embed` checks that."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("path", help="the .gguf file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        with GGUFFile.open(args.path) as gguf:
            summary = summarize(gguf)
    except GGUFError as error:
        print(f"gguf-sandbox inspect: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        json.dump(summary, sys.stdout, indent=2, ensure_ascii=False, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(render_text(summary))
    return 0
