"""A checkpoint's vocab.txt and tokenizer files as llama.cpp's GGUF vocabulary: tokens, their types,
normalizer flags, special tokens."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gguf import GGUFWriter, SpecialVocab
from gguf.constants import TokenType

from gguf_sandbox.embed.bert_config import CONFIG_HINT, BertHParams
from gguf_sandbox.embed.checkpoint_reads import (
    FIX_HINT,
    decode,
    json_field,
    optional_json,
    read_capped,
    require_utf8,
    shown,
    strerror,
)
from gguf_sandbox.embed.tokenizer import (
    CONTINUATION,
    KEY_LOWERCASE,
    KEY_STRIP_ACCENTS,
    WORD_START,
    TokenizerOptions,
    WordPieceTokenizer,
)
from gguf_sandbox.errors import GGUFSandboxError
from gguf_sandbox.units import clip, show

# Bytes read at most from tokenizer.json, which takes ~17 MB for a 250k-token vocabulary.
MAX_TOKENIZER_JSON_BYTES = 32 << 20
# vocab.txt: LaBSE's 501,153 tokens take 5 MB.
MAX_VOCAB_TXT_BYTES = 32 << 20
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
class Vocabulary:
    """The WordPiece vocabulary in llama.cpp's GGUF form."""

    tokens: list[str]
    token_types: list[int]
    lowercase: bool
    strip_accents: bool | None
    pre: str


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


def read_tokenizer_files(hf_dir: Path) -> TokenizerFiles:
    tokenizer_path, config_path = hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json"
    tokenizer = optional_json(tokenizer_path, MAX_TOKENIZER_JSON_BYTES)
    config = optional_json(config_path)
    special_map_path = hf_dir / "special_tokens_map.json"
    special_map = optional_json(special_map_path) or {}
    added = [
        _added_token(tokenizer_path, f"added_tokens[{index}]", entry, with_id=True)
        for index, entry in enumerate(json_field(tokenizer_path, tokenizer or {}, "added_tokens", list, []))
    ]
    decoder = json_field(config_path, config or {}, "added_tokens_decoder", dict, {})
    added += [
        _added_token(config_path, f"added_tokens_decoder[{show(key)}]", entry, with_id=False)
        for key, entry in decoder.items()
    ]
    for key in ("normalizer", "post_processor"):
        json_field(tokenizer_path, tokenizer or {}, key, dict)
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
        raise GGUFSandboxError(f"{path}: {where} is {shown(entry)}, expected an object; {FIX_HINT}")
    content = json_field(path, entry, "content", str)
    if content is None:
        raise GGUFSandboxError(f"{path}: {where} has no content; {FIX_HINT}")
    token_id = json_field(path, entry, "id", int) if with_id else None
    if with_id and (token_id is None or token_id < 0):
        raise GGUFSandboxError(
            f"{path}: {where} has id {shown(token_id)}, expected a token id ≥ 0; {FIX_HINT}"
        )
    return AddedToken(content, json_field(path, entry, "special", bool, False), token_id)


def _token_content(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    """A `*_token` field: its string, or an AddedToken object's content; None when absent."""
    value = data.get(key)
    content: str | None = (
        json_field(path, value, "content", str)
        if isinstance(value, dict)
        else json_field(path, data, key, str)
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
            f"{path}: chat_template is {shown(value)}, expected a string or an array of {{name, template}} "
            f"objects; {FIX_HINT}"
        )
    for template in templates:
        require_utf8(f"{path}: chat_template", template, FIX_HINT)


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
                f"{path}: a normalizer is {shown(normalizer)}, expected an object; {FIX_HINT}"
            )
        kind = normalizer.get("type")
        if kind == "Lowercase":
            found["lowercase"] = True
        elif kind == "StripAccents":
            found["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key in ("lowercase", "strip_accents"):
                if key in normalizer:
                    found[key] = json_field(path, normalizer, key, bool)
        elif kind == "Sequence":
            pending.extend(reversed(json_field(path, normalizer, "normalizers", list, [])))
    config_path, config = hf_dir / "tokenizer_config.json", files.config or {}
    lowercase = found.get("lowercase", json_field(config_path, config, "do_lower_case", bool, True))
    strip = found.get("strip_accents", json_field(config_path, config, "strip_accents", bool))
    return bool(lowercase), strip


def read_vocabulary(hf_dir: Path, hparams: BertHParams, files: TokenizerFiles) -> Vocabulary:
    path = hf_dir / "vocab.txt"
    if not path.is_file():
        raise GGUFSandboxError(
            f"{hf_dir}: vocab.txt is missing; a BERT checkpoint needs its WordPiece vocabulary "
            f"(vocab.txt, one token per line)"
        )
    what = "a BERT vocab.txt holds one token per line, in UTF-8"
    data = read_capped(path, MAX_VOCAB_TXT_BYTES, what)
    # Counted before splitting: a file of short lines would make a list far larger than the file.
    count = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
    if count > hparams.vocab_size:
        raise GGUFSandboxError(
            f"{path} has {count} tokens but config.json says vocab_size {hparams.vocab_size}; "
            f"the files belong to different models"
        )
    words = decode(path, data, what).split("\n")
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


def add_vocabulary(
    writer: GGUFWriter,
    hf_dir: Path,
    *,
    config: Mapping[str, Any],
    files: TokenizerFiles,
    vocabulary: Vocabulary,
) -> None:
    """The tokenizer.* keys of llama.cpp's BERT GGUF, and its BertNormalizer keys (newer gguf-py writes them
    from tokenizer.json)."""
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    _add_special_tokens(writer, hf_dir, config=config, files=files, tokens=vocabulary.tokens)
    writer.add_bool(KEY_LOWERCASE, vocabulary.lowercase)
    if vocabulary.strip_accents is not None:
        writer.add_bool(KEY_STRIP_ACCENTS, vocabulary.strip_accents)


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
            f"cannot copy the tokenizer fields to a temporary directory: {strerror(error)}; set TMPDIR"
        ) from error
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise GGUFSandboxError(
            f"{hf_dir}: gguf-py cannot read the special tokens of tokenizer.json/tokenizer_config.json "
            f"({type(error).__name__}: {clip(str(error), 200)}); {FIX_HINT}"
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
        value = json_field(path, config, key, int, hint=CONFIG_HINT)
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
