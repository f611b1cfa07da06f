"""OUT: what convert may write and replace; a refusal or a failure leaves everything as it was, no partial
file behind."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import LlamaFileType

from gguf_sandbox.cli import main as cli_main
from gguf_sandbox.embed.convert import convert
from gguf_sandbox.gguf.reader import GGUFFile
from tests.embed.tiny_checkpoint import EARLIER_GGUF, check_refused, expected_names, write_tiny


# -- hostile OUT: refused in one line (exit 2), nothing replaced, no partial file left ---------------------
def _mknod_null(path: Path) -> None:
    """A character device like /dev/null (1, 3), made in the test's own directory — never a real /dev path."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod of a character device needs root (CAP_MKNOD)")


def _regular(content: bytes) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = tmp_path / "out.gguf"
        out.write_bytes(content)
        return out

    return make


def _node(kind: str) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = tmp_path / "out.gguf"
        if kind == "device":
            _mknod_null(out)
        elif kind == "fifo":
            os.mkfifo(out)
        elif kind == "directory":
            out.mkdir()
            (out / "keep.txt").write_text("mine", encoding="utf-8")
        else:  # a symlink to an earlier GGUF: replacing it would silently change what the link was
            (tmp_path / "target.gguf").write_bytes(EARLIER_GGUF)
            out.symlink_to(tmp_path / "target.gguf")
        return out

    return make


def _checkpoint_file(name: str) -> Callable[[Path, Path], Path]:
    def pick(tmp_path: Path, source: Path) -> Path:
        return source / name

    return pick


def _under_a_file(tmp_path: Path, source: Path) -> Path:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    return tmp_path / "notes.txt" / "out.gguf"


def _linked_input(tmp_path: Path, source: Path) -> Path:
    """OUT outside HF_DIR but the very file HF_DIR's tokenizer_config.json links to (starting as a GGUF)."""
    out = tmp_path / "shared.gguf"
    out.write_bytes(EARLIER_GGUF)
    (source / "tokenizer_config.json").symlink_to(out)
    return out


def _dangling_link(tmp_path: Path, source: Path) -> Path:
    out = tmp_path / "out.gguf"
    out.symlink_to(tmp_path / "gone.gguf")
    return out


def _in_checkpoint(name: str, content: bytes) -> Callable[[Path, Path], Path]:
    def make(tmp_path: Path, source: Path) -> Path:
        out = source / name
        out.write_bytes(content)
        return out

    return make


HOSTILE_OUT: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "device-node": (_node("device"), "out.gguf: not a regular file; give the path of a GGUF file"),
    "fifo": (_node("fifo"), "out.gguf: not a regular file; give the path of a GGUF file"),
    "directory": (_node("directory"), "out.gguf: is a directory; give a file path such as "),
    "symlink": (_node("symlink"), "out.gguf: is a symbolic link; convert replaces a GGUF file itself"),
    "dangling-symlink": (_dangling_link, "out.gguf: a dangling symbolic link; remove it or choose another"),
    "not-gguf": (
        _regular(b"my notes"),
        "out.gguf: exists and is not a GGUF file; left untouched — choose another path or remove it",
    ),
    "empty-file": (_regular(b""), "exists and is not a GGUF file"),
    "checkpoint-weights": (
        _checkpoint_file("model.safetensors"),
        "is the checkpoint's model.safetensors, which convert reads; choose another path",
    ),
    "checkpoint-config": (_checkpoint_file("config.json"), "is the checkpoint's config.json, which convert"),
    # Absent, but convert (and transformers) would read a GGUF written there as the tokenizer next time.
    "absent-checkpoint-file": (_checkpoint_file("tokenizer.json"), "is the checkpoint's tokenizer.json"),
    "checkpoint-directory": (lambda tmp, source: source, "src: is a directory; give a file path such as "),
    "not-gguf-in-checkpoint": (_in_checkpoint("README.md", b"# my model"), "exists and is not a GGUF file"),
    "linked-input": (_linked_input, "is the checkpoint's tokenizer_config.json, which convert reads"),
    "missing-directory": (lambda tmp, source: tmp / "nowhere" / "out.gguf", "nowhere does not exist; create"),
    "file-as-directory": (_under_a_file, "notes.txt is not a directory; create the directory or choose"),
}


def _snapshot(path: Path) -> tuple[int, int, bytes | None, list[str]]:
    """What OUT is: its type, inode, bytes (regular files) and entries (directories)."""
    status = path.lstat()
    data = path.read_bytes() if stat.S_ISREG(status.st_mode) else None
    entries = sorted(p.name for p in path.iterdir()) if stat.S_ISDIR(status.st_mode) else []
    return stat.S_IFMT(status.st_mode), status.st_ino, data, entries


@pytest.mark.parametrize("label", list(HOSTILE_OUT))
def test_hostile_out_is_refused_and_left_alone(
    tmp_path: Path, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_out, message = HOSTILE_OUT[label]
    source = write_tiny(tmp_path / "src")
    out = make_out(tmp_path, source)
    before = _snapshot(out) if os.path.lexists(out) else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    sources = {p.name: p.read_bytes() for p in source.iterdir()}
    check_refused(source, out, message, capsys)
    assert (_snapshot(out) if os.path.lexists(out) else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no partial file
    assert {p.name: p.read_bytes() for p in source.iterdir()} == sources


def test_an_earlier_gguf_is_replaced(tmp_path: Path) -> None:
    source = write_tiny(tmp_path / "src")
    out = tmp_path / "out.gguf"
    out.write_bytes(EARLIER_GGUF)
    convert(source, out, "f32")
    with GGUFFile.open(out) as gguf_file:
        assert set(gguf_file.tensors) == expected_names(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src"]


def test_a_new_file_inside_the_checkpoint_is_written_and_then_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`convert minilm/ minilm/model.gguf`, as llama.cpp's converter writes into the model directory; a second
    run replaces that GGUF. The checkpoint's own files are left as they were."""
    source = write_tiny(tmp_path / "minilm")
    inputs = {p.name: p.read_bytes() for p in source.iterdir()}
    out = source / "model.gguf"
    for out_type, file_type in (("f32", LlamaFileType.ALL_F32), ("q8_0", LlamaFileType.MOSTLY_Q8_0)):
        assert cli_main(["convert", str(source), str(out), "--type", out_type]) == 0
        assert capsys.readouterr().err == ""
        with GGUFFile.open(out) as gguf_file:
            assert gguf_file.metadata["general.file_type"] == file_type
            assert gguf_file.metadata["general.name"] == "minilm"
    assert sorted(p.name for p in source.iterdir()) == sorted([*inputs, "model.gguf"])
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.name != "model.gguf"} == inputs


def test_an_out_name_of_255_bytes_converts(tmp_path: Path) -> None:
    """The partial file's name (".NAME.PID.RANDOM.partial") must fit NAME_MAX too."""
    source = write_tiny(tmp_path / "src")
    out = tmp_path / ("x" * 250 + ".gguf")
    convert(source, out, "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "src"])


def test_a_write_error_is_one_line_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk mid-write: the path and strerror in one line, the earlier GGUF kept, the partial gone."""
    source = write_tiny(tmp_path / "src")
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(EARLIER_GGUF)

    def disk_full(self: GGUFWriter, tensor: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", disk_full)
    assert cli_main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"gguf-sandbox convert: error: cannot write {out}: No space left on device\n"
    assert out.read_bytes() == EARLIER_GGUF
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
