"""Cell images: content hash, interpreter payload, cached builds, every Python version, clear failures."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_sandbox.errors import SandboxError
from gguf_sandbox.sandbox.docker import images
from gguf_sandbox.sandbox.docker.context import build_lock, content_hash, context_tar, project_files
from gguf_sandbox.sandbox.docker.engine import engine_client, labels_of
from gguf_sandbox.sandbox.docker.images import DEFAULT_PYTHONS, build_image, ensure_image
from gguf_sandbox.sandbox.docker.names import HASH_LABEL, base_tag, image_tag
from gguf_sandbox.sandbox.docker.offline import find_local_interpreter, interpreter_payload

PROJECT = Path(__file__).resolve().parents[3]
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
TEST_REPOSITORY = "gguf-sandbox-test"


def snapshot(destination: Path) -> Path:
    """A private copy of the sources (others may edit the tree while we build), made unique by a marker."""
    (destination / "images").mkdir(parents=True)
    shutil.copy2(PROJECT / "pyproject.toml", destination / "pyproject.toml")
    shutil.copy2(PROJECT / "images" / "Dockerfile", destination / "images" / "Dockerfile")
    shutil.copytree(
        PROJECT / "gguf_sandbox", destination / "gguf_sandbox", ignore=shutil.ignore_patterns("__pycache__")
    )
    (destination / "gguf_sandbox" / "_snapshot_marker.py").write_text(f"MARKER = {uuid.uuid4().hex!r}\n")
    return destination


# ---------------------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("bad", ["3", "py3.12", "3.12.1", "2.7x", ""], ids=lambda v: v or "empty")
def test_malformed_python_version_is_refused(bad: str) -> None:
    with pytest.raises(SandboxError, match=r"3\.X"):
        image_tag(bad)


def test_tags_name_the_version() -> None:
    assert image_tag("3.12") == "gguf-sandbox:py3.12"
    assert base_tag("3.10") == "gguf-sandbox-base:py3.10"


def test_project_files_hold_the_dockerfile_and_sources_but_no_bytecode(tmp_path: Path) -> None:
    project = snapshot(tmp_path / "p")
    (project / "gguf_sandbox" / "__pycache__").mkdir()
    (project / "gguf_sandbox" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    names = [name for name, _ in project_files(project)]
    assert names == sorted(names)
    assert "Dockerfile" in names and "pyproject.toml" in names
    assert "gguf_sandbox/__init__.py" in names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_missing_project_parts_are_named(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(SandboxError, match="Dockerfile is missing"):
        project_files(tmp_path)


def test_content_hash_follows_sources_dockerfile_and_version(tmp_path: Path) -> None:
    project = snapshot(tmp_path / "p")
    first = content_hash("3.12", project_files(project))
    assert content_hash("3.12", project_files(project)) == first
    assert content_hash("3.11", project_files(project)) != first
    (project / "gguf_sandbox" / "_snapshot_marker.py").write_text("MARKER = 'changed'\n")
    changed = content_hash("3.12", project_files(project))
    assert changed != first
    with (project / "images" / "Dockerfile").open("a") as dockerfile:
        dockerfile.write("# comment\n")
    assert content_hash("3.12", project_files(project)) != changed


def test_local_interpreter_payload_is_relocatable_and_lean() -> None:
    layout = find_local_interpreter(PYTHON)
    assert layout is not None, f"the running Python {PYTHON} should be discoverable"
    assert layout.version == PYTHON
    payload = dict(interpreter_payload(layout))
    assert f"bin/python{PYTHON}" in payload
    stdlib = f"lib/python{PYTHON}"
    assert f"{stdlib}/os.py" in payload
    assert not any(name.startswith((f"{stdlib}/site-packages/", f"{stdlib}/test/")) for name in payload)
    assert not any(name.endswith(".a") for name in payload)


def test_missing_interpreter_is_none() -> None:
    assert find_local_interpreter("3.99") is None


# ---------------------------------------------------------------------------------------------------------
# Against a real engine


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    try:
        client = engine_client()
    except SandboxError as error:
        pytest.skip(str(error))
    yield client
    client.close()


@pytest.fixture
def test_image_cleanup(engine: Any) -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


@pytest.mark.docker
def test_ensure_builds_once_then_hits_the_cache(
    engine: Any, tmp_path: Path, test_image_cleanup: list[str]
) -> None:
    project = snapshot(tmp_path / "p")
    test_image_cleanup.append(f"{TEST_REPOSITORY}:py{PYTHON}")
    first = build_image(PYTHON, project, repository=TEST_REPOSITORY)
    assert not first.cached
    second = build_image(PYTHON, project, repository=TEST_REPOSITORY)
    assert second.cached
    assert second.image_id == first.image_id
    assert second.seconds < 5
    labels = labels_of(engine, first.tag)
    assert labels is not None and labels[HASH_LABEL] == first.content_hash
    (project / "gguf_sandbox" / "_snapshot_marker.py").write_text("MARKER = 'rebuilt'\n")
    third = build_image(PYTHON, project, repository=TEST_REPOSITORY)
    assert not third.cached and third.image_id != first.image_id


@pytest.mark.docker
def test_ensure_image_returns_the_version_tag(engine: Any) -> None:
    tag = ensure_image(PYTHON, PROJECT)
    assert tag == image_tag(PYTHON)
    assert labels_of(engine, tag) is not None


@pytest.mark.docker
def test_images_subcommand_lists_and_builds(engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from gguf_sandbox.cli import main

    assert main(["images", "build", "--python", PYTHON, "--project", str(PROJECT)]) == 0
    built = capsys.readouterr().out
    assert f"gguf-sandbox:py{PYTHON}: " in built and ("built in" in built or "cached in" in built)
    assert main(["images", "list", "--python", PYTHON, "--project", str(PROJECT)]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith(f"gguf-sandbox:py{PYTHON}")
    assert "missing" not in listed


@pytest.mark.docker
def test_no_route_to_a_base_is_a_clear_error(engine: Any, tmp_path: Path) -> None:
    project = snapshot(tmp_path / "p")
    with pytest.raises(SandboxError) as caught:
        build_image("3.99", project, repository=TEST_REPOSITORY)
    message = str(caught.value)
    assert "python:3.99-slim" in message
    assert "no local CPython 3.99" in message
    assert "pyenv install 3.99" in message


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("python", DEFAULT_PYTHONS, ids=lambda v: f"py{v}")
def test_every_supported_python_builds_and_runs(engine: Any, python: str) -> None:
    if find_local_interpreter(python) is None and labels_of(engine, f"python:{python}-slim") is None:
        pytest.skip(f"no local CPython {python} and no python:{python}-slim image")
    tag = ensure_image(python, PROJECT)
    probe = "import sys, numpy, gguf, psutil, yaml, gguf_sandbox; print('%d.%d' % sys.version_info[:2])"
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", tag, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == python


@pytest.mark.docker
def test_ctrl_c_during_a_build_leaves_no_tag_and_no_container(
    engine: Any, tmp_path: Path, test_image_cleanup: list[str]
) -> None:
    project = snapshot(tmp_path / "p")
    tag = f"{TEST_REPOSITORY}-interrupted:py{PYTHON}"
    test_image_cleanup.append(tag)
    progress = tmp_path / "progress.log"
    driver = textwrap.dedent(
        f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from gguf_sandbox.sandbox.docker.images import build_image
        with open({str(progress)!r}, "a", buffering=1) as out:
            build_image({PYTHON!r}, {str(project)!r}, repository={TEST_REPOSITORY + "-interrupted"!r},
                        log=lambda line: print(line, file=out))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=PROJECT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        # Interrupt while the project's pip install runs in its intermediate container.
        while "no-build-isolation" not in (text := progress.read_text() if progress.exists() else "") or (
            "Running in" not in text.split("no-build-isolation", 1)[1]
        ):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the build never reached the pip step"
            time.sleep(0.1)
        build_container = text.split("no-build-isolation", 1)[1].split("Running in", 1)[1].split()[0]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert b"KeyboardInterrupt" in stderr
    assert labels_of(engine, tag) is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["docker", "ps", "-aq", "--no-trunc", "--filter", f"id={build_container}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not found:
            break
        time.sleep(0.5)
    assert not found, f"build container {build_container} left behind"


def test_image_build_inputs_live_in_the_configured_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$GGUF_SANDBOX_CACHE moves the rootfs tarballs, build contexts and locks like every other cache."""
    monkeypatch.setenv("GGUF_SANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with context_tar([("pyproject.toml", PROJECT / "pyproject.toml")]) as context:
        assert tmp_path / "cache" in context.parents
    with build_lock("probe"):
        pass
    assert list((tmp_path / "cache").rglob("probe.lock"))
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("kind", ["api", "transport"])
def test_engine_failure_during_a_build_is_a_sandbox_error(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    docker = pytest.importorskip("docker")
    import requests

    def failing_build(*args: Any, **kwargs: Any) -> Any:
        if kind == "api":
            raise docker.errors.APIError("500 Server Error: engine hiccup")
        raise requests.exceptions.ConnectionError("Connection aborted: engine went away")

    monkeypatch.setattr(images, "_build_image", failing_build)
    with pytest.raises(SandboxError, match="the Docker engine failed while making"):
        build_image(PYTHON, PROJECT, client=object())
