"""The model families the engine runs, by GGUF architecture: how each is read, tokenized and encoded."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol

from gguf_sandbox.embed import bert, decoder, decoder_shapes, shapes
from gguf_sandbox.embed.decoder import SHORTEST_SEQUENCE_LIMIT
from gguf_sandbox.embed.layout import ModelLayout
from gguf_sandbox.embed.rows import F32, TokenBatch
from gguf_sandbox.embed.tokenizer import WordPieceTokenizer
from gguf_sandbox.embed.tokenizer import vocabulary_bytes as wordpiece_bytes
from gguf_sandbox.errors import GGUFError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import Tokenizer
from gguf_sandbox.tokenizers import from_gguf as decoder_tokenizer
from gguf_sandbox.tokenizers import vocabulary_bytes as decoder_vocabulary_bytes


class TextEncoder(Protocol):
    """Token ids of a text as the model sees them, at most `limit` of them."""

    def __call__(self, text: str, limit: int) -> list[int]: ...


class Encode(Protocol):
    """A family's forward pass: sentence vectors for a batch (bert.encode, decoder.encode)."""

    def __call__(
        self,
        weights: Any,
        batch: TokenBatch,
        cap: int,
        *,
        unit_length: bool = True,
        check_finite: bool = True,
    ) -> F32: ...


@dataclass(frozen=True)
class Family:
    """One family of architectures: its layout reader, its tokenizer and its forward pass."""

    name: str
    read_layout: Callable[[GGUFFile], ModelLayout]
    tokenizer: Callable[[GGUFFile], TextEncoder]
    encode: Encode
    vocabulary_bytes: Callable[[GGUFFile], int]  # what building the tokenizer needs at its peak
    # Tokens per text a plan may fall back to when the full length does not fit (BERT: none).
    shorter_limits: bool
    # The config a streaming pass runs, from the config of the others (decoders: FFN slabs).
    streaming_config: Callable[[Any], Any] = lambda config: config


def _wordpiece(gguf: GGUFFile) -> TextEncoder:
    tokenizer = WordPieceTokenizer.from_gguf(gguf)

    def encode(text: str, limit: int) -> list[int]:
        ids = tokenizer.encode(text)
        return ids[:limit] if len(ids) > limit else ids

    return encode


def _decoder_vocabulary(gguf: GGUFFile) -> TextEncoder:
    tokenizer: Tokenizer = decoder_tokenizer(gguf)

    def encode(text: str, limit: int) -> list[int]:
        ids = tokenizer.encode(text, add_special=True, max_tokens=limit)
        if not ids:
            raise GGUFError(
                "a text with no tokens cannot be embedded: it is empty and the model adds no BOS or EOS token"
            )
        return ids

    return encode


BERT: Final = Family(
    "bert", shapes.read_layout, _wordpiece, bert.encode, wordpiece_bytes, shorter_limits=False
)
DECODER: Final = Family(
    "decoder",
    decoder_shapes.read_layout,
    _decoder_vocabulary,
    decoder.encode,
    decoder_vocabulary_bytes,
    shorter_limits=True,
    streaming_config=decoder.slabbed,
)
FAMILIES: Mapping[str, Family] = MappingProxyType(
    {"bert": BERT, **dict.fromkeys(decoder_shapes.ARCHITECTURES, DECODER)}
)


def family_of(gguf: GGUFFile) -> Family:
    """The family of the file's architecture, or a GGUFError naming the ones the engine runs."""
    arch = gguf.architecture
    family = FAMILIES.get(arch or "")
    if family is None:
        raise GGUFError(
            f"{gguf.path.name}: architecture {arch!r} is not supported by the embedding engine (supported: "
            f"{', '.join(FAMILIES)}); convert a BERT checkpoint with `gguf-sandbox convert`"
        )
    return family


def sequence_limits(family: Family, context_length: int) -> tuple[int, ...]:
    """Tokens per text a plan tries, longest first: the full length, then halves down to the shortest."""
    limits = [context_length]
    while family.shorter_limits and limits[-1] // 2 >= SHORTEST_SEQUENCE_LIMIT:
        limits.append(limits[-1] // 2)
    return tuple(limits)
