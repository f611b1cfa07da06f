"""A corpus of hostile model files, built on demand (nothing large is committed): each breaks one thing.

Every entry says what each command must answer: `inspect` checks the format only (exit 0 for a well-formed
file whose model is broken, 4 for a malformed one); `embed` and `workload embed` exit 4 for bad input
(GGUFError) and 3 for a budget refusal. None may print a traceback, be OOM-killed or hang.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from tests.gguf import builders
from tests.gguf.builders import KV, Arr, TinyBert

V = GGUFValueType
Q8_0 = GGMLQuantizationType.Q8_0
TINY = TinyBert()
# Above the reader's limit of 65,536 arrays nested in arrays; 12 bytes each (an empty array).
NESTED_ARRAYS = 70_000
# A vocabulary whose dict and strings (~160 bytes a token) cannot fit a 64 MB cell beside the interpreter.
HUGE_VOCAB = 500_000
EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 3, 4


@dataclass(frozen=True)
class Entry:
    """A hostile file, the exit code of (inspect, embed, workload embed), and what the error must say."""

    make: Callable[[Path], Path]
    exits: tuple[int, int, int]
    message: str  # a regex the embed error matches


def _write(spec: builders.Spec, name: str) -> Callable[[Path], Path]:
    return lambda folder: builders.build(spec).write(folder / f"{name}.gguf")


def _tiny(name: str, **overrides: object) -> Callable[[Path], Path]:
    return _write(builders.bert_spec(**overrides), name)  # type: ignore[arg-type]


def _meta(key: str, vtype: int, value: object) -> dict[str, tuple[int, object]]:
    return {key: (vtype, value)}


def _poisoned(name: str, tensor: str, value: float) -> Callable[[Path], Path]:
    ne = dict(TINY.shapes(len(TINY.tokens())))[tensor]
    values = np.full(int(np.prod(ne)), 0.01, dtype="<f4")
    values[len(values) // 2] = value
    return _tiny(name, data={tensor: values.tobytes()})


def _nested_arrays(folder: Path) -> Path:
    """The tiny BERT plus one key holding NESTED_ARRAYS empty arrays (written directly: 840 KB)."""
    spec = builders.bert_spec()
    nested = Arr(V.ARRAY, [Arr(V.UINT8, [])] * NESTED_ARRAYS)
    return builders.build(replace(spec, kvs=(*spec.kvs, KV("test.nested", V.ARRAY, nested)))).write(
        folder / "nested-arrays.gguf"
    )


def _truncated(folder: Path) -> Path:
    data = builders.build(builders.bert_spec()).data
    path = folder / "truncated.gguf"
    path.write_bytes(data[: len(data) - 1000])
    return path


def _huge_vocabulary(folder: Path) -> Path:
    tokens = [*builders.BERT_SPECIAL, *(f"\u2581w{index}" for index in range(HUGE_VOCAB))]
    spec = builders.bert_spec(tokens=tokens, token_types=[1] * len(tokens), table_type=Q8_0)
    return builders.build(spec).write(folder / "huge-vocabulary.gguf")


def _many_control_tokens(folder: Path) -> Path:
    tokens = [*builders.BERT_SPECIAL, *(f"[unused{index}]" for index in range(5000))]
    spec = builders.bert_spec(tokens=tokens, token_types=[3] * len(tokens))
    return builders.build(spec).write(folder / "control-tokens.gguf")


def _proc_self_mem(folder: Path) -> Path:
    """A path every read of fails with EIO (the reading process's own memory at offset 0)."""
    del folder
    return Path("/proc/self/mem")


CORPUS: dict[str, Entry] = {
    "block-count-2^31": Entry(
        _tiny("block-count", metadata=_meta("bert.block_count", V.UINT32, 2**31)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"block_count is 2,147,483,648.*at most 1 layers",
    ),
    "block-count-2^63": Entry(
        _tiny("block-count-64", metadata=_meta("bert.block_count", V.UINT64, 2**63)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"block_count is 9,223,372,036,854,775,808",
    ),
    "embedding-length-2^40": Entry(
        _tiny("hidden", metadata=_meta("bert.embedding_length", V.UINT64, 2**40)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"token_embd.weight has shape",
    ),
    "context-length-2^40": Entry(
        _tiny("context", metadata=_meta("bert.context_length", V.UINT64, 2**40)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"position_embd.weight has shape",
    ),
    "layer-norm-eps-nan": Entry(
        _tiny("eps-nan", metadata=_meta("bert.attention.layer_norm_epsilon", V.FLOAT32, math.nan)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"layer_norm_epsilon is nan",
    ),
    "layer-norm-eps-negative": Entry(
        _tiny("eps-negative", metadata=_meta("bert.attention.layer_norm_epsilon", V.FLOAT32, -1.0)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"layer_norm_epsilon is -1.0",
    ),
    "layer-norm-eps-inf": Entry(
        _tiny("eps-inf", metadata=_meta("bert.attention.layer_norm_epsilon", V.FLOAT64, math.inf)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"layer_norm_epsilon is inf",
    ),
    "layer-norm-eps-underflows-float32": Entry(
        _tiny("eps-tiny", metadata=_meta("bert.attention.layer_norm_epsilon", V.FLOAT64, 1e-300)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"layer_norm_epsilon is 1e-300",
    ),
    "pooling-none": Entry(
        _tiny("pooling-none", metadata=_meta("bert.pooling_type", V.UINT32, 0)),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"pooling type NONE \(0\)",
    ),
    "nan-weights": Entry(
        _poisoned("nan-weights", "blk.0.attn_q.weight", math.nan),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"NaN or infinite",
    ),
    "inf-bias": Entry(
        _poisoned("inf-bias", "blk.0.ffn_down.bias", math.inf),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"NaN or infinite",
    ),
    "overflowing-weights": Entry(
        _poisoned("overflowing-weights", "blk.0.ffn_up.weight", 3e38),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"NaN or infinite",
    ),
    "huge-norm-bias": Entry(
        _poisoned("huge-norm-bias", "blk.0.attn_output_norm.bias", 3e38),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"blk\.0\.attn_output_norm\.bias holds 3e\+38 at element \d+: no norm weight or bias",
    ),
    "more-tokens-than-table-rows": Entry(
        _tiny("short-table", vocab_rows=20),
        (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT),
        r"57 tokens but token_embd.weight only 20 rows",
    ),
    "huge-vocabulary": Entry(
        _huge_vocabulary, (EXIT_OK, EXIT_REFUSED, EXIT_REFUSED), r"tokenizer vocabulary.*needs [\d,]+ bytes"
    ),
    "many-control-tokens": Entry(
        _many_control_tokens, (EXIT_OK, EXIT_BAD_INPUT, EXIT_BAD_INPUT), r"5,005 control tokens"
    ),
    "nested-arrays": Entry(
        _nested_arrays, (EXIT_BAD_INPUT, EXIT_BAD_INPUT, EXIT_BAD_INPUT), r"over the limit 65,536"
    ),
    "truncated": Entry(_truncated, (EXIT_BAD_INPUT, EXIT_BAD_INPUT, EXIT_BAD_INPUT), r"ends past the end"),
    "eio-source": Entry(
        _proc_self_mem, (EXIT_BAD_INPUT, EXIT_BAD_INPUT, EXIT_BAD_INPUT), r"failed: Input/output error"
    ),
}


def utf8_garbage(folder: Path) -> Path:
    path = folder / "garbage.txt"
    path.write_bytes(b"fine line\n" + struct.pack("<4B", 0xFF, 0xFE, 0x80, 0x0A))
    return path
