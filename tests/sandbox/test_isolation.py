"""The cgroup backend as a sandbox: a hostile cell cannot touch the model, the host's network or files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gguf_sandbox.cgroupfs import PROCS_FILE, read_pids
from gguf_sandbox.paths import models_dir
from gguf_sandbox.sandbox import isolation
from gguf_sandbox.sandbox.base import MODEL_PLACEHOLDER, PIDS_LIMIT, CellSpec, Isolation
from gguf_sandbox.sandbox.cgroup import process
from gguf_sandbox.sandbox.cgroup.backend import CgroupSandbox
from gguf_sandbox.sandbox.cgroup.placement import cell_placement
from gguf_sandbox.sandbox.isolation import (
    SBIN_DIRS,
    CellCgroup,
    Jail,
    JailSupport,
    Tools,
    jail_command,
    jail_support,
)
from tests.sandbox.waiting import wait_for

MiB = 1 << 20
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
MODEL_BYTES = b"GGUF" + bytes(60)

# Everything a hostile cell would try; each entry is True when the attempt succeeded.
_PROBE = textwrap.dedent(
    """
    import json, os, socket, sys, threading

    def attempt(action):
        try:
            action()
            return True
        except Exception:
            return False

    def write(path, mode="wb"):
        with open(path, mode) as handle:
            handle.write(b"x")

    def connect(address, family=socket.AF_INET):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(address)

    def fork_past_the_limit():
        # Tasks started before the kernel refused one, and whether a fork then still worked.
        stop, started = threading.Event(), 0
        try:
            for _ in range(LIMIT + 64):
                threading.Thread(target=stop.wait, daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        try:
            pid = os.fork()
        except OSError:
            forked = False
        else:
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            forked = True
        stop.set()
        return started, forked

    model, port, abstract, results = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(json.dumps({
        "uid": os.getuid(),
        "model_head": open(model, "rb").read(4).decode(),
        "write_model": attempt(lambda: write(model, "r+b")),
        "delete_model": attempt(lambda: os.remove(model)),
        "rename_model": attempt(lambda: os.rename(model, model + ".x")),
        "connect_host_loopback": attempt(lambda: connect(("127.0.0.1", port))),
        "connect_abstract_socket": attempt(lambda: connect("\\0" + abstract, socket.AF_UNIX)),
        "read_shadow": attempt(lambda: open("/etc/shadow").read()),
        "see_results": os.path.exists(results),
        "see_docker_socket": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
        "see_model_cache": os.path.exists(MODELS),
        "runner_cwd": sorted(os.listdir(CWD)) if os.path.isdir(CWD) else [],
        "write_usr": attempt(lambda: write("/usr/gguf-sandbox-evil")),
        "write_tmp": attempt(lambda: write("/tmp/ok")),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "fork_at_the_limit": fork_past_the_limit(),
    }))
    """
)


def probe_code() -> str:
    """The probe with this host's pids limit, model cache and working directory filled in."""
    return (
        _PROBE.replace("LIMIT", str(PIDS_LIMIT))
        .replace("MODELS", repr(str(models_dir())))
        .replace("CWD", repr(os.getcwd()))
    )


@pytest.fixture
def listeners() -> Iterator[tuple[int, str]]:
    """A TCP listener on the host's 127.0.0.1 and an abstract unix socket, both accepting."""
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract_name = f"gguf-sandbox-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract_name)
    unix.listen()
    reached: list[str] = []

    def accept(server: socket.socket, what: str) -> None:
        try:
            connection, _ = server.accept()
        except OSError:
            return
        reached.append(what)
        connection.close()

    threads = [
        threading.Thread(target=accept, args=(server, what), daemon=True)
        for server, what in ((tcp, "tcp"), (unix, "abstract"))
    ]
    for thread in threads:
        thread.start()
    try:
        yield tcp.getsockname()[1], abstract_name
    finally:
        tcp.close()
        unix.close()
    assert reached == [], f"a cell reached the host's {reached}"


@pytest.fixture
def model_and_results(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model.gguf"
    model.write_bytes(MODEL_BYTES)
    results = tmp_path / "results.jsonl"
    results.write_text('{"kind": "run"}\n')
    return model, results


@pytest.fixture
def sandbox() -> CgroupSandbox:
    backend = CgroupSandbox()
    reason = backend.unavailable_reason(PYTHON)
    if reason is not None:
        pytest.skip(reason)
    return backend


def _probe_spec(model: Path, results: Path, port: int, abstract: str) -> CellSpec:
    return CellSpec(
        cell_id=f"probe-{uuid.uuid4().hex[:8]}",
        backend="cgroup",
        python=PYTHON,
        memory=128 * MiB,
        argv=("-c", probe_code(), MODEL_PLACEHOLDER, str(port), abstract, str(results)),
        timeout=120,
        model=model,
    )


def _needs_namespaces() -> None:
    support = jail_support()
    if not support.namespaces:
        pytest.skip(f"this host gives cells no namespaces: {support.reason}")


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_hostile_cgroup_cell_is_contained(
    sandbox: CgroupSandbox, listeners: tuple[int, str], model_and_results: tuple[Path, Path]
) -> None:
    _needs_namespaces()
    model, results = model_and_results
    result = sandbox.run(_probe_spec(model, results, *listeners))
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] != 0
    assert seen["model_head"] == "GGUF"
    assert {key: value for key, value in seen.items() if value is True} == {"write_tmp": True}
    assert seen["interfaces"] == ["lo"]
    started, forked = seen["fork_at_the_limit"]
    assert 0 < started < PIDS_LIMIT and not forked
    # Of the runner's working directory (a checkout, results files) it sees only the package, read-only.
    assert set(seen["runner_cwd"]) <= {"gguf_sandbox"}
    assert model.read_bytes() == MODEL_BYTES
    assert result.isolation.held == frozenset(Isolation) and not result.isolation.missing
    assert "isolation" not in result.stderr  # nothing missing, nothing to say


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_attached_cgroup_cell_has_the_same_isolation(
    sandbox: CgroupSandbox, listeners: tuple[int, str], model_and_results: tuple[Path, Path]
) -> None:
    _needs_namespaces()
    model, results = model_and_results
    spec = _probe_spec(model, results, *listeners)
    spec = CellSpec(**{**spec.__dict__, "argv": ("-c", "input(); " + probe_code(), *spec.argv[2:])})
    with sandbox.attach(spec) as cell:
        process = subprocess.Popen(
            cell.command.argv,
            env=None if cell.command.env is None else dict(cell.command.env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=cell.stderr,
        )
        out, _ = process.communicate(b"go\n", timeout=120)
        result = cell.finish()
    assert result.exit_code == 0, result.stderr
    seen = json.loads(out)
    assert seen["uid"] != 0 and seen["interfaces"] == ["lo"]
    assert {key: value for key, value in seen.items() if value is True} == {"write_tmp": True}
    started, forked = seen["fork_at_the_limit"]
    assert 0 < started < PIDS_LIMIT and not forked
    assert result.isolation.held == frozenset(Isolation)


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_without_namespaces_the_cell_runs_and_says_what_it_lacks(
    sandbox: CgroupSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = Tools(None, None, shutil.which("timeout"), None, shutil.which("setsid"))
    bare = JailSupport(tools, "none", "unshare not installed")
    monkeypatch.setattr(process, "jail_support", lambda: bare)
    spec = CellSpec("bare", "cgroup", PYTHON, 64 * MiB, ("-c", "print('ran')"), timeout=60)
    result = sandbox.run(spec)
    assert (result.exit_code, result.stdout) == (0, "ran\n"), result.stderr
    missing = result.isolation.missing
    assert missing[Isolation.NO_NETWORK] == "unshare not installed"
    assert set(missing) >= {
        Isolation.NO_NETWORK,
        Isolation.PRIVATE_FILESYSTEM,
        Isolation.READ_ONLY_MODEL,
        Isolation.NO_NEW_PRIVILEGES,
    }
    assert Isolation.PIDS_LIMIT in result.isolation.held
    note = next(line for line in result.stderr.splitlines() if "missing:" in line)
    assert note.startswith("[gguf-sandbox] isolation: ") and "no network (unshare not installed)" in note


def test_user_namespace_route_contains_a_cell_of_a_non_root_runner(
    tmp_path: Path, listeners: tuple[int, str], request: pytest.FixtureRequest
) -> None:
    """Without root, the same jail is built inside a user namespace: run the chain as nobody to see it."""
    python = Path("/usr/bin/python3")
    tools = Tools.find()
    setpriv = tools.setpriv
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        pytest.skip("needs root to become nobody, setpriv and /usr/bin/python3")
    support = JailSupport(tools, "userns")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    if subprocess.run([*as_nobody, *support.unshare_argv(), "true"], check=False).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here")
    # pytest's own temp tree is 0700 root: nobody needs a directory it can reach.
    work = Path(tempfile.mkdtemp(prefix="gguf-sandbox-userns-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    (work / "root").mkdir()
    model = work / "model.gguf"
    model.write_bytes(MODEL_BYTES)
    for path in (work, work / "root", model):
        os.chown(path, 65534, 65534)
    results = tmp_path / "results.jsonl"
    results.write_text("{}\n")
    command = jail_command(
        [str(python), "-c", probe_code(), str(model), *(str(v) for v in listeners), str(results)],
        jail=Jail((model,)),
        support=support,
        mountpoint=work / "root",
        tmp_bytes=16 * MiB,
        deadline=120,
    )
    done = subprocess.run([*as_nobody, *command], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == 0  # namespace root, mapped to nobody on the host, without capabilities
    assert {key: value for key, value in seen.items() if value is True} == {"write_tmp": True}
    assert seen["interfaces"] == ["lo"]
    assert seen["fork_at_the_limit"][1] is True  # no cgroup here: nothing limits its tasks
    assert model.read_bytes() == MODEL_BYTES


def test_exposed_paths_are_resolved_and_nested_ones_dropped(tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "venv")
    kept = isolation._outermost(
        [tmp_path / "link", tmp_path / "venv" / "bin", Path("/usr/lib"), tmp_path / "missing", Path("/")]
    )
    assert kept == [tmp_path / "venv"]


def test_jail_command_shape() -> None:
    tools = Tools("/u/unshare", "/u/setpriv", "/u/timeout", "/u/chroot", "/u/setsid")
    command = jail_command(
        ["/venv/bin/python", "-c", "pass"],
        jail=Jail(()),
        support=JailSupport(tools, "root"),
        mountpoint=Path("/scratch/root"),
        tmp_bytes=64 * MiB,
        deadline=12.5,
    )
    assert command[:4] == ["/u/setpriv", "--pdeathsig", "KILL", "--"]
    assert "--kill-child=SIGKILL" in command and "--net" in command and "--pid" in command
    timeout_at = command.index("/u/timeout")
    assert command[timeout_at : timeout_at + 6] == [
        "/u/timeout",
        "-s",
        "KILL",
        "12.500",
        "/u/chroot",
        "/scratch/root",
    ]
    drop = command[command.index("/u/setpriv", 1) :]
    assert drop[:4] == ["/u/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert "--no-new-privs" in drop and "--bounding-set=-all" in drop
    assert command[-3:] == ["/venv/bin/python", "-c", "pass"]


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_extra_host_paths_are_visible_read_only_and_nothing_beside_them(
    sandbox: CgroupSandbox, tmp_path: Path
) -> None:
    _needs_namespaces()
    script = tmp_path / "mine.py"
    script.write_text("print('mine ran')\n")
    (tmp_path / "secret.txt").write_text("not for the cell\n")
    interpreter = sandbox.interpreter(PYTHON)
    code = (
        "import os, runpy, sys; runpy.run_path(sys.argv[1]); "
        "print(os.listdir(os.path.dirname(sys.argv[1])), os.access(sys.argv[1], os.W_OK))"
    )
    result = process.run_limited(
        [str(interpreter.path), "-c", code, str(script)],
        64 * MiB,
        60,
        env=sandbox.child_env(interpreter, {}),
        jail=sandbox.jail(interpreter, None, [script]),
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["mine ran", "['mine.py'] False"]


def test_tools_are_found_in_sbin_when_path_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-root user's PATH on Debian has no /usr/sbin, where chroot is: the cell must still be jailed."""
    installed = next((Path(d) / "chroot" for d in SBIN_DIRS if (Path(d) / "chroot").is_file()), None)
    if installed is None:
        pytest.skip("no chroot in an sbin directory here")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert Tools.find().chroot == str(installed)


def test_a_tool_on_path_comes_before_sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "chroot"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert Tools.find().chroot == str(own)


def test_guard_command_shape() -> None:
    """The sweeper starts first and the cell's chain is exec'd unchanged; without setsid or a cgroup to
    sweep there is none."""
    tools = Tools(None, "/u/setpriv", "/u/timeout", None, "/u/setsid")
    cell = CellCgroup(directory=Path("/cg/c"))
    command = isolation.guard_command(["/venv/bin/python"], deadline=12.5, tools=tools, cgroup=cell)
    assert command[:4] == ["/bin/sh", "-c", isolation._GUARD, "gguf-sandbox-guard"]
    assert command[4:10] == [isolation._SWEEP, "/u/setpriv", "/u/setsid", "14.500", "/cg/c", ""]
    assert command[10:] == [
        *("/u/setpriv", "--pdeathsig", "TERM", "--"),
        *("/u/timeout", "--kill-after=2", "-s", "KILL", "12.500"),
        "/venv/bin/python",
    ]
    scope = isolation.guard_command(["true"], deadline=1, tools=tools, cgroup=CellCgroup(scope_unit="u-1"))
    assert scope[8:10] == ["", "u-1"]
    for unswept in (
        isolation.guard_command(["true"], deadline=1, tools=tools),
        isolation.guard_command(["true"], deadline=1, tools=tools, cgroup=CellCgroup()),
        isolation.guard_command(["true"], deadline=1, tools=replace(tools, setsid=None), cgroup=cell),
    ):
        assert unswept[0] == "/u/setpriv"
    without = replace(tools, setsid=None)
    assert any("setsid not installed" in note for note in isolation.guard_notes(without))
    assert not any("setsid" in note for note in isolation.guard_notes(without, unjailed=False))


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@pytest.mark.parametrize(("ending", "status"), [("exit 3", 3), ("kill -SEGV $$", -11)])
def test_guarded_cell_keeps_its_status_and_streams(ending: str, status: int, tmp_path: Path) -> None:
    """The sweeper holds none of the cell's streams (a reader sees their end when the cell ends) and the
    cell's exit status, a signal's too, reaches the runner as without it."""
    script = f"echo out; echo err >&2; {ending}"
    with cell_placement(Path("/"), 64 * MiB, tmp_path / "report") as placed:
        command = isolation.guard_command(["/bin/sh", "-c", script], deadline=60, cgroup=placed.cell_cgroup())
        assert command[0] == "/bin/sh"  # swept (setsid is installed here)
        run = placed.command(command)
        done = subprocess.run(run, capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (status, "out\n", "err\n")


def test_a_sweeper_outside_its_scope_sweeps_nothing() -> None:
    """A scope cell's sweeper finds its cgroup by the unit's name: where the chain is in no such scope (a
    stand-in systemd-run, or none) it must not sweep the cgroup it is in, which holds its caller (found
    on cgroup v2, where such a test's sweeper killed pytest)."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        unit = CellCgroup(scope_unit=f"gguf-sandbox-absent-{uuid.uuid4().hex[:8]}")
        command = isolation.guard_command(["/bin/sh", "-c", "sleep 0.2"], deadline=60, cgroup=unit)
        assert subprocess.run(command, timeout=30, check=False).returncode == 0
        time.sleep(1.0)  # the sweeper's chance to act
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


_FORK_BOMB = """
import os, time
os.setsid()  # out of the chain's process group: only the sweeper can end it
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.005)
"""


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
def test_a_cell_that_fills_its_pids_limit_is_swept_when_its_runner_dies(tmp_path: Path) -> None:
    """The sweeper forks nothing once the chain runs (a failed fork ends a shell): a fork bomb that left
    the process group and keeps the cell's pids limit full is still swept once its runner is killed."""
    limit = 40
    with cell_placement(Path("/"), 64 * MiB, tmp_path / "report", pids_limit=limit) as placed:
        if placed.pids_missing is not None:
            pytest.skip(f"no pids limit here: {placed.pids_missing}")
        cell = [sys.executable, "-c", _FORK_BOMB]
        chain = placed.command(isolation.guard_command(cell, deadline=120, cgroup=placed.cell_cgroup()))
        run = "import subprocess, sys; subprocess.run(sys.argv[1:])"
        runner = subprocess.Popen([sys.executable, "-c", run, *chain])
        procs = placed.cell_cgroup().directory
        assert procs is not None
        try:
            wait_for(
                lambda: len(read_pids(procs / PROCS_FILE)) >= limit - 2, 30, "the bomb never filled the limit"
            )
            runner.kill()
            runner.wait()
            wait_for(lambda: not read_pids(procs / PROCS_FILE), 30, "the bomb outlived its runner")
        finally:
            runner.kill()
            runner.wait()
