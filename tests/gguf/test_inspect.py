"""Tests for gguf/inspect.py: the --json summary is valid JSON for any metadata a file holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from gguf_sandbox.cli import main


def _strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as JSON parsers other than Python's do."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metadata_is_a_string_in_json(
    tmp_path: Path, value: float, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "bert")
    writer.add_float32("bert.attention.layer_norm_epsilon", value)
    writer.add_array("odd.values", [1.5, value])
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["inspect", "--json", str(path)]) == 0
    summary = _strict_json(capsys.readouterr().out)
    assert isinstance(summary, dict)
    assert summary["metadata"]["bert.attention.layer_norm_epsilon"] == repr(value)
    assert summary["metadata"]["odd.values"]["head"] == [1.5, repr(value)]
    assert main(["inspect", str(path)]) == 0
    assert repr(value) in capsys.readouterr().out
