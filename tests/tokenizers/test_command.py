"""`gguf-sandbox tokenize`: one JSON line per text, streamed from --input, bounded by --max-tokens."""

from __future__ import annotations

import io
import json
import select
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_sandbox.cli import main
from gguf_sandbox.gguf.reader import GGUFFile
from gguf_sandbox.tokenizers import from_gguf
from tests.tokenizers.vocabularies import write_spm


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_spm(tmp_path / "spm.gguf")


def lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines()]


def expected(model: Path, text: str, **options: object) -> list[int]:
    with GGUFFile.open(model) as gguf:
        return from_gguf(gguf).encode(text, **options)  # type: ignore[arg-type]


def test_texts_then_input_lines(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"hello world\r\nthe\n\n\xff end")
    assert main(["tokenize", "--model", str(model), "abc", "--input", str(source)]) == 0
    texts = ["abc", "hello world", "the", "", "\ufffd end"]
    assert lines(capsys.readouterr().out) == [{"text": t, "ids": expected(model, t)} for t in texts]


def test_stdin_and_no_special(
    model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\nworld\n")))
    assert main(["tokenize", "--model", str(model), "--input", "-", "--no-special"]) == 0
    output = lines(capsys.readouterr().out)
    assert output == [{"text": t, "ids": expected(model, t, add_special=False)} for t in ("hello", "world")]


def test_max_tokens(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(model), "--max-tokens", "2", "hello world the"]) == 0
    assert lines(capsys.readouterr().out)[0]["ids"] == expected(model, "hello world the")[:2]
    assert main(["tokenize", "--model", str(model), "--max-tokens", "0", "hello " * 3000]) == 0
    assert lines(capsys.readouterr().out)[0]["ids"] == expected(model, "hello " * 3000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x", "--max-tokens", "-1"], "must be 0"),
        ([], "no texts"),
        (["--input", "/nonexistent/in.txt"], "cannot read /nonexistent/in.txt"),
    ],
    ids=["negative-max", "no-texts", "missing-input"],
)
def test_bad_arguments_are_one_line_errors(
    model: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokenize", "--model", str(model), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_max_tokens_below_bos_and_eos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_spm(tmp_path / "eos.gguf", edit=lambda writer: writer.add_add_eos_token(True))
    assert main(["tokenize", "--model", str(model), "--max-tokens", "1", "x"]) == 2
    assert "no room for the 2 BOS/EOS ids" in capsys.readouterr().err
    assert main(["tokenize", "--model", str(model), "--max-tokens", "2", "hello"]) == 0
    assert lines(capsys.readouterr().out)[0]["ids"] == [1, 2]


def test_a_bert_model_is_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.embed.test_tokenizer import GGUF_TOKENS, GGUF_TYPES, write_vocab_gguf

    path = write_vocab_gguf(tmp_path / "bert.gguf", GGUF_TOKENS, GGUF_TYPES)
    assert main(["tokenize", "--model", str(path), "x"]) == 2
    assert "'bert'" in capsys.readouterr().err


def test_input_lines_are_answered_as_they_arrive(model: Path) -> None:
    """The answer to a line comes before the next line is written: --input streams, it does not slurp."""
    cli = "import sys; from gguf_sandbox.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", cli, "tokenize", "--model", str(model), "--input", "-"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("hello\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "no answer to the first line while the input stayed open"
        assert json.loads(process.stdout.readline()) == {"text": "hello", "ids": expected(model, "hello")}
        process.stdin.write("world\n")
        process.stdin.close()
        assert json.loads(process.stdout.readline())["text"] == "world"
        assert process.wait(timeout=120) == 0
