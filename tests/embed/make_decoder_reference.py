"""Reference fixture: llama.cpp's token ids and MEAN/LAST-pooled embeddings for decoder models.

Run it with the llama-cpp-python environment of tests/tokenizers/make_reference.py (standard library,
numpy and llama_cpp only: gguf_sandbox is not importable there), after the test models are in the cache:

    /work/venvs/llama/bin/python tests/embed/make_decoder_reference.py
    /work/venvs/llama/bin/python tests/embed/make_decoder_reference.py --model qwen2=PATH --model qwen3=PATH
    python tests/embed/dequantize_gguf.py MODEL.gguf MODEL-f32.gguf   # the main venv (gguf-py)
    /work/venvs/llama/bin/python tests/embed/make_decoder_reference.py \
        --exact NAME-f32=MODEL-f32.gguf@MODEL.gguf

Without --model it records the two real models (smollm2, gemma3) from the cache; with --model it records
only the models named and merges them into the existing fixture (same sentences, same llama-cpp-python
version, else it refuses: rerun with --fresh and every model). Each model runs in a child process: a
failed llama_decode leaves llama-cpp-python's context corrupt (it aborts with a double free at close).

What is recorded, per model and sentence: the token ids embed() feeds to llama.cpp
(`tokenize(text.encode(), add_bos=True, special=False)`: add_special per the model's GGUF flags), and for
LLAMA_POOLING_TYPE_MEAN and _LAST the pooled vector as returned (`embed(text)`) and L2-normalized
(llama-cpp-python's own normalize_embedding, which is what `embed(text, normalize=True)` applies; the
script checks the two agree). Plus probes: is attention causal (per-token outputs of a prefix against
the full sentence), is MEAN the mean and LAST the last row of the per-token outputs, what llama.cpp
logs about the model's hyperparameters, and (--batch-check) whether embedding a list changes vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.tokenizers.sentences
from tests.tokenizers.sentences import SENTENCES as TOKENIZER_SENTENCES

FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp_decoder_reference.json"
# The files tests/models.py caches (same names, same cache-directory rule).
DEFAULT_MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}
SIGNIFICANT_DIGITS = 7
N_CTX = 1024  # n_ctx = n_batch = n_ubatch: every sentence is one ubatch, as the engine sees it
POOLINGS = {"mean": 1, "last": 3}  # llama_cpp.LLAMA_POOLING_TYPE_MEAN, _LAST (checked at run time)
BATCH_CHECK_MAX_TOKENS = 100  # --batch-check embeds the sentences up to this length as one list

_PROSE = (
    "Memory limits are enforced by the kernel: when a container exceeds its cgroup limit, the OOM killer "
    "terminates the largest process, often the Python interpreter that was embedding text with a model "
    "it had read into memory all at once. Streaming the weights layer by layer keeps the working set "
    "small, at the price of reading the file again for every batch. "
)
_PICKED = (
    "plain",
    "question",
    "accents",
    "chinese",
    "emoji",
    "code-python",
    "json",
    "space-run-40",
    "mixed-whitespace",
    "single-char",
    "empty",
)
_TEXTS = dict(TOKENIZER_SENTENCES)
# (label, text): the tokenizer reference's sentences where they fit, plus a word, ~200 tokens, and a text
# past gemma3's 512-token sliding window (so a forward pass that ignores the window cannot match it).
SENTENCES: tuple[tuple[str, str], ...] = (
    *((label, _TEXTS[label]) for label in _PICKED),
    ("single-word", "Embeddings"),
    ("long-200", _PROSE * 3),
    ("past-window", " ".join(f"{_PROSE}({n})" for n in range(8))),
)
# A prefix, the prefix with a tail, and with another tail of the same token count (see probe_attention).
CAUSAL_PROBE = (
    "The quick brown fox jumps over",
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy cat.",
)
LOG_KEYS = (
    "arch",
    "n_embd",
    "n_layer",
    "n_head",
    "n_head_kv",
    "n_rot",
    "n_swa",
    "is_swa_any",
    "n_embd_head_k",
    "f_norm_rms_eps",
    "f_attn_scale",
    "causal attn",
    "pooling type",
    "rope type",
    "rope scaling",
    "freq_base_train",
    "freq_scale_train",
    "freq_base_swa",
    "freq_scale_swa",
    "n_rot_swa",
    "causal_attn",
    "flash_attn",
    "n_ctx_seq",
    "type_k",
)


def cache_dir() -> Path:
    base = Path(os.environ.get("GGUF_SANDBOX_CACHE", Path.home() / ".cache" / "gguf-sandbox"))
    return base / "test-models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _vector(values: Any) -> list[float]:
    return [_round(float(x)) for x in values]


def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# --exact runs: K and V kept in float32 (type_k/type_v 0 = GGML_TYPE_F32) instead of llama.cpp's f16.
KV_F32 = os.environ.get("MAKE_DECODER_REFERENCE_KV") == "f32"


def _llama(path: Path, pooling: int, verbose: bool = False) -> Any:
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if KV_F32 else {}
    return Llama(
        **kv,
        model_path=str(path),
        embedding=True,
        pooling_type=pooling,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=1,
        n_threads_batch=1,
        verbose=verbose,
    )


def _tokenize(model: Any, text: str) -> list[int]:
    # What Llama.embed() does: self.tokenize(text.encode("utf-8")) with the defaults add_bos=True,
    # special=False; add_bos is llama.cpp's add_special, so BOS/EOS follow the GGUF's add_*_token flags.
    return [int(t) for t in model.tokenize(text.encode("utf-8"), add_bos=True, special=False)]


def llama_log(path: Path) -> dict[str, str]:
    """The hyperparameters llama.cpp prints while loading `path` for embedding (print_info, context)."""
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):  # llama-cpp-python's log callback prints to sys.stderr
        model = _llama(path, LLAMA_POOLING_TYPE_MEAN, verbose=True)
        model.close()
    found: dict[str, str] = {}
    for line in captured.getvalue().splitlines():
        match = re.match(r"(print_info|llama_context|llama_kv_cache\w*): +([\w ]+?) += (.*)$", line)
        if match and match.group(2).strip() in LOG_KEYS:
            found.setdefault(match.group(2).strip(), match.group(3).strip())
    return found


def probe_empty(path: Path) -> str:
    """What embed() does with a sentence of no tokens, in a child process (it can corrupt the context)."""
    code = (
        "import sys, llama_cpp\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.embed.make_decoder_reference import _llama\n"
        "m = _llama(sys.argv[1], llama_cpp.LLAMA_POOLING_TYPE_MEAN)\n"
        "try:\n    m.embed('')\nexcept Exception as e:\n    print(f'{type(e).__name__}: {e}', flush=True)\n"
        "else:\n    print('embedded', flush=True)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), root],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    outcome = done.stdout.strip() or "no output"
    status = "exit 0" if done.returncode == 0 else f"exit {done.returncode}"
    tail = [line for line in done.stderr.splitlines() if "corruption" in line or "n_tokens == 0" in line]
    return f"{outcome} ({status}{'; stderr: ' + ' | '.join(tail) if tail else ''})"


def per_token(path: Path, texts: list[str]) -> list[Any]:
    """LLAMA_POOLING_TYPE_NONE outputs (one row per token) for each text, each embedded alone."""
    import numpy as np
    from llama_cpp import LLAMA_POOLING_TYPE_NONE

    model = _llama(path, LLAMA_POOLING_TYPE_NONE)
    rows = [np.asarray(model.embed(text), dtype=np.float64) for text in texts]
    model.close()
    return rows


def record_model(path: Path, batch_check: bool) -> dict[str, Any]:
    """Everything the fixture holds for one model (runs in the child process)."""
    import llama_cpp
    import numpy as np
    from llama_cpp._internals import normalize_embedding

    expected = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}
    if expected != POOLINGS:
        raise SystemExit(f"llama_cpp pooling constants changed: {expected}")
    entry: dict[str, Any] = {"file": path.name, "sha256": sha256(path), "llama_log": llama_log(path)}
    entry["kv_cache"] = "f32" if KV_F32 else "f16"
    ids: dict[str, list[int]] = {}
    not_embeddable: dict[str, str] = {}
    vectors: dict[str, dict[str, list[float]]] = {label: {} for label, _ in SENTENCES}
    checks: dict[str, Any] = {}
    empty_outcome: list[str] = []  # probed once, in a child process
    raw: dict[tuple[str, str], Any] = {}
    for pooling_name, pooling in POOLINGS.items():
        model = _llama(path, pooling)
        if pooling_name == "mean":
            meta = model.metadata
            arch = meta["general.architecture"]
            entry["architecture"] = arch
            entry["n_embd"] = int(model.n_embd())
            entry["metadata"] = {
                key: value
                for key, value in sorted(meta.items())
                if key.startswith(f"{arch}.")
                or key in ("general.name", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre")
                or (key.startswith("tokenizer.ggml.") and key.endswith(("_token", "_token_id")))
            }
        worst_normalize = 0.0
        for label, text in SENTENCES:
            tokens = _tokenize(model, text)
            ids[label] = tokens
            if not tokens:
                if not empty_outcome:
                    empty_outcome.append(probe_empty(path))
                not_embeddable[label] = f"no tokens; embed() gives: {empty_outcome[0]}"
                vectors.pop(label, None)
                continue
            if len(tokens) > N_CTX:
                # llama.cpp refuses it (the engine cuts it to its sequence limit): nothing to compare.
                not_embeddable[label] = f"{len(tokens)} tokens, more than n_ctx {N_CTX}"
                vectors.pop(label, None)
                continue
            vector, count = model.embed(text, return_count=True)
            if count != len(tokens):
                raise SystemExit(f"{label}: embed() counted {count} tokens, tokenize() gave {len(tokens)}")
            normalized = normalize_embedding(vector)
            if label == "plain":  # the API's own normalize=True path gives the same numbers
                worst_normalize = _max_abs(model.embed(text, normalize=True), normalized)
            raw[(label, pooling_name)] = np.asarray(vector, dtype=np.float64)
            vectors[label][pooling_name] = _vector(vector)
            vectors[label][f"{pooling_name}_normalized"] = _vector(normalized)
        checks[f"{pooling_name}_normalize_true_vs_normalize_embedding_max_abs"] = worst_normalize
        if batch_check:
            short = [
                (label, text)
                for label, text in SENTENCES
                if label not in not_embeddable and len(ids[label]) <= BATCH_CHECK_MAX_TOKENS
            ]
            together = model.embed([text for _, text in short])
            pairs = [
                (np.asarray(vector), raw[(label, pooling_name)])
                for (label, _), vector in zip(short, together, strict=True)
            ]
            checks[f"batch_{pooling_name}"] = {
                "labels": [label for label, _ in short],
                "max_abs_diff_vs_alone": max(_max_abs(a, b) for a, b in pairs),
                # How closely llama.cpp agrees with itself: the same sentence embedded in one call with the
                # others (other kernel shapes, so other rounding) against embedded alone.
                "min_cosine_vs_alone": _round(
                    min(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in pairs)
                ),
            }
        model.close()
    entry["ids"] = ids
    entry["not_embeddable"] = not_embeddable
    entry["embeddings"] = vectors
    entry["checks"] = checks | probe_attention(path, raw)
    return entry


def probe_attention(path: Path, raw: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """Causality by experiment, and what MEAN / LAST pool (per-token rows of the final hidden states).

    Causal attention shows as: another tail of the same length leaves the prefix rows exactly as they were.
    The prefix alone (a shorter batch) can differ on some rows from llama.cpp's kernels alone: recorded.
    """
    import numpy as np

    prefix, full, other = CAUSAL_PROBE
    plain = dict(SENTENCES)["plain"]
    prefix_rows, full_rows, other_rows, plain_rows = per_token(path, [prefix, full, other, plain])
    n = len(prefix_rows)
    if len(other_rows) != len(full_rows):
        raise SystemExit(f"{path.name}: the causal probe's two tails tokenize to different lengths")
    scale = float(np.max(np.abs(full_rows[:n])))
    return {
        "causal_probe": {
            "prefix": prefix,
            "full": full,
            "other_tail": other,
            "prefix_tokens": n,
            "same_length_other_tail_max_abs_diff_prefix_rows": _max_abs(other_rows[:n], full_rows[:n]),
            "prefix_alone_max_abs_diff_per_row": [
                _max_abs(a, b) for a, b in zip(prefix_rows, full_rows, strict=False)
            ],
            "max_abs_of_those_rows": scale,
            "max_abs_diff_last_row_of_prefix_vs_full_last_row": _max_abs(prefix_rows[-1], full_rows[-1]),
        },
        "pooling_probe": {
            "sentence": "plain",
            "mean_minus_mean_of_rows_max_abs": _max_abs(raw[("plain", "mean")], plain_rows.mean(axis=0)),
            "last_minus_last_row_max_abs": _max_abs(raw[("plain", "last")], plain_rows[-1]),
        },
    }


def worker(path: Path, batch_check: bool) -> None:
    print(json.dumps(record_model(path, batch_check)), flush=True)


def _dump(value: Any, indent: int) -> str:
    """JSON with dicts indented and lists of scalars on one line (vectors stay one line each)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad} {json.dumps(k)}: {_dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(value, ensure_ascii=False)


def write_fixture(reference: dict[str, Any], path: Path) -> None:
    text = _dump(reference, 0) + "\n"
    if json.loads(text) != reference:
        raise SystemExit("internal error: the hand-assembled fixture does not round-trip")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


NOTES = {
    "source": (
        "llama.cpp as vendored in llama-cpp-python 0.3.36 (sdist vendor/llama.cpp); file:line as of that copy"
    ),
    "causal": (
        "Decoder models embed with causal attention: llama_context ctor "
        "(src/llama-context.cpp:224-228) sets cparams.causal_attn = hparams.causal_attn unless "
        "attention_type is given (llama-cpp-python passes UNSPECIFIED); hparams.causal_attn defaults "
        "to true (src/llama-hparams.h:232) and is read from {arch}.attention.causal only if present "
        "(src/llama-model.cpp:1324), which neither real file has. The mask: "
        "llama_kv_cache::set_input_kq_mask -> set_input_kq_mask_impl drops key p0 > query p1 "
        "(src/llama-kv-cache.cpp ~1676). Experiment: checks.causal_probe - another tail of the same "
        "token count leaves the prefix's rows bit-identical. The prefix embedded alone (fewer tokens "
        "in the ubatch) gives slightly different rows on gemma3 (prefix_alone_max_abs_diff_per_row: "
        "up to ~1.7 of ~70 on its last rows), and smollm2's vectors change when embedded in a list "
        "(checks.batch_*): llama.cpp's kernels depend on the batch shape. Every vector here is its "
        "sentence embedded alone."
    ),
    "sliding_window": (
        "gemma3: llama_model_gemma3::load_arch_hparams (src/models/gemma3.cpp) sets swa_type STANDARD "
        "when gemma3.attention.sliding_window > 0 (512 in the 270m file) and load_swa_pattern(ml, 6) "
        "-> llama_hparams::set_swa_pattern (src/llama-hparams.cpp:8): layer il is SWA iff il % 6 < 5, "
        "so layers 5, 11, 17 are global. Masked iff p1 - p0 >= n_swa (llama_hparams::is_masked_swa, "
        "src/llama-hparams.h:475): a query sees itself and the 511 keys before it. Applied in "
        "embedding mode too (same kq mask). Sentence past-window exceeds 512 tokens to exercise it."
    ),
    "rope": (
        "llama_model_rope_type (src/llama-model.cpp:3023): LLAMA -> NORM (consecutive pairs, line "
        "3095); QWEN2, QWEN3, GEMMA3 -> NEOX (halves, line 3177). gemma3 per layer: "
        "llama_model::get_rope_freq_base (src/llama-model.cpp:2329) uses "
        "hparams.rope_freq_base_train_swa on SWA layers, read from gemma3.rope.freq_base_swa if "
        "present (absent in the 270m file) else the default 10000 (src/llama-hparams.h:151); global "
        "layers use gemma3.rope.freq_base (1e6). See llama_log."
    ),
    "gemma3_graph": (
        "llama_model_gemma3::graph (src/models/gemma3.cpp): inputs scaled by sqrt(n_embd); RMSNorm "
        "weights used as stored - the converter already added 1 (conversion/gemma.py "
        "Gemma3Model.norm_shift / modify_tensors: every *norm.weight + 1.0, incl. q_norm/k_norm); q/k "
        "RMSNorm per head then RoPE; Q scaled by f_attention_scale = 1/sqrt(n_embd_head_k) = 1/16 "
        "(load_arch_hparams; 1/sqrt(n_embd/n_head) only for 27B), build_attn kq_scale 1.0; "
        "attn_post_norm, residual, ffn_norm, GeGLU (LLM_FFN_GELU + LLM_FFN_PAR: tanh GELU, fp16 "
        "lookup table on CPU, ggml-cpu/vec.h GGML_GELU_FP16), ffn_post_norm, residual; final "
        "output_norm."
    ),
    "pooling": (
        "Pooling is over res->t_embd = the final RMSNorm output (build_pooling, src/llama-graph.cpp "
        "~3736). LAST: llm_graph_input_cls::set_input (src/llama-graph.cpp:280) picks per sequence "
        "the row with the largest position, i.e. the last token fed - an EOS too if the tokenizer "
        "added one (neither real model adds EOS: add_eos_token false). MEAN: mean over the sequence's "
        "rows. checks.pooling_probe confirms both against LLAMA_POOLING_TYPE_NONE rows."
    ),
    "empty": (
        "A text with no tokens (smollm2 adds no BOS) makes llama_context::decode log 'n_tokens == 0' "
        "and return -1 (src/llama-context.cpp:1719); embed() raises RuntimeError and the context is "
        "then corrupt (abort 'double free or corruption' at close), hence the child-process probe. "
        "gemma3 adds BOS, so its empty text embeds the BOS token alone."
    ),
    "numerics": (
        "llama.cpp defaults here: f16 KV cache (K and V rounded to f16), flash attention off; with "
        "Q4_x/Q8_0 weights the CPU kernels quantize each activation row to Q8_0/Q8_1/Q8_K before the "
        "dot product. Expect the engine to agree to ~1e-2 relative, not 1e-6."
    ),
    "vectors": (
        "mean/last are embed(text) as returned (no normalization), rounded to 7 significant digits; "
        "*_normalized are llama_cpp._internals.normalize_embedding of the same vector (what "
        "embed(normalize=True) applies; checks.*_normalize_true_* is the max difference on sentence "
        "plain)."
    ),
}


def build_reference(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "generator": "tests/embed/make_decoder_reference.py",
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "call": (
            f"Llama(path, embedding=True, pooling_type=MEAN|LAST, n_ctx={N_CTX}, n_batch={N_CTX}, "
            f"n_ubatch={N_CTX}, n_threads=1).embed(text); ids = tokenize(text.encode(), add_bos=True, "
            "special=False)"
        ),
        "significant_digits": SIGNIFICANT_DIGITS,
        "notes": NOTES,
        "texts": {label: text for label, text in SENTENCES},
        "models": models,
    }


def run_worker(path: Path, batch_check: bool, *, exact: bool = False) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path)]
    if batch_check:
        command.append("--worker-batch-check")
    env = {**os.environ, "MAKE_DECODER_REFERENCE_KV": "f32" if exact else "f16"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker for {path} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def parse_model(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, Path(path)


def parse_exact(spec: str) -> tuple[str, Path, Path]:
    name, path = parse_model(spec)
    f32, sep, source = str(path).partition("@")
    if not sep or not f32 or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=F32_PATH@SOURCE_PATH, got {spec!r}")
    return name, Path(f32), Path(source)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=parse_model, action="append", default=[], metavar="NAME=PATH",
        help="record this model and merge it into the fixture (repeatable; default: smollm2 and gemma3)",
    )  # fmt: skip
    parser.add_argument(
        "--exact", type=parse_exact, action="append", default=[], metavar="NAME=F32_PATH@SOURCE_PATH",
        help="record an all-F32 copy of SOURCE (tests/embed/dequantize_gguf.py) with a float32 KV cache: "
        "llama.cpp without its quantized activations and f16 K/V, the engine's exact reference",
    )  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="start a new fixture instead of merging")
    parser.add_argument(
        "--batch-check", action="append", default=None, metavar="NAME",
        help="models whose list-vs-alone batch check runs (default: smollm2 and gemma3)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=FIXTURE)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.worker_batch_check)
        return 0
    exact = {name: (f32, source) for name, f32, source in args.exact}
    paths = dict(args.model)
    if not paths and not exact:
        paths = {name: cache_dir() / file for name, file in DEFAULT_MODELS.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: run `python -m pytest tests/embed` once to fetch them"
        )
    batch_check = set(args.batch_check or ["smollm2", "gemma3"])
    fresh = build_reference({})
    models: dict[str, Any] = {}
    if args.output.is_file() and not args.fresh:
        old = json.loads(args.output.read_text(encoding="utf-8"))
        for key in ("llama_cpp_python", "texts", "call", "significant_digits"):
            if old[key] != fresh[key]:
                raise SystemExit(
                    f"the fixture's {key!r} differs from this run's: rerun with --fresh and every model"
                )
        models = old["models"]
    for name, path in paths.items():
        print(f"{name}: {path}", flush=True)
        models[name] = run_worker(path, name in batch_check)
    for name, (f32, source) in exact.items():
        print(f"{name}: {f32} (all F32, from {source}), float32 KV cache", flush=True)
        models[name] = run_worker(f32, batch_check=False, exact=True)
        models[name]["dequantized_from"] = {"file": source.name, "sha256": sha256(source)}
    write_fixture(build_reference(models), args.output)
    print(f"wrote {args.output}: models {', '.join(models)}, {args.output.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
