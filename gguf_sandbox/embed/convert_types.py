"""convert's --type choices: the GGML type each tensor of llama.cpp's BERT layout is stored in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType


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


def tensor_type(name: str, shape: tuple[int, ...], spec: OutType) -> GGMLQuantizationType:
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
