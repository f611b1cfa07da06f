"""The guest image's recipe and cache key, sizes, the chroot script and environment."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from tests.platform.image import (
    EXTRAS,
    GUEST_USER,
    Image,
    base_key,
    checkout_files,
    chroot_env,
    chroot_script,
    image_for,
    install_inputs,
    mkfs_size,
    prune,
    recipe_for,
    vm_cache,
)

REPO = Path(__file__).resolve().parents[2]


def test_key_changes_with_what_goes_into_the_image_and_only_then() -> None:
    recipe = recipe_for(REPO)
    assert recipe.key() == recipe_for(REPO).key()
    changed = [
        dataclasses.replace(recipe, packages=(*recipe.packages, "docker.io")),
        dataclasses.replace(recipe, pyproject=recipe.pyproject + "\n# edited\n"),
        dataclasses.replace(recipe, cell_requirements=("numpy>=2",)),
        dataclasses.replace(recipe, build_version=recipe.build_version + 1),
    ]
    assert len({recipe.key(), *(other.key() for other in changed)}) == 1 + len(changed)


def test_base_key_ignores_the_python_side() -> None:
    recipe = recipe_for(REPO)
    assert base_key(dataclasses.replace(recipe, pyproject="x")) == base_key(recipe)
    assert base_key(dataclasses.replace(recipe, packages=("systemd-sysv",))) != base_key(recipe)


def test_recipe_reads_the_checkouts_pyproject_and_cells_requirements() -> None:
    from gguf_sandbox.sandbox.venvs import RUNTIME_REQUIREMENTS

    recipe = recipe_for(REPO)
    assert recipe.pyproject == install_inputs((REPO / "pyproject.toml").read_text(), EXTRAS)
    assert recipe.cell_requirements == RUNTIME_REQUIREMENTS


PYPROJECT = """
[project]
name = "x"
dependencies = ["numpy>=1.26"]
[project.optional-dependencies]
test = ["pytest>=8"]
lint = ["ruff"]
[tool.pytest.ini_options]
markers = ["a: b"]
"""


def test_install_inputs_follow_dependencies_and_chosen_extras_only() -> None:
    pytest.importorskip("tomllib")
    key = install_inputs(PYPROJECT, ("test",))
    assert install_inputs(PYPROJECT.replace('"a: b"', '"a: b", "c: d"'), ("test",)) == key
    assert install_inputs(PYPROJECT.replace('lint = ["ruff"]', 'lint = ["mypy"]'), ("test",)) == key
    assert install_inputs(PYPROJECT.replace("pytest>=8", "pytest>=9"), ("test",)) != key
    assert install_inputs(PYPROJECT.replace("numpy>=1.26", "numpy>=2"), ("test",)) != key


def test_prune_keeps_only_the_current_image(tmp_path: Path) -> None:
    for name in ("debian-bookworm-old", "debian-bookworm-new", "models-x.img"):
        (tmp_path / name).mkdir()
    removed = prune(tmp_path, keep=tmp_path / "debian-bookworm-new")
    assert removed == [tmp_path / "debian-bookworm-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debian-bookworm-new", "models-x.img"]


def test_image_paths_live_under_the_vm_cache(tmp_path: Path) -> None:
    assert vm_cache({"GGUF_SANDBOX_CACHE": str(tmp_path)}) == tmp_path / "vm"
    image = image_for(recipe_for(REPO), tmp_path)
    assert image.directory.parent == tmp_path
    assert image.directory.name.endswith(recipe_for(REPO).key())
    assert not image.complete()
    for path in (image.rootfs, image.kernel, image.initrd):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert Image(image.directory).complete()


@pytest.mark.parametrize(
    ("content", "slack", "expected_mib"),
    [(0, 0, 0), (1, 0, 64), (64 << 20, 0, 128), (100 << 20, 256 << 20, 384)],
    ids=["empty", "one-byte", "exactly-64m-plus-metadata", "with-slack"],
)
def test_mkfs_size_rounds_up_with_metadata_and_slack(content: int, slack: int, expected_mib: int) -> None:
    assert mkfs_size(content, slack) == expected_mib << 20


def test_chroot_script_makes_the_user_lingering_and_installs_offline_wheels() -> None:
    script = chroot_script(recipe_for(REPO), "/tmp/src")
    assert f"useradd -m -u 1000 -s /bin/bash {GUEST_USER}" in script
    assert f"/var/lib/systemd/linger/{GUEST_USER}" in script
    assert "'/tmp/src[test,mcp]'" in script
    assert "pip download" in script and "PIP_NO_INDEX=1" in script
    assert script.startswith("set -eu")


def test_chroot_env_keeps_no_host_pip_settings() -> None:
    env = chroot_env({"PIP_FIND_LINKS": "/opt/wheels", "PIP_DEFAULT_TIMEOUT": "180", "HOME": "/home/x"})
    assert "PIP_FIND_LINKS" not in env
    assert env["PIP_DEFAULT_TIMEOUT"] == "180"
    assert env["HOME"] == "/root"
    assert env["PIP_CERT"].startswith("/tmp/")


def test_checkout_files_lists_tracked_and_untracked_but_not_ignored(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "x").write_text("x")
    (tmp_path / "new.py").write_text("")
    assert checkout_files(tmp_path) == [".gitignore", "new.py"]
