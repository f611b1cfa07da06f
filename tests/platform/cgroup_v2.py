"""`python -m tests.platform.cgroup_v2`: the v2 suite and matrix in a QEMU guest, compared with this host.

Steps: build (or reuse) the cached guest image; prepare the selected cells' models here and put them on a
cached models disk; ship the checkout fresh on a run disk; run the same cells on this host; boot the guest
(guest.sh runs the v2 tests as root and as an unprivileged user, and the cells); read the results back from
the run disk; print the guest's facts, both grids side by side, and fail on any failed step or verdict that
differs. Exit status: 0 all good, 1 a failure, 2 the platform cannot run here (message says why).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf_sandbox.matrix.select import compile_k
from tests.platform.image import (
    BuildError,
    build,
    checkout_files,
    image_for,
    make_ext4,
    missing_tools,
    recipe_for,
    vm_cache,
)
from tests.platform.qemu import Machine, RunOutcome, boot, tail_lines
from tests.platform.verdicts import Row, compare, format_rows, read_verdicts

REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = "3.11"  # Debian bookworm's python3
# matrix.yaml's cgroup-v2 profile (the guest's Python at 64m: parse, stream, embed, mcp and the four
# controls) without the floor cells and the decoder models; the user's cells are a subset of the root's.
PROFILE = "cgroup-v2"
K_ROOT = "64m and not smollm2 and not gemma3"
K_USER = "64m and (parse-minilm or alloc-bomb or naive-load or embed)"
# The reaper's cgroup tests: a cell outlives neither its killed nor its stopped runner, jailed or not
# (as root in direct child cgroups with cgroup.kill; as the user in systemd scopes).
PYTEST_PATHS = (
    "tests/test_budget.py",
    "tests/test_cgroupfs.py",
    "tests/sandbox/cgroup",
    "tests/sandbox/test_reaper.py",
)
# The scope path; limit detection is the same code as root's.
PYTEST_USER_PATHS = ("tests/sandbox/cgroup", "tests/sandbox/test_reaper.py")
# Under TCG a Python with numpy starts in seconds: these give a cell under one second before they act.
TCG_DESELECT = (
    "tests/sandbox/cgroup/test_backend.py::test_timeout_kills_the_whole_cell",
    "tests/sandbox/cgroup/test_backend.py::test_keyboard_interrupt_kills_child_and_removes_cgroup",
)
RUN_DISK_SLACK = 256 << 20
MODELS_DISK_SLACK = 64 << 20
# The whole profile took 1,792 s in the guest under TCG on a loaded 2-core host. 1,800 s left no margin.
DEFAULT_TIMEOUT_S = 2700.0
# TCG's CPU model: QEMU 7.2's "max" advertises AVX/AVX2 (new in its TCG) and numpy's embedding cells died of
# SIGSEGV in the guest; "max" without them ran every cell, and ran the tests ~1.5x faster than Nehalem.
TCG_CPU = "max,-avx,-avx2,-fma,-f16c"
# Where /dev/kvm is PVM (KVM by shadow paging, for hosts without VMX/SVM), a guest needs a PVM-enabled
# kernel: Debian's boots there but runs far slower than TCG (still in early boot after 2 minutes).
PVM_MODULE = Path("/sys/module/kvm_pvm")
HOST_RUN_OF = {"user": "root"}  # selections the host does not run itself: compared with this one


class PlatformError(Exception):
    """The platform cannot run here, or a run failed before the guest could report (one line, with a fix)."""


@dataclass(frozen=True)
class Selection:
    """The cells one run covers: which profile, which -k, the results file stem in out/."""

    name: str
    profile: str | None
    k: str

    def run_args(self) -> list[str]:
        return [*(["--profile", self.profile] if self.profile else []), "-k", self.k]


def selections(k_root: str, k_user: str, profile: str = PROFILE) -> tuple[list[Selection], list[Selection]]:
    """(what the host and the guest run as root, what the guest also runs as the unprivileged user)."""
    root = [Selection("root", profile, k_root)] if k_root else []
    user = [Selection("user", profile, k_user)] if k_user else []
    return root, user


def plan_env(
    selections: Sequence[Selection],
    pytest_paths: Sequence[str],
    pytest_user_paths: Sequence[str],
    deselect: Sequence[str] = (),
) -> str:
    """plan.env for guest.sh: shell assignments, each value quoted; one MATRIX_<NAME> line per selection
    holding its `gguf-sandbox run` arguments."""
    values = {
        "PYTEST_PATHS": " ".join(pytest_paths),
        "PYTEST_USER_PATHS": " ".join(pytest_user_paths),
        "MATRIX_RUNS": " ".join(selection.name for selection in selections),
        "PYTEST_DESELECT": " ".join(f"--deselect={test}" for test in deselect),
    }
    for selection in selections:
        values[f"MATRIX_{selection.name.upper()}"] = shlex.join(selection.run_args())
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())


def models_key(files: Iterable[Path]) -> str:
    """The models disk's cache key: each file's name, size and modification time."""
    parts = []
    for path in sorted(files, key=lambda p: p.name):
        status = path.stat()
        parts.append(f"{path.name}\0{status.st_size}\0{status.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def model_files(chosen: Sequence[Selection], matrix_file: Path) -> list[Path]:
    """Prepare (here, natively) every model the selected cells use; their GGUF files in the cache."""
    from gguf_sandbox.matrix.expand import expand_cells
    from gguf_sandbox.matrix.load import load
    from gguf_sandbox.matrix.models import default_cache_dir, prepare

    files: dict[str, Path] = {}
    for selection in chosen:
        matrix = load(str(matrix_file), profile=selection.profile)
        for cell in expand_cells(matrix, backends=["cgroup"], k=selection.k):
            if cell.model is not None and cell.model not in files:
                files[cell.model] = prepare(matrix.models[cell.model], default_cache_dir())
    return list(files.values())


def models_disk(files: Sequence[Path], cache: Path) -> Path:
    """A cached ext4 image holding models/<file> for each prepared model (hard links while staging)."""
    image = cache / f"models-{models_key(files)}.img"
    if image.is_file():
        return image
    with tempfile.TemporaryDirectory(prefix=".models-", dir=cache) as scratch:
        folder = Path(scratch) / "tree" / "models"
        folder.mkdir(parents=True)
        for path in files:
            try:
                os.link(path, folder / path.name)
            except OSError:
                shutil.copy2(path, folder / path.name)
        partial = Path(scratch) / "models.img"
        make_ext4(folder.parent, partial, MODELS_DISK_SLACK, "gguf-v2-models")
        partial.rename(image)
    return image


def run_disk(checkout: Path, plan: str, work: Path) -> Path:
    """A fresh ext4 image with src/ (the checkout's files as git lists them), plan.env and an empty out/."""
    tree = work / "run-tree"
    src = tree / "src"
    for name in checkout_files(checkout):
        source = checkout / name
        if source.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    (tree / "out").mkdir(parents=True)
    (tree / "plan.env").write_text(plan)
    image = work / "run.img"
    make_ext4(tree, image, RUN_DISK_SLACK, "gguf-v2-run")
    shutil.rmtree(tree)
    return image


def extract_out(image: Path, target: Path) -> None:
    """Copy out/ of the run disk to `target` with debugfs (no mount needed)."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["debugfs", "-R", f"rdump /out {target}", str(image)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise PlatformError(f"debugfs rdump /out of {image}: {done.stderr.strip()[-300:]}")


def run_host(selection: Selection, out: Path, matrix_file: Path) -> int:
    """The same cells on this host (its own cgroup version), results in out/v1-<name>.jsonl."""
    results = out / f"v1-{selection.name}.jsonl"
    results.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "gguf_sandbox",
        "run",
        str(matrix_file),
        "--backend",
        "cgroup",
        "--results",
        str(results),
        *selection.run_args(),
    ]
    print(f"[host] {shlex.join(argv)}", flush=True)
    return subprocess.run(argv, timeout=DEFAULT_TIMEOUT_S, check=False).returncode


def kvm_problem(pvm_module: Path = PVM_MODULE) -> str | None:
    """Why `--accel kvm` will not give a usable guest here, or None when nothing is known against it."""
    if pvm_module.is_dir():
        return (
            "/dev/kvm is PVM here (kvm_pvm, no VMX/SVM): Debian's kernel runs under it far slower than "
            "under TCG; hint: use --accel tcg"
        )
    return None


def verdict_problems(rows: Sequence[Row]) -> list[str]:
    """One line per cell whose verdicts differ or that one side lacks."""
    return [
        f"{row.cell_id}: v1 {row.v1 and row.v1.verdict} vs v2 {row.v2 and row.v2.verdict}"
        for row in rows
        if not row.same
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.platform.cgroup_v2", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / ".cache" / "cgroup-v2",
        help="where logs and results go (default .cache/cgroup-v2)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="guest wall-clock limit, s")
    parser.add_argument(
        "--accel",
        choices=("tcg", "kvm"),
        default="tcg",
        help="tcg (default); kvm needs hardware virtualisation (on a PVM host, Debian's kernel crawls)",
    )
    parser.add_argument("--cpu", default=TCG_CPU, help=f"CPU model under TCG (default {TCG_CPU})")
    parser.add_argument("--no-pytest", action="store_true", help="skip the in-guest pytest steps")
    parser.add_argument("--memory", type=int, default=3072, help="guest RAM in MiB")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    parser.add_argument("--no-host", action="store_true", help="skip the v1 host run (no comparison)")
    parser.add_argument("--build-only", action="store_true", help="build/cache the image and exit")
    parser.add_argument("--profile", default=PROFILE, help=f"matrix profile of the cells (default {PROFILE})")
    parser.add_argument("-k", dest="k_root", default=K_ROOT, help="-k of the cells run as root ('' for none)")
    parser.add_argument("--k-user", default=K_USER, help="-k of the cells run as the unprivileged user")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # SIGTERM (CI's timeout, a supervisor) stops the VM as Ctrl-C does: qemu runs in its own session.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        status = _main(args)
    except (PlatformError, BuildError) as error:
        print(f"cgroup-v2: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgroup-v2: interrupted (the VM was stopped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"cgroup-v2: {'ok' if status == 0 else 'FAILED'} after {time.monotonic() - started:.0f} s wall")
    return status


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(args: argparse.Namespace) -> int:
    if args.accel == "kvm" and (problem := kvm_problem()) is not None:
        raise PlatformError(problem)
    missing = missing_tools()
    if missing:
        raise PlatformError(f"missing host tools; hint: apt-get install {' '.join(missing)}")
    checkout = REPO
    cache = vm_cache()
    recipe = recipe_for(checkout)
    image = image_for(recipe, cache)
    if not image.complete():
        began = time.monotonic()
        print(f"cgroup-v2: building the guest image {image.directory.name} (once per recipe) …", flush=True)
        build(recipe, checkout, cache)
        print(f"cgroup-v2: image built in {time.monotonic() - began:.0f} s", flush=True)
    else:
        print(f"cgroup-v2: cached image {image.directory}", flush=True)
    if args.build_only:
        return 0
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    matrix_file = checkout / "matrix.yaml"
    root, user = selections(args.k_root, args.k_user, args.profile)
    models = models_disk(model_files([*root, *user], matrix_file), cache)
    if not args.no_host:
        for selection in root:
            run_host(selection, out, matrix_file)
    work = out / "vm"
    work.mkdir()
    paths, user_paths = ((), ()) if args.no_pytest else (PYTEST_PATHS, PYTEST_USER_PATHS)
    deselect = TCG_DESELECT if args.accel == "tcg" else ()
    if deselect and not args.no_pytest:
        print(f"cgroup-v2: deselected under TCG (timing): {', '.join(t.split('::')[1] for t in deselect)}")
    plan = plan_env([*root, *user], paths, user_paths, deselect)
    disk = run_disk(checkout, plan, work)
    machine = Machine(
        kernel=image.kernel,
        initrd=image.initrd,
        disks=((image.rootfs, True), (disk, False), (models, True)),
        console_log=out / "console.log",
        output_log=out / "guest.log",
        memory_mib=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        cpu=args.cpu,
    )
    print(
        f"cgroup-v2: booting the guest ({args.accel}, {args.cpus} vCPUs, {args.memory} MiB; "
        f"limit {args.timeout:.0f} s)",
        flush=True,
    )
    outcome = boot(machine, args.timeout)
    extract_out(disk, out / "guest")
    disk.unlink()
    return summarize(outcome, out, [*root, *user], host=not args.no_host)


def summarize(outcome: RunOutcome, out: Path, chosen: Sequence[Selection], *, host: bool) -> int:
    """Print the guest's facts, each step, and the grids; 0 only when everything held."""
    report = outcome.report
    problems: list[str] = []
    print(
        f"\n=== guest: {outcome.seconds:.0f} s, qemu exit {outcome.returncode}"
        f"{', killed: ' + outcome.killed if outcome.killed else ''}"
    )
    for name, value in report.facts.items():
        print(f"  {name}: {value}")
    for name, status in report.steps.items():
        print(f"  step {name}: exit {status} ({report.seconds.get(name, '?')} s)")
    if outcome.killed:
        problems.append(
            f"the VM was killed: {outcome.killed}; console tail: "
            f"{' | '.join(tail_lines(out / 'console.log', 3))}"
        )
    if not report.done:
        problems.append("the guest never reported done (see console.log and guest.log)")
    if "memory" not in report.facts.get("controllers", "").split():
        problems.append(f"the guest's cgroup.controllers lacks memory: {report.facts.get('controllers')!r}")
    problems += [f"guest step {name} failed" for name in report.failed_steps]
    for selection in chosen:
        v2 = read_verdicts(out / "guest" / "out" / f"v2-{selection.name}.jsonl")
        # The user's cells are a subset of the ci selection: compare them with the host's root run.
        matches = compile_k(selection.k)
        v1_file = out / f"v1-{HOST_RUN_OF.get(selection.name, selection.name)}.jsonl"
        v1 = {cell: verdict for cell, verdict in read_verdicts(v1_file).items() if matches(cell)}
        print(
            f"\n=== {selection.name}: {'--profile ' + selection.profile if selection.profile else 'default'}"
            f" -k {selection.k!r}"
        )
        rows = compare(v1, v2)
        print(format_rows(rows, right=f"v2 (guest, {selection.name})"))
        if not v2:
            problems.append(f"{selection.name}: no v2 results")
        if host:
            problems += verdict_problems(rows)
        else:
            problems += [f"{row.cell_id}: no v2 verdict" for row in rows if row.v2 is None]
    if problems:
        print("\nproblems:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
