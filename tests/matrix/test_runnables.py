"""The runnables' option tables (matrix/runnables.py) match the workload and control command lines."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gguf_sandbox import cli
from gguf_sandbox.embed.bert import POOLING_NAMES
from gguf_sandbox.embed.plan import PlanName
from gguf_sandbox.matrix.runnables import CONTROLS, PLAN_CHOICES, POOLING_CHOICES, WORKLOADS, OptionKind
from gguf_sandbox.workloads import command as workload_command
from gguf_sandbox.workloads import controls


def _options_of(parser: argparse.ArgumentParser, ignore: set[str]) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ignore}


def test_workload_option_tables_match_the_workload_command_line() -> None:
    parser = argparse.ArgumentParser()
    workload_command.add_arguments(parser)
    actions = _options_of(parser, {"help", "model"})
    for name, runnable in WORKLOADS.items():
        assert name in workload_command.WORKLOADS
        # --pooling and --vectors only where the command applies them (it refuses them elsewhere).
        applied = {
            a
            for a in actions
            if (a != "pooling" or name in workload_command.POOLING_WORKLOADS)
            and (a != "vectors" or name in workload_command.VECTOR_WORKLOADS)
        }
        if runnable.peer:  # a peer takes the embed options that mean something to it, not threads or plan
            assert set(runnable.options) == applied - {"threads", "plan"}, name
        else:
            assert set(runnable.options) == applied, name
        for option, declared in runnable.options.items():
            action = actions[option]
            if declared.kind is OptionKind.INTEGER:
                assert action.type is int, option
            if declared.kind is OptionKind.CHOICE:
                assert action.choices is None or set(action.choices) == set(declared.choices)
            assert declared.default == action.default, option
    assert set(WORKLOADS) == set(workload_command.WORKLOADS)
    assert ("auto", *(plan.value for plan in PlanName)) == PLAN_CHOICES
    assert POOLING_NAMES == POOLING_CHOICES


def test_control_option_tables_match_the_controls_command_line() -> None:
    parser = controls.build_parser()
    actions = _options_of(parser, {"help", "model"})
    declared = {name: option for runnable in CONTROLS.values() for name, option in runnable.options.items()}
    assert set(declared) == set(actions)
    for name, option in declared.items():
        kind = {OptionKind.SIZE: controls._size, OptionKind.INTEGER: int}[option.kind]
        assert actions[name].type is kind, name
        assert option.default == actions[name].default
        controls.build_parser().parse_args(["alloc-bomb", f"--{name}", str(option.default)])
    assert set(CONTROLS) == set(controls.CONTROLS)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_the_command_takes_every_option_a_cell_may_set_and_refuses_the_others(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vectors: 8` on a parse or mcp cell, or `pooling` on a sentence-transformers one, loaded fine and every
    such cell then ended as a crash (the command refuses the option with exit 4)."""
    parser = argparse.ArgumentParser()
    workload_command.add_arguments(parser)
    missing = str(tmp_path / "absent.gguf")  # the last check: an option that passed ends there
    for option in _options_of(parser, {"help", "model"}):
        value = {"pooling": "mean", "plan": "auto"}.get(option, "1")
        code = cli.main(["workload", name, "--model", missing, f"--{option}", value])
        err = capsys.readouterr().err
        if option in WORKLOADS[name].options:
            assert code == 4 and "does not exist" in err, (option, err)
        elif option not in ("threads", "plan"):  # ignored by a peer, not refused
            assert code == 4 and "applies to the" in err, (option, err)
