"""The command line: every subcommand's errors read `gguf-sandbox SUBCOMMAND: error: …`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from gguf_sandbox import cli

SUBCOMMANDS = [sub.name for sub in cli.SUBCOMMANDS]
# Arguments that satisfy each subcommand's required ones, so only the unknown option is wrong.
REQUIRED = {
    "inspect": ["x.gguf"],
    "convert": ["hf", "out.gguf"],
    "embed": ["--model", "x.gguf"],
    "workload": ["parse", "--model", "x.gguf"],
    "run": [],
    "merge": ["a.jsonl", "-o", "all.jsonl"],
    "report": ["a.jsonl", "--output", "out"],
    "repro": ["--python", "3.12", "--memory", "64m", "--workload", "parse"],
    "floor": ["--workload", "parse"],
    "images": ["build"],
    "serve": ["--model", "x.gguf"],
    "tokenize": ["--model", "x.gguf"],
}


def error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_every_subcommand_is_covered() -> None:
    assert set(REQUIRED) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_missing_arguments_name_the_subcommand(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line([name, "--no-such-option"], capsys)
    assert line.startswith(f"gguf-sandbox {name}: error: "), line


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_unknown_options_name_the_subcommand(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's top-level parser used to report these as `gguf-sandbox: error: unrecognized arguments`.
    line = error_line([name, *REQUIRED[name], "--no-such-option"], capsys)
    assert line == f"gguf-sandbox {name}: error: unrecognized arguments: --no-such-option", line


def test_our_errors_name_the_subcommand_even_with_a_command_after_dashes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # repro's `-- CMD …` is stored as `command`, which used to overwrite the subcommand's name:
    # "gguf-sandbox ['--', 'python', '-c', '1']: error: …".
    code = cli.main(["repro", "--python", "3.12", "--memory", "1x", "--", "python", "-c", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "gguf-sandbox repro: error: --memory: '1x' is not a size; write a number with an optional unit "
        "k/m/g/t (binary: 64m = 64 MiB), e.g. 64m, 512m, 1g"
    )


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["parse", "stream", "mcp"])
def test_workload_pooling_is_refused_where_it_would_be_ignored(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was silently ignored: `workload mcp --pooling mean` reported the model's pooling, exit 0.
    assert cli.main(["workload", name, "--model", "x.gguf", "--pooling", "mean"]) == 4
    err = capsys.readouterr().err.strip()
    assert err == (
        f"gguf-sandbox workload: ValueError: --pooling applies to the embed, embed-concurrent, llama-cpp and "
        f"gguf-py workloads only, not {name}"
    )


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_output_is_utf8_whatever_pythonioencoding_says(tmp_path: Path, encoding: str) -> None:
    # A latin-1 stdout made `embed "€ …"` a traceback: JSON leaves as UTF-8, as RFC 8259 has it.
    path = tmp_path / "euro.gguf"
    writer = GGUFWriter(str(path), "bert")
    writer.add_name("€uro ☃")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    done = subprocess.run(
        [sys.executable, "-m", "gguf_sandbox", "inspect", "--json", str(path)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert json.loads(done.stdout.decode("utf-8"))["metadata"]["general.name"] == "€uro ☃"


def test_an_allocation_a_limit_refuses_is_exit_3_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A limit the budget cannot see (an address-space rlimit) refusing an allocation: one line, exit 3 like
    the budget's own refusals, not a traceback."""
    from gguf_sandbox.embed import command

    def refused(_: object) -> int:
        # numpy's _ArrayMemoryError, a MemoryError, says it so.
        raise MemoryError(
            "Unable to allocate 44.7 MiB for an array with shape (30522, 384) and data type float32"
        )

    monkeypatch.setattr(command, "run", refused)
    assert cli.main(["embed", "--model", "x.gguf", "a text"]) == 3
    assert capsys.readouterr().err == (
        "gguf-sandbox embed: error: out of memory: Unable to allocate 44.7 MiB for an array with shape "
        "(30522, 384) and data type float32\n"
    )
