"""Hugging Face BERT checkpoint → GGUF, the way llama.cpp's convert_hf_to_gguf.py writes BertModel."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import GGUFWriter, SpecialVocab
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    LlamaFileType,
    PoolingType,
    TokenType,
)
from gguf.quants import quant_shape_to_byte_shape, quantize
from gguf.tensor_mapping import get_tensor_name_map

from gguf_sandbox.atomic import check_replaceable, path_argument
from gguf_sandbox.embed.shapes import bert_shapes
from gguf_sandbox.embed.tokenizer import (
    CONTINUATION,
    KEY_LOWERCASE,
    KEY_MAX_SEQ_LENGTH,
    KEY_STRIP_ACCENTS,
    WORD_START,
    TokenizerOptions,
    WordPieceTokenizer,
)
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.gguf.reader import MAGIC

ARCH = MODEL_ARCH.BERT
ARCH_NAME = MODEL_ARCH_NAMES[ARCH]
SAFETENSORS = "model.safetensors"
# Every file of the checkpoint convert reads besides the pooling config (whose folder modules.json names).
CHECKPOINT_FILES = (
    "config.json",
    SAFETENSORS,
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
)
# Bytes read at most from a JSON file (real ones: config.json ~1 KB, tokenizer.json of a 250k-token
# vocabulary ~17 MB): parsed JSON can take 20 times its size in memory.
MAX_JSON_BYTES = 4 << 20
MAX_TOKENIZER_JSON_BYTES = 32 << 20
# vocab.txt: LaBSE's 501,153 tokens take 5 MB.
MAX_VOCAB_TXT_BYTES = 32 << 20
READ_CHUNK = 1 << 20
DEFAULT_LAYER_NORM_EPS = 1e-12  # BertConfig's
CHECKPOINT_HINT = "pass the directory that holds config.json, model.safetensors and vocab.txt"
FIX_HINT = "fix or remove the file"
CONFIG_HINT = "fix the file"  # config.json cannot be removed
# Architectures llama.cpp converts as BertModel that carry no extra head we would have to map.
BERT_ARCHITECTURES = frozenset({"BertModel", "BertForMaskedLM"})
REQUIRED_HPARAMS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
)
# Upper bounds far above any released BERT encoder (BERT-large: 1,024 wide, 16 heads, 24 layers, 4,096 ffn,
# 512 positions; LaBSE: 501,153 tokens) that keep what is sized by them small — the token list (~70 bytes a
# token), the tensor-name map (~35 KB a layer) — and every count within the uint32 GGUF stores it in.
HPARAM_LIMITS: Mapping[str, int] = MappingProxyType(
    {
        "hidden_size": 1 << 16,
        "num_hidden_layers": 256,
        "num_attention_heads": 1 << 10,
        "intermediate_size": 1 << 18,
        "max_position_embeddings": 1 << 20,
        "vocab_size": 1 << 21,
        "type_vocab_size": 1 << 10,
    }
)
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
LAYER_TENSOR = re.compile(r"encoder\.layer\.(\d+)\.")
# Checkpoint tensors llama.cpp drops for an embedding model (the MLM/NSP heads, the pooler).
DROPPED_PREFIXES = ("cls.predictions", "cls.seq_relationship")
DROPPED_NAMES = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The tokenizer_config.json / special_tokens_map.json fields that name a special token.
SPECIAL_TOKEN_KEYS = (
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "bos_token",
    "eos_token",
)
# llama.cpp names a WordPiece vocabulary's pre-tokenizer by hashing its ids for this text (the table
# in get_vocab_base_pre; with duplicate hashes the last entry wins). llama.cpp ignores it for "bert".
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple "
    "emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 "
    "33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_BY_HASH: Mapping[str, str] = MappingProxyType(
    {
        "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
        "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    }
)


@dataclass(frozen=True)
class OutType:
    """One --type choice: the GGML type of weight matrices, of token_embd, and per-role exceptions."""

    weights: GGMLQuantizationType
    token_embd: GGMLQuantizationType
    file_type: LlamaFileType
    # Layer matrices, by role (`blk.N.<role>.weight`), stored in another type than `weights`.
    kept: Mapping[str, GGMLQuantizationType] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> str:
        """The recipe in words, e.g. for --help."""
        text = f"{self.weights.name} matrices, {self.token_embd.name} token_embd"
        return text + "".join(f", {role} {qtype.name}" for role, qtype in self.kept.items())


# Q4_0 where MiniLM tolerates it. Measured on the fixture (min cosine vs sentence-transformers with one
# role in Q4_0 and the rest Q8_0): token_embd 0.9966, attn_k 0.9978, attn_q 0.9948, attn_output 0.9891,
# ffn_down 0.9769, ffn_up 0.9679, attn_v 0.9650; every matrix in Q4_0 gives 0.896 (llama.cpp too; better
# rounding — RMSE scale search, GPTQ — reaches 0.93 at most). So token_embd, attn_q and attn_k are Q4_0
# (60% of the weights; min cosine 0.993) and the sensitive roles stay Q8_0: a file smaller than Q4_0
# matrices with a Q8_0 token_embd (llama-quantize's choice for BERT), at 0.99 instead of 0.90.
_Q4_0_SENSITIVE: Mapping[str, GGMLQuantizationType] = MappingProxyType(
    {role: GGMLQuantizationType.Q8_0 for role in ("attn_v", "attn_output", "ffn_up", "ffn_down")}
)
OUT_TYPES: Mapping[str, OutType] = MappingProxyType(
    {
        "f32": OutType(GGMLQuantizationType.F32, GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
        "f16": OutType(GGMLQuantizationType.F16, GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        "q8_0": OutType(GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        "q4_0": OutType(
            GGMLQuantizationType.Q4_0,
            GGMLQuantizationType.Q4_0,
            LlamaFileType.MOSTLY_Q4_0,
            kept=_Q4_0_SENSITIVE,
        ),
    }
)
# Tensors llama.cpp always keeps in F32 (besides 1-D tensors and norms).
ALWAYS_F32 = frozenset({"position_embd.weight", "token_types.weight"})


@dataclass(frozen=True)
class BertHParams:
    """The config.json fields the GGUF header needs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    type_vocab_size: int
    layer_norm_eps: float


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of model.safetensors as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, I64, ...


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from and how it is stored."""

    source: str
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype)))


@dataclass(frozen=True)
class Vocabulary:
    """The WordPiece vocabulary in llama.cpp's GGUF form."""

    tokens: list[str]
    token_types: list[int]
    lowercase: bool
    strip_accents: bool | None
    pre: str


def convert(hf_dir: Path, out: Path, out_type: str = "f16", *, name: str | None = None) -> None:
    """Write `out` as a llama.cpp-style GGUF of the BERT checkpoint in `hf_dir`, weights as `out_type`.

    `out` must be absent or an earlier GGUF, and no file of the checkpoint (anything else is refused, never
    replaced); it may be inside `hf_dir`. Tensors are read one at a time and streamed to the file; a
    failure leaves no partial `out`.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    spec = OUT_TYPES.get(str(out_type).lower())
    if spec is None:
        raise GGUFSandboxError(f"unknown output type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    _require_directory(hf_dir)
    config = _read_config(hf_dir)
    inputs = _input_files(hf_dir)
    _check_out(out, inputs)
    hparams = _hparams(config, hf_dir)
    weights = hf_dir / SAFETENSORS
    tensors = _read_header(weights)
    _check_counts(hparams, tensors, hf_dir)
    files = _tokenizer_files(hf_dir)
    vocabulary = _vocabulary(hf_dir, hparams, files)
    plan = _plan_tensors(weights, tensors, hparams, spec)

    writer = GGUFWriter(path=None, arch=ARCH_NAME)
    _add_metadata(
        writer,
        hf_dir,
        config=config,
        hparams=hparams,
        files=files,
        vocabulary=vocabulary,
        spec=spec,
        name=_name(name, hf_dir),
    )
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, tensor.qtype)
    partial = _create_partial(out)
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(weights, plan):
            writer.write_tensor_data(data)
        writer.close()
        # Again: the conversion took a while, and what is at `out` now is what the rename replaces.
        _check_out(out, inputs)
        os.replace(partial, out)
    except OSError as error:
        _discard(writer, partial)
        raise GGUFSandboxError(f"cannot write {out}: {_strerror(error)}") from error
    except BaseException:
        _discard(writer, partial)
        raise


# -- output ----------------------------------------------------------------------------------------------
def _check_out(out: Path, inputs: tuple[Path, ...]) -> None:
    """Refuse an `out` whose replacement would lose something: a file the checkpoint is read from, a link,
    and whatever atomic.check_replaceable refuses (a directory, a device, any file but a GGUF); or a path in
    a directory that does not exist. A new file inside HF_DIR is fine: llama.cpp's converter writes there."""
    if not out.parent.is_dir():
        problem = "is not a directory" if os.path.lexists(out.parent) else "does not exist"
        raise GGUFSandboxError(
            f"OUT {out}: {out.parent} {problem}; create the directory or choose another path"
        )
    source = _checkpoint_file(out, inputs)
    if source is not None:
        raise GGUFSandboxError(
            f"OUT {out}: is the checkpoint's {source.name}, which convert reads; choose another path"
        )
    if check_replaceable(out, "OUT", "a GGUF file", _is_gguf, file_name="model.gguf") and out.is_symlink():
        # os.replace would put the GGUF where the link was, silently changing what the link's users see.
        raise GGUFSandboxError(
            f"OUT {out}: is a symbolic link; convert replaces a GGUF file itself, never a link — "
            f"remove it or choose another path"
        )


def _checkpoint_file(out: Path, inputs: tuple[Path, ...]) -> Path | None:
    """The input `out` is: the same file (a hard link, a link's target), or, for an optional file that is
    absent, the same name in the same directory (a GGUF written as tokenizer.json would be read next time)."""
    out_status, parent_status = _status(out), _status(out.parent)
    for path in inputs:
        same_place = path.name == out.name and _same_file(parent_status, _status(path.parent))
        if same_place or _same_file(out_status, _status(path)):
            return path
    return None


def _status(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # absent or unreadable: not a file convert reads (it reports those when it reads them)
        return None


def _same_file(first: os.stat_result | None, second: os.stat_result | None) -> bool:
    return (
        first is not None
        and second is not None
        and (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
    )


def _is_gguf(path: Path) -> bool:
    """An earlier conversion's output: the GGUF magic first (an empty file is not one)."""
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _create_partial(out: Path) -> Path:
    """A new empty file next to `out` (O_EXCL: never an existing one), which GGUFWriter then fills."""
    # `out`'s name cut to 200 characters: with the pid and the random part it stays within NAME_MAX (255).
    partial = out.with_name(f".{out.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as error:
        raise GGUFSandboxError(f"cannot write {out}: {_strerror(error)}") from error
    return partial


def _discard(writer: GGUFWriter, partial: Path) -> None:
    # Closing flushes what is buffered, which fails again on a full disk: the file goes anyway.
    with contextlib.suppress(OSError):
        writer.close()
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def _strerror(error: OSError) -> str:
    """`[Errno 28] No space left on device: 'path'` as `path: No space left on device`."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename is not None else reason


# -- inputs ----------------------------------------------------------------------------------------------
def _read_capped(path: Path, limit: int, what: str) -> bytes:
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
        raise GGUFSandboxError(f"{path}: cannot read it ({_strerror(error)}); {what}") from error
    if size > limit:
        raise GGUFSandboxError(f"{path} is larger than {limit >> 20} MiB, far beyond a real one; {what}")
    return b"".join(chunks)


def _decode(path: Path, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GGUFSandboxError(
            f"{path}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); {what}"
        ) from error


def _read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be a `kind` (object or array); any flaw is one line."""
    text = _decode(path, _read_capped(path, limit, what), what)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise GGUFSandboxError(f"{path}: not valid JSON ({error}); {what}") from error
    except ValueError as error:  # an integer longer than int() converts (sys.get_int_max_str_digits)
        raise GGUFSandboxError(f"{path}: holds a number too long to read; {what}") from error
    except RecursionError as error:
        raise GGUFSandboxError(f"{path}: JSON nested too deeply to read; {what}") from error
    if not isinstance(loaded, kind):
        raise GGUFSandboxError(f"{path}: expected {_json_type(kind)}, found {_shown(loaded)}; {what}")
    return loaded


def _optional_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    found: dict[str, Any] | None = _read_json(path, FIX_HINT, limit) if path.is_file() else None
    return found


def _json_type(kind: type) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "an integer"}
    return names.get(kind, "a number" if kind is float else kind.__name__)


def _shown(value: object) -> str:
    """A JSON value for a one-line message: scalars as written (cut short), containers by their kind."""
    if isinstance(value, (dict, list)):
        return _json_type(type(value))
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _clip(repr(value))  # a str's repr escapes newlines; json.loads refused ints too long for repr


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(
    path: Path, data: Mapping[str, Any], key: str, kind: type, default: Any = None, *, hint: str = FIX_HINT
) -> Any:
    """data[key] when it is a `kind` (true/false is no number here), `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise GGUFSandboxError(f"{path}: {key} is {_shown(value)}, expected {_json_type(kind)}; {hint}")


def _require_directory(hf_dir: Path) -> None:
    if not hf_dir.is_dir():
        raise GGUFSandboxError(f"{hf_dir} is not a directory; {CHECKPOINT_HINT}")


def _input_files(hf_dir: Path) -> tuple[Path, ...]:
    return (*(hf_dir / name for name in CHECKPOINT_FILES), _pooling_dir(hf_dir) / "config.json")


def _read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise GGUFSandboxError(
            f"{hf_dir} is not a Hugging Face checkpoint: config.json is missing; {CHECKPOINT_HINT}"
        )
    config: dict[str, Any] = _read_json(path, CHECKPOINT_HINT)
    architectures = _field(path, config, "architectures", list, hint=CONFIG_HINT) or []
    if not all(isinstance(name, str) for name in architectures):
        raise GGUFSandboxError(f"{path}: architectures must be an array of strings; {CONFIG_HINT}")
    model_type = _field(path, config, "model_type", str, hint=CONFIG_HINT)
    if not (BERT_ARCHITECTURES & set(architectures)) and not (not architectures and model_type == "bert"):
        described = _clip(", ".join(architectures)) if architectures else f"model_type {_shown(model_type)}"
        raise GGUFSandboxError(
            f"{path}: architecture {described} is not a BERT encoder; only "
            f"{', '.join(sorted(BERT_ARCHITECTURES))} checkpoints (model_type 'bert') can be converted"
        )
    return config


def _hparams(config: Mapping[str, Any], hf_dir: Path) -> BertHParams:
    path = hf_dir / "config.json"
    missing = [key for key in REQUIRED_HPARAMS if not _is_int(config.get(key))]
    if missing:
        raise GGUFSandboxError(
            f"{path}: missing or non-integer {', '.join(missing)}; a BERT config.json "
            f"defines {', '.join(REQUIRED_HPARAMS)}"
        )
    type_vocab_size = _field(path, config, "type_vocab_size", int, 1, hint=CONFIG_HINT)
    counts = {**{key: config[key] for key in REQUIRED_HPARAMS}, "type_vocab_size": type_vocab_size}
    for key, value in counts.items():
        limit = HPARAM_LIMITS[key]
        if not 1 <= value <= limit:
            raise GGUFSandboxError(
                f"{path}: {key} {_shown(value)} is out of range; a BERT encoder's is 1 to {limit:,}"
            )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise GGUFSandboxError(
            f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    positions = _field(path, config, "position_embedding_type", str, "absolute", hint=CONFIG_HINT)
    if positions != "absolute":
        raise GGUFSandboxError(
            f"{path}: position_embedding_type {_shown(positions)} is not supported; llama.cpp's bert "
            f"architecture has absolute position embeddings only"
        )
    return BertHParams(
        hidden_size=hidden,
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        vocab_size=config["vocab_size"],
        type_vocab_size=type_vocab_size,
        layer_norm_eps=_layer_norm_eps(path, config),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_norm_eps(path: Path, config: Mapping[str, Any]) -> float:
    """layer_norm_eps as the float32 GGUF stores: finite and > 0 (`embed` refuses any other)."""
    key = next((k for k in ("layer_norm_eps", "layer_norm_epsilon") if k in config), "layer_norm_eps")
    value = config.get(key, DEFAULT_LAYER_NORM_EPS)
    number = np.float32(np.nan)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError), np.errstate(over="ignore"):  # 1e400 or a 400-digit int
            number = np.float32(float(value))
    if not 0 < number < np.inf:
        raise GGUFSandboxError(
            f"{path}: {key} is {_shown(value)}; it must be a finite positive number that float32 can hold "
            f"(BERT's is {DEFAULT_LAYER_NORM_EPS})"
        )
    return float(number)


def _name(name: str | None, hf_dir: Path) -> str:
    """general.name: --name (UTF-8, as GGUF strings are), else the checkpoint's folder name."""
    if name:
        _require_utf8("--name", name, "pass a name in UTF-8")
        return name
    resolved = hf_dir.resolve()
    # A model shipped inside a Python package often sits in a folder called "model".
    folder = resolved.parent.name if resolved.name == "model" and resolved.parent.name else resolved.name
    return folder.encode("utf-8", "replace").decode("utf-8")  # bytes of a non-UTF-8 name become "?"


# -- vocabulary ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddedToken:
    """An entry of added_tokens (tokenizer.json) or added_tokens_decoder (tokenizer_config.json)."""

    content: str
    special: bool
    id: int | None  # None in added_tokens_decoder, which keys entries by id


@dataclass(frozen=True)
class TokenizerFiles:
    """The checkpoint's tokenizer files, read once and checked where convert and SpecialVocab look."""

    tokenizer: Mapping[str, Any] | None  # tokenizer.json; None when absent (SpecialVocab tells the two apart)
    config: Mapping[str, Any] | None  # tokenizer_config.json
    # tokenizer.json's added_tokens, then tokenizer_config.json's added_tokens_decoder
    added: tuple[AddedToken, ...]
    named: frozenset[str]  # the tokens tokenizer_config.json and special_tokens_map.json name special


def _tokenizer_files(hf_dir: Path) -> TokenizerFiles:
    tokenizer_path, config_path = hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json"
    tokenizer = _optional_json(tokenizer_path, MAX_TOKENIZER_JSON_BYTES)
    config = _optional_json(config_path)
    special_map_path = hf_dir / "special_tokens_map.json"
    special_map = _optional_json(special_map_path) or {}
    added = [
        _added_token(tokenizer_path, f"added_tokens[{index}]", entry, with_id=True)
        for index, entry in enumerate(_field(tokenizer_path, tokenizer or {}, "added_tokens", list, []))
    ]
    decoder = _field(config_path, config or {}, "added_tokens_decoder", dict, {})
    added += [
        _added_token(config_path, f"added_tokens_decoder[{_clip(repr(key))}]", entry, with_id=False)
        for key, entry in decoder.items()
    ]
    for key in ("normalizer", "post_processor"):
        _field(tokenizer_path, tokenizer or {}, key, dict)
    _check_chat_template(config_path, config or {})
    named = {
        content
        for path, data in ((config_path, config or {}), (special_map_path, special_map))
        for key in SPECIAL_TOKEN_KEYS
        if (content := _token_content(path, data, key)) is not None
    }
    return TokenizerFiles(tokenizer, config, tuple(added), frozenset(named))


def _added_token(path: Path, where: str, entry: object, *, with_id: bool) -> AddedToken:
    if not isinstance(entry, dict):
        raise GGUFSandboxError(f"{path}: {where} is {_shown(entry)}, expected an object; {FIX_HINT}")
    content = _field(path, entry, "content", str)
    if content is None:
        raise GGUFSandboxError(f"{path}: {where} has no content; {FIX_HINT}")
    token_id = _field(path, entry, "id", int) if with_id else None
    if with_id and (token_id is None or token_id < 0):
        raise GGUFSandboxError(
            f"{path}: {where} has id {_shown(token_id)}, expected a token id ≥ 0; {FIX_HINT}"
        )
    return AddedToken(content, _field(path, entry, "special", bool, False), token_id)


def _token_content(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    """A `*_token` field: its string, or an AddedToken object's content; None when absent."""
    value = data.get(key)
    content: str | None = (
        _field(path, value, "content", str) if isinstance(value, dict) else _field(path, data, key, str)
    )
    return content


def _check_chat_template(path: Path, config: Mapping[str, Any]) -> None:
    """SpecialVocab copies chat_template into the GGUF: a string, or an array of {name, template}."""
    value = config.get("chat_template")
    if value is None:
        return
    if isinstance(value, str):
        templates = [value]
    elif isinstance(value, list) and all(
        isinstance(choice, dict) and all(isinstance(choice.get(part), str) for part in ("name", "template"))
        for choice in value
    ):
        templates = [choice["template"] for choice in value]
    else:
        raise GGUFSandboxError(
            f"{path}: chat_template is {_shown(value)}, expected a string or an array of {{name, template}} "
            f"objects; {FIX_HINT}"
        )
    for template in templates:
        _require_utf8(f"{path}: chat_template", template, FIX_HINT)


def _require_utf8(where: str, text: str, hint: str) -> None:
    """GGUF strings are UTF-8: a lone surrogate (JSON's "\\ud800", a non-UTF-8 argument) has no encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise GGUFSandboxError(
            f"{where} holds {text[error.start]!r} at {error.start}, which UTF-8 cannot encode; {hint}"
        ) from error


def _special_tokens(files: TokenizerFiles) -> tuple[set[str], set[str]]:
    """(special, other added) token strings, as HF's added_tokens_decoder would mark them."""
    special: set[str] = set()
    added: set[str] = set()
    for entry in files.added:
        (special if entry.special else added).add(entry.content)
    special |= files.named
    if not special:
        special.update(SPECIAL_TOKENS)
    return special, added - special


def _lowercase_options(hf_dir: Path, files: TokenizerFiles) -> tuple[bool, bool | None]:
    """(lowercase, strip_accents) from tokenizer.json's normalizer as llama.cpp's SpecialVocab reads it,
    else tokenizer_config.json; BERT's defaults (lower-case; strip accents when lower-casing) otherwise."""
    path = hf_dir / "tokenizer.json"
    found: dict[str, bool | None] = {}
    # Depth first, in file order, without recursion: a Sequence can nest as deep as JSON does.
    pending = [(files.tokenizer or {}).get("normalizer")]
    while pending:
        normalizer = pending.pop()
        if normalizer is None:
            continue
        if not isinstance(normalizer, dict):
            raise GGUFSandboxError(
                f"{path}: a normalizer is {_shown(normalizer)}, expected an object; {FIX_HINT}"
            )
        kind = normalizer.get("type")
        if kind == "Lowercase":
            found["lowercase"] = True
        elif kind == "StripAccents":
            found["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key in ("lowercase", "strip_accents"):
                if key in normalizer:
                    found[key] = _field(path, normalizer, key, bool)
        elif kind == "Sequence":
            pending.extend(reversed(_field(path, normalizer, "normalizers", list, [])))
    config_path, config = hf_dir / "tokenizer_config.json", files.config or {}
    lowercase = found.get("lowercase", _field(config_path, config, "do_lower_case", bool, True))
    strip = found.get("strip_accents", _field(config_path, config, "strip_accents", bool))
    return bool(lowercase), strip


def _vocabulary(hf_dir: Path, hparams: BertHParams, files: TokenizerFiles) -> Vocabulary:
    path = hf_dir / "vocab.txt"
    if not path.is_file():
        raise GGUFSandboxError(
            f"{hf_dir}: vocab.txt is missing; a BERT checkpoint needs its WordPiece vocabulary "
            f"(vocab.txt, one token per line)"
        )
    what = "a BERT vocab.txt holds one token per line, in UTF-8"
    data = _read_capped(path, MAX_VOCAB_TXT_BYTES, what)
    # Counted before splitting: a file of short lines would make a list far larger than the file.
    count = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
    if count > hparams.vocab_size:
        raise GGUFSandboxError(
            f"{path} has {count} tokens but config.json says vocab_size {hparams.vocab_size}; "
            f"the files belong to different models"
        )
    words = _decode(path, data, what).split("\n")
    if words and words[-1] == "":
        words.pop()
    words = [word.rstrip("\r") for word in words]
    special, added = _special_tokens(files)
    present = [token for token in ("[CLS]", "[SEP]", "[UNK]") if token in words]
    if len(present) < 3:
        raise GGUFSandboxError(
            f"{path} lacks {', '.join(t for t in ('[CLS]', '[SEP]', '[UNK]') if t not in words)}; "
            f"only BERT-style WordPiece vocabularies can be converted"
        )
    tokens: list[str] = []
    token_types: list[int] = []
    for word in words:
        # llama.cpp's "phantom space" form: control tokens as-is, "##x" → "x", "x" → "▁x".
        if word in special:
            tokens.append(word)
            token_types.append(TokenType.CONTROL)
        else:
            tokens.append(word[len(CONTINUATION) :] if word.startswith(CONTINUATION) else WORD_START + word)
            token_types.append(TokenType.USER_DEFINED if word in added else TokenType.NORMAL)
    for index in range(len(words), hparams.vocab_size):
        tokens.append(WORD_START + f"[PAD{index}]")
        token_types.append(TokenType.UNUSED)
    lowercase, strip = _lowercase_options(hf_dir, files)
    checker = WordPieceTokenizer.from_vocab(
        words, options=TokenizerOptions(lowercase=lowercase, strip_accents=strip, max_length=1 << 20)
    )
    digest = hashlib.sha256(str(checker.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    return Vocabulary(tokens, token_types, lowercase, strip, PRE_TOKENIZER_BY_HASH.get(digest, "default"))


def _pooling_dir(hf_dir: Path) -> Path:
    """The sentence-transformers Pooling module's folder: modules.json's, else 1_Pooling/."""
    modules = hf_dir / "modules.json"
    if not modules.is_file():
        return hf_dir / "1_Pooling"
    for index, module in enumerate(_read_json(modules, FIX_HINT, kind=list)):
        if not isinstance(module, dict):
            raise GGUFSandboxError(
                f"{modules}: entry {index} is {_shown(module)}, expected an object; {FIX_HINT}"
            )
        if _field(modules, module, "type", str) == "sentence_transformers.models.Pooling":
            folder = Path(_field(modules, module, "path", str, ""))
            if folder.is_absolute() or ".." in folder.parts:
                raise GGUFSandboxError(
                    f"{modules}: the Pooling module's path {_shown(str(folder))} leaves the checkpoint "
                    f"directory; a module's path is relative to it"
                )
            return hf_dir / folder
    return hf_dir / "1_Pooling"


def _pooling_type(pooling_dir: Path) -> PoolingType:
    """The mode of the Pooling module in `pooling_dir`; mean if there is none."""
    path = pooling_dir / "config.json"
    pooling = _optional_json(path)
    if pooling is None:
        return PoolingType.MEAN
    modes = (
        ("pooling_mode_mean_tokens", PoolingType.MEAN),
        ("pooling_mode_cls_token", PoolingType.CLS),
        ("pooling_mode_lasttoken", PoolingType.LAST),
    )
    for key, pooling_type in modes:
        if _field(path, pooling, key, bool, False):
            return pooling_type
    raise GGUFSandboxError(
        f"{path}: only mean, CLS and last-token pooling can be expressed in GGUF "
        f"(llama.cpp's pooling_type); this model uses another mode"
    )


def _max_seq_length(hf_dir: Path) -> int | None:
    path = hf_dir / "sentence_bert_config.json"
    value: int | None = _field(path, _optional_json(path) or {}, "max_seq_length", int)
    if value is not None and value < 2:
        raise GGUFSandboxError(
            f"{path}: max_seq_length {value} leaves no room for [CLS] and [SEP]; it must be at least 2"
        )
    return value


# -- header ----------------------------------------------------------------------------------------------
def _add_metadata(
    writer: GGUFWriter,
    hf_dir: Path,
    *,
    config: Mapping[str, Any],
    hparams: BertHParams,
    files: TokenizerFiles,
    vocabulary: Vocabulary,
    spec: OutType,
    name: str,
) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(spec.file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_block_count(hparams.num_hidden_layers)
    writer.add_context_length(hparams.max_position_embeddings)
    writer.add_embedding_length(hparams.hidden_size)
    writer.add_feed_forward_length(hparams.intermediate_size)
    writer.add_head_count(hparams.num_attention_heads)
    writer.add_layer_norm_eps(hparams.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling_type(_pooling_dir(hf_dir)))

    writer.add_token_type_count(hparams.type_vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    _add_special_tokens(writer, hf_dir, config=config, files=files, tokens=vocabulary.tokens)

    # llama.cpp's BertNormalizer keys (newer gguf-py writes them from tokenizer.json), then our own
    # sentence-transformers truncation length, which llama.cpp ignores.
    writer.add_bool(KEY_LOWERCASE, vocabulary.lowercase)
    if vocabulary.strip_accents is not None:
        writer.add_bool(KEY_STRIP_ACCENTS, vocabulary.strip_accents)
    max_seq_length = _max_seq_length(hf_dir)
    if max_seq_length is not None:
        writer.add_uint32(KEY_MAX_SEQ_LENGTH, min(max_seq_length, hparams.max_position_embeddings))


def _add_special_tokens(
    writer: GGUFWriter,
    hf_dir: Path,
    *,
    config: Mapping[str, Any],
    files: TokenizerFiles,
    tokens: list[str],
) -> None:
    """Special token ids and add_*_token flags as gguf-py's SpecialVocab finds them — run on copies of the
    checked fields only: on the checkpoint it would read any chat_template.jinja whole and fail on
    fields of another type (a negative id, a string for an object) with a traceback."""
    staged: dict[str, object] = {"config.json": _token_ids(hf_dir / "config.json", config)}
    if files.tokenizer is not None:
        # Only what SpecialVocab reads (load_merges is off): added_tokens and post_processor.
        added = [
            {"id": t.id, "content": t.content, "special": t.special} for t in files.added if t.id is not None
        ]
        staged["tokenizer.json"] = {
            "added_tokens": added,
            "post_processor": files.tokenizer.get("post_processor"),
        }
    if files.config is not None:
        staged["tokenizer_config.json"] = files.config
    try:
        with tempfile.TemporaryDirectory(prefix="gguf-sandbox-convert-") as staging:
            for file_name, content in staged.items():
                Path(staging, file_name).write_text(json.dumps(content), encoding="utf-8")
            special_vocab = SpecialVocab(staging, n_vocab=len(tokens))
    except OSError as error:
        raise GGUFSandboxError(
            f"cannot copy the tokenizer fields to a temporary directory: {_strerror(error)}; set TMPDIR"
        ) from error
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise GGUFSandboxError(
            f"{hf_dir}: gguf-py cannot read the special tokens of tokenizer.json/tokenizer_config.json "
            f"({type(error).__name__}: {_clip(str(error), 200)}); {FIX_HINT}"
        ) from error
    _complete_special_ids(special_vocab, tokens)
    # gguf-py has no key for some roles (cls: llama.cpp reads [CLS] from bos); leave them out quietly.
    for role in [
        role for role in special_vocab.special_token_ids if not hasattr(writer, f"add_{role}_token_id")
    ]:
        del special_vocab.special_token_ids[role]
    special_vocab.add_to_gguf(writer, quiet=True)


def _token_ids(path: Path, config: Mapping[str, Any]) -> dict[str, int | None]:
    """config.json's `*_token_id` fields, which SpecialVocab reads: each a token id ≥ 0, or null."""
    ids: dict[str, int | None] = {}
    for key in (key for key in config if key.endswith("_token_id")):
        value = _field(path, config, key, int, hint=CONFIG_HINT)
        if value is not None and value < 0:
            raise GGUFSandboxError(
                f"{path}: {key} is {value}, expected a token id ≥ 0 or null; {CONFIG_HINT}"
            )
        ids[key] = value
    return ids


def _complete_special_ids(special_vocab: SpecialVocab, tokens: list[str]) -> None:
    """Fill ids the HF files did not name from the standard BERT token strings (vocab.txt-only dirs)."""
    ids = special_vocab.special_token_ids
    index = {token: position for position, token in enumerate(tokens) if token in SPECIAL_TOKENS}
    defaults = {"bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]",
                "cls": "[CLS]", "mask": "[MASK]"}  # fmt: skip
    for role, token in defaults.items():
        if role not in ids and token in index:
            ids[role] = index[token]


# -- tensors ---------------------------------------------------------------------------------------------
def _gguf_name(source: str, tensor_map: Any) -> str | None:
    """llama.cpp's BertModel.filter_tensors + map_tensor_name: the GGUF name, None when dropped."""
    name = source.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    if name in DROPPED_NAMES or name.startswith(DROPPED_PREFIXES):
        return None
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise GGUFSandboxError(
            f"tensor {source!r} has no llama.cpp bert name; the checkpoint is not a plain BERT encoder "
            f"(heads other than MLM/NSP/pooler cannot be converted)"
        )
    return str(mapped)


def _tensor_type(name: str, shape: tuple[int, ...], spec: OutType) -> GGMLQuantizationType:
    """llama.cpp's choice: 1-D, norms, biases, positions and token types F32; matrices as asked."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in ALWAYS_F32:
        return GGMLQuantizationType.F32
    parts = name.split(".")
    role = parts[2] if len(parts) == 4 and parts[0] == "blk" else None
    if name == "token_embd.weight":
        qtype = spec.token_embd
    else:
        qtype = spec.kept.get(role, spec.weights) if role is not None else spec.weights
    block = GGML_QUANT_SIZES[qtype][0]
    # A row that does not split into whole blocks falls back to F16, as llama.cpp's QuantError path does.
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _read_header(weights: Path) -> list[SourceTensor]:
    """The tensors model.safetensors holds, from its header alone (safetensors checks it against the size)."""
    if not weights.is_file():
        others = sorted(p.name for p in weights.parent.glob("*.safetensors")) + sorted(
            p.name for p in weights.parent.glob("pytorch_model*.bin")
        )
        found = f" (found {_clip(', '.join(others), 200)})" if others else ""
        raise GGUFSandboxError(
            f"{weights} is missing{found}; only a single-file model.safetensors can be converted — "
            f"re-save the model with safetensors (no torch is used here)"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            views = ((name, handle.get_slice(name)) for name in handle.keys())  # noqa: SIM118 (not a mapping)
            return [
                SourceTensor(name, tuple(int(d) for d in v.get_shape()), v.get_dtype()) for name, v in views
            ]
    except Exception as error:  # safetensors raises its own types for a corrupt header
        raise GGUFSandboxError(
            f"{weights}: cannot read safetensors header ({_clip(str(error), 200)}); is the file complete?"
        ) from error


def _check_counts(hparams: BertHParams, tensors: list[SourceTensor], hf_dir: Path) -> None:
    """config.json's vocab_size, hidden_size and num_hidden_layers against the tensors the weights hold,
    before anything is sized by them (the token list, the tensor-name map)."""
    config, weights = hf_dir / "config.json", hf_dir / SAFETENSORS
    disagree = "the weights and config.json belong to different models"
    shapes = {tensor.name.removeprefix("bert."): tensor.shape for tensor in tensors}
    embedding = shapes.get(WORD_EMBEDDINGS)
    if embedding is None:
        raise GGUFSandboxError(
            f"{weights} has no {WORD_EMBEDDINGS}; the checkpoint is incomplete or not a BERT encoder"
        )
    if embedding != (hparams.vocab_size, hparams.hidden_size):
        raise GGUFSandboxError(
            f"{config}: vocab_size {hparams.vocab_size} and hidden_size {hparams.hidden_size}, but "
            f"{weights}'s {WORD_EMBEDDINGS} has shape {_clip(str(list(embedding)))}; {disagree}"
        )
    layers = {match[1] for name in shapes if (match := LAYER_TENSOR.match(name))}
    if layers != {str(layer) for layer in range(hparams.num_hidden_layers)}:
        numbers = _clip(", ".join(sorted(layers, key=lambda number: (len(number), number))))
        raise GGUFSandboxError(
            f"{config}: num_hidden_layers {hparams.num_hidden_layers}, but {weights} holds "
            f"{len(layers)} encoder layer(s) ({numbers or 'none'}); {disagree}"
        )


def _plan_tensors(
    weights: Path, tensors: list[SourceTensor], hparams: BertHParams, spec: OutType
) -> list[PlannedTensor]:
    """Every output tensor, named, shaped and typed, from the safetensors header alone."""
    tensor_map = get_tensor_name_map(ARCH, hparams.num_hidden_layers)
    expected = bert_shapes(
        hidden=hparams.hidden_size,
        ffn=hparams.intermediate_size,
        vocab_size=hparams.vocab_size,
        context=hparams.max_position_embeddings,
        layers=hparams.num_hidden_layers,
        token_types=hparams.type_vocab_size,
    )
    plan: list[PlannedTensor] = []
    for source in tensors:
        name = _gguf_name(source.name, tensor_map)
        if name is None:
            continue
        if source.dtype not in ("F32", "F16", "F64"):
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} is {source.dtype}; only F32/F16/F64 checkpoints "
                f"can be converted without torch"
            )
        want = expected.get(name)
        if want is None:
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} maps to llama.cpp's {name}, which a plain BERT "
                f"encoder lacks; classification heads are not supported, convert the base encoder"
            )
        if source.shape != want:
            raise GGUFSandboxError(
                f"{weights}: tensor {source.name!r} ({name}) has shape {_clip(str(list(source.shape)))}, "
                f"config.json implies {list(want)}; the weights and config.json disagree"
            )
        plan.append(PlannedTensor(source.name, name, source.shape, _tensor_type(name, source.shape, spec)))
    missing = sorted(set(expected) - {tensor.name for tensor in plan})
    if missing:
        raise GGUFSandboxError(
            f"{weights} lacks {len(missing)} tensor(s) a BERT encoder needs, e.g. {', '.join(missing[:4])}; "
            f"the checkpoint is incomplete or not a BERT encoder"
        )
    return plan


def _tensor_data(weights: Path, plan: list[PlannedTensor]) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes as GGUF stores them, reading one source tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as handle:
        for tensor in plan:
            with np.errstate(over="ignore"):  # an F64 value beyond float32 becomes inf, refused below
                data = np.ascontiguousarray(handle.get_tensor(tensor.source), dtype=np.float32)
            # NaN propagates through min and max and ±inf shows in them: two passes, no temporary array.
            if data.size and not (np.isfinite(data.min()) and np.isfinite(data.max())):
                raise GGUFSandboxError(
                    f"{weights}: tensor {tensor.source!r} holds NaN or infinite values (or F64 values beyond "
                    f"float32); the checkpoint is corrupt"
                )
            yield quantize(data, tensor.qtype)


# -- command line ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="checkpoint directory: config.json, model.safetensors, vocab.txt (+ sentence-transformers)",
    )
    parser.add_argument(
        "out",
        metavar="OUT.gguf",
        help="GGUF file to write, e.g. HF_DIR/model.gguf (an earlier GGUF is replaced; any other file and "
        "the checkpoint's own files are refused)",
    )
    parser.add_argument(
        "--type",
        dest="out_type",
        choices=list(OUT_TYPES),
        default="f16",
        help="storage type of the weight matrices (default: f16): "
        + "; ".join(f"{name} = {spec.describe()}" for name, spec in OUT_TYPES.items()),
    )
    parser.add_argument("--name", default=None, help="general.name to record (default: the directory name)")


def run(args: argparse.Namespace) -> int:
    out = path_argument(args.out, "OUT")
    convert(path_argument(args.hf_dir, "HF_DIR"), out, args.out_type, name=args.name)
    # A path's non-UTF-8 bytes as \xNN: a UTF-8 stdout cannot print them as they are.
    shown = os.fsencode(out).decode("utf-8", "backslashreplace")
    print(f"wrote {shown} ({out.stat().st_size:,} bytes, {args.out_type})")
    return 0
