"""What a sentence-transformers checkpoint adds to a BERT one: the Pooling module's mode, max_seq_length."""

from __future__ import annotations

from pathlib import Path

from gguf.constants import PoolingType

from gguf_sandbox.embed.checkpoint_reads import FIX_HINT, json_field, optional_json, read_json, shown
from gguf_sandbox.errors import GGUFSandboxError


def pooling_dir(hf_dir: Path) -> Path:
    """The sentence-transformers Pooling module's folder: modules.json's, else 1_Pooling/."""
    modules = hf_dir / "modules.json"
    if not modules.is_file():
        return hf_dir / "1_Pooling"
    for index, module in enumerate(read_json(modules, FIX_HINT, kind=list)):
        if not isinstance(module, dict):
            raise GGUFSandboxError(
                f"{modules}: entry {index} is {shown(module)}, expected an object; {FIX_HINT}"
            )
        if json_field(modules, module, "type", str) == "sentence_transformers.models.Pooling":
            folder = Path(json_field(modules, module, "path", str, ""))
            if folder.is_absolute() or ".." in folder.parts:
                raise GGUFSandboxError(
                    f"{modules}: the Pooling module's path {shown(str(folder))} leaves the checkpoint "
                    f"directory; a module's path is relative to it"
                )
            return hf_dir / folder
    return hf_dir / "1_Pooling"


def pooling_type(pooling_dir: Path) -> PoolingType:
    """The mode of the Pooling module in `pooling_dir`; mean if there is none."""
    path = pooling_dir / "config.json"
    pooling = optional_json(path)
    if pooling is None:
        return PoolingType.MEAN
    modes = (
        ("pooling_mode_mean_tokens", PoolingType.MEAN),
        ("pooling_mode_cls_token", PoolingType.CLS),
        ("pooling_mode_lasttoken", PoolingType.LAST),
    )
    for key, pooling_type in modes:
        if json_field(path, pooling, key, bool, False):
            return pooling_type
    raise GGUFSandboxError(
        f"{path}: only mean, CLS and last-token pooling can be expressed in GGUF "
        f"(llama.cpp's pooling_type); this model uses another mode"
    )


def max_seq_length(hf_dir: Path) -> int | None:
    path = hf_dir / "sentence_bert_config.json"
    value: int | None = json_field(path, optional_json(path) or {}, "max_seq_length", int)
    if value is not None and value < 2:
        raise GGUFSandboxError(
            f"{path}: max_seq_length {value} leaves no room for [CLS] and [SEP]; it must be at least 2"
        )
    return value
