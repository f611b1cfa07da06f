"""BOS/EOS ids and whether encode() adds them, as llama.cpp reads them from GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gguf.constants import Keys

from gguf_sandbox.errors import GGUFError


@dataclass(frozen=True)
class SpecialTokens:
    """The ids encode(add_special=True) puts around the text (None: the vocabulary has no such token)."""

    bos: int | None
    eos: int | None
    add_bos: bool
    add_eos: bool

    @property
    def prefix(self) -> tuple[int, ...]:
        return (self.bos,) if self.add_bos and self.bos is not None else ()

    @property
    def suffix(self) -> tuple[int, ...]:
        return (self.eos,) if self.add_eos and self.eos is not None else ()


@dataclass(frozen=True)
class Defaults:
    """What llama.cpp assumes for a tokenizer model when the GGUF leaves a key out."""

    bos: int
    eos: int
    add_bos: bool


# Per tokenizer.ggml.model; a byte-level BPE pre-tokenizer may turn add_bos on (llama3 does).
DEFAULTS: Mapping[str, Defaults] = MappingProxyType(
    {"llama": Defaults(bos=1, eos=2, add_bos=True), "gpt2": Defaults(bos=11, eos=11, add_bos=False)}
)


def read_special_tokens(
    metadata: Mapping[str, Any], defaults: Defaults, n_tokens: int, *, add_bos: bool | None = None
) -> SpecialTokens:
    """BOS/EOS as llama.cpp resolves them: the file's ids when in range (else the model's defaults, when
    those fit the vocabulary), add_bos_token/add_eos_token when present (else the defaults; add_eos off)."""
    bos = _token_id(metadata, Keys.Tokenizer.BOS_ID, defaults.bos, n_tokens)
    eos = _token_id(metadata, Keys.Tokenizer.EOS_ID, defaults.eos, n_tokens)
    special = SpecialTokens(
        bos=bos,
        eos=eos,
        add_bos=_flag(metadata, Keys.Tokenizer.ADD_BOS, defaults.add_bos if add_bos is None else add_bos),
        add_eos=_flag(metadata, Keys.Tokenizer.ADD_EOS, False),
    )
    for wanted, token, key, flag in (
        (special.add_bos, bos, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.ADD_BOS),
        (special.add_eos, eos, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.ADD_EOS),
    ):
        if wanted and token is None:
            raise GGUFError(
                f"{flag} is on but the file has no usable {key} for its {n_tokens:,}-token vocabulary "
                f"(llama.cpp aborts on it); set {key} or turn {flag} off"
            )
    return special


def _token_id(metadata: Mapping[str, Any], key: str, default: int, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise GGUFError(f"{key} is {value!r}, not a token id; the file is corrupt")
    if value is not None and 0 <= value < n_tokens:
        return value
    # Out of range: llama.cpp warns and keeps its default, itself dropped when it does not fit.
    return default if default < n_tokens else None


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GGUFError(f"{key} is {value!r}, not a boolean; the file is corrupt")
    return value
