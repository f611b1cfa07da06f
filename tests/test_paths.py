"""The one cache-directory rule and its subdirectories."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_sandbox import paths


def test_cache_root_precedence(tmp_path: Path) -> None:
    both = {"GGUF_SANDBOX_CACHE": str(tmp_path / "c"), "XDG_CACHE_HOME": str(tmp_path / "x")}
    assert paths.cache_root(both) == tmp_path / "c"
    assert paths.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "gguf-sandbox"
    assert paths.cache_root({"GGUF_SANDBOX_CACHE": ""}) == Path.home() / ".cache" / "gguf-sandbox"
    assert paths.cache_root({}) == Path.home() / ".cache" / "gguf-sandbox"


def test_subdirectories_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_SANDBOX_CACHE", str(tmp_path))
    found = {
        function.__name__: function()
        for function in (
            paths.models_dir,
            paths.suite_models_dir,
            paths.venvs_dir,
            paths.sources_dir,
            paths.images_dir,
            paths.locks_dir,
        )
    }
    assert all(path.parent == tmp_path for path in found.values())
    assert len(set(found.values())) == len(found)
    assert paths.models_dir(tmp_path / "own") == tmp_path / "own" / "models"
