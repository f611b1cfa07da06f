"""Reference fixture: llama.cpp's token ids (llama-cpp-python) for the fixed sentences, on the real models.

Run it with an environment that has llama-cpp-python (built once into a wheel; numpy is its only
dependency), after the test models are in the cache (`python -m pytest tests/tokenizers` fetches them):

    python3.11 -m venv /work/venvs/llama
    /work/venvs/llama/bin/pip install llama_cpp_python-0.3.36-*.whl numpy
    /work/venvs/llama/bin/python tests/tokenizers/make_reference.py

It records `Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=…, special=False)` with add_bos
(llama.cpp's add_special) on and off. `--worker PATH` serves the same call as JSON lines on stdin/stdout
for compare_llama.py. Standard library and llama_cpp only: gguf_sandbox is not importable here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.tokenizers.sentences
from tests.tokenizers.sentences import SENTENCES

FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp_token_ids.json"
# The files tests/models.py caches (same names, same cache-directory rule).
MODEL_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}


def cache_dir() -> Path:
    base = Path(os.environ.get("GGUF_SANDBOX_CACHE", Path.home() / ".cache" / "gguf-sandbox"))
    return base / "test-models"


def load(path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def tokenize(model: Any, text: str, add_special: bool) -> list[int]:
    return [int(token) for token in model.tokenize(text.encode(), add_bos=add_special, special=False)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_reference(paths: dict[str, Path]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, path in paths.items():
        model = load(path)
        models[name] = {
            "file": path.name,
            "sha256": sha256(path),
            "ids": {label: tokenize(model, text, True) for label, text in SENTENCES},
            "ids_without_special": {label: tokenize(model, text, False) for label, text in SENTENCES},
        }
    return {
        "generator": "tests/tokenizers/make_reference.py",
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "call": "Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=add_special, special=False)",
        "texts": {label: text for label, text in SENTENCES},
        "models": models,
    }


def write_fixture(reference: dict[str, Any], path: Path) -> None:
    """One line per sentence keeps the file diffable."""
    lines = ["{"]
    for key in ("generator", "llama_cpp_python", "call"):
        lines.append(f" {json.dumps(key)}: {json.dumps(reference[key])},")
    texts = [
        f"  {json.dumps(label)}: {json.dumps(text, ensure_ascii=False)}"
        for label, text in reference["texts"].items()
    ]
    lines += [' "texts": {', ",\n".join(texts), " },", ' "models": {']
    model_blocks = []
    for name, entry in reference["models"].items():
        block = [
            f"  {json.dumps(name)}: {{",
            f'   "file": {json.dumps(entry["file"])},',
            f'   "sha256": "{entry["sha256"]}",',
        ]
        for key in ("ids", "ids_without_special"):
            rows = [
                f"    {json.dumps(label)}: {json.dumps(ids, separators=(',', ':'))}"
                for label, ids in entry[key].items()
            ]
            block += [f"   {json.dumps(key)}: {{", ",\n".join(rows), "   }" + ("," if key == "ids" else "")]
        block.append("  }")
        model_blocks.append("\n".join(block))
    lines += [",\n".join(model_blocks), " }", "}"]
    text = "\n".join(lines) + "\n"
    if json.loads(text) != reference:
        raise SystemExit("internal error: the hand-assembled fixture does not round-trip")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def serve(path: Path) -> None:
    """JSON lines in ({"text", "add_special"}), JSON lines out ({"ids"}), until stdin ends."""
    model = load(path)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps({"ids": tokenize(model, request["text"], request["add_special"])}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, file_name in MODEL_FILES.items():
        parser.add_argument(f"--{name}", type=Path, default=cache_dir() / file_name, help=f"the {name} GGUF")
    parser.add_argument("--worker", type=Path, metavar="GGUF", help="serve tokenize() for one model instead")
    parser.add_argument("--output", type=Path, default=FIXTURE)
    args = parser.parse_args()
    if args.worker is not None:
        serve(args.worker)
        return 0
    paths = {name: getattr(args, name) for name in MODEL_FILES}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: run `python -m pytest tests/tokenizers` once to fetch them"
        )
    write_fixture(build_reference(paths), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
