"""Cell isolation for the cgroup backend: private namespaces, a minimal read-only root, no privileges.

A jailed cell's exec chain (no Python runs between fork and exec; the runner has threads):

    setpriv --pdeathsig KILL                       dies with the runner (its parent)
    unshare --pid --fork --kill-child --mount --net [--user --map-root-user]
      sh SETUP                                     in the new namespaces, still (namespace) root:
        tmpfs root: /usr /etc /bin /lib… and the exposed paths (interpreter, package, model) read-only,
        fresh /proc, read-only /sys, minimal /dev, tmpfs /tmp and /dev/shm (charged to the cell)
      timeout -s KILL DEADLINE                     PID 1 of the cell: its own deadline, runner or not
        chroot ROOT sh -c 'cd /tmp; exec "$@"'
          setpriv --reuid 65534 … --no-new-privs --bounding-set=-all    nobody, no capabilities
            python …

When PID 1 dies (runner gone: `--kill-child`; deadline; OOM) the kernel kills every process of the pid
namespace. Loopback stays down: the cell has no network at all. As root the cell runs as nobody; without
root a user namespace maps the invoking user to namespace root and the cell keeps no capability. What a
host lacks (no unshare, no user namespaces) is named in the cell's isolation report, and the cell runs.

An unjailed cell (guard_command) has no pid namespace to end it, so a sweeper stands in for one (it
costs the cell 2 of its tasks and about 0.5 MiB):

    sh GUARD                                       starts the sweeper, then execs the chain:
      setpriv --pdeathsig TERM  timeout … python …   dies with the runner, or at its deadline
    └ setpriv --pdeathsig WINCH  setsid sh SWEEP   in the cell's cgroup, outside the chain's process group

When the chain's first process ends (the runner died, or the deadline passed) the sweeper kills every
process left in the cell's cgroup, those that left the process group (and so escaped `timeout`) too.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gguf_sandbox.sandbox.base import Isolation, IsolationReport

# Searched after PATH for the chains' programs (Tools.find).
SBIN_DIRS: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")

JAIL_UID = 65534  # nobody / nogroup on Debian, Fedora, Alpine
PROBE_TIMEOUT = 30.0
# The in-cell deadline fires this long after the runner's own: while the runner lives, it times the cell
# out (and reports `timeout`); the in-cell one only matters once the runner is gone.
DEADLINE_GRACE_S = 5.0
# After the runner dies the cell gets SIGTERM, then SIGKILL this long after (non-jailed cells).
KILL_AFTER_S = 2
SETUP_MARKER = "@@gguf-sandbox-setup@@"
# Host directories every cell sees read-only (a symlink, e.g. /bin -> usr/bin, is recreated as one).
SYSTEM_DIRS = ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ROOT_SIZE = "4m"
DEV_NODES = ("null", "zero", "full", "random", "urandom")

_SETUP = r"""
fail() { echo "@@gguf-sandbox-setup@@ cannot isolate the cell: $*" >&2; exit 125; }
ro() { mount -o "remount,bind,ro,nosuid,nodev$2" "$1" || fail "read-only remount of $1"; }
r=$1; size=$2; count=$3; shift 3
mount -t tmpfs -o mode=0755,size=@ROOT_SIZE@,nosuid,nodev gguf-sandbox-root "$r" || fail "tmpfs root at $r"
for top in @SYSTEM_DIRS@; do
  if [ -L "/$top" ]; then
    ln -s "$(readlink "/$top")" "$r/$top" || fail "link /$top"
  elif [ -d "/$top" ]; then
    mkdir "$r/$top" && mount --bind "/$top" "$r/$top" || fail "bind /$top"
    ro "$r/$top"
  fi
done
mkdir "$r/proc" "$r/sys" "$r/dev" "$r/tmp" || fail "mount points"
mount -t proc -o nosuid,nodev,noexec proc "$r/proc" || fail "/proc"
mount --rbind /sys "$r/sys" || fail "/sys"
while read -r _ _ _ _ point _; do
  case $point in "$r/sys"|"$r/sys/"*) ro "$point" ",noexec";; esac
done < /proc/self/mountinfo
mount -t tmpfs -o mode=0755,size=64k,nosuid,noexec gguf-sandbox-dev "$r/dev" || fail "/dev"
for node in @DEV_NODES@; do
  : > "$r/dev/$node" && mount --bind "/dev/$node" "$r/dev/$node" || fail "/dev/$node"
done
ln -s /proc/self/fd "$r/dev/fd" && mkdir "$r/dev/shm" || fail "/dev entries"
for dir in "$r/tmp" "$r/dev/shm"; do
  mount -t tmpfs -o "mode=1777,size=$size,nosuid,nodev,noexec" gguf-sandbox-tmp "$dir" || fail "tmpfs $dir"
done
while [ "$count" -gt 0 ]; do
  path=$1; shift; count=$((count - 1))
  if [ -d "$path" ]; then mkdir -p "$r$path"; else mkdir -p "$r${path%/*}" && : > "$r$path"; fi \
    || fail "mount point for $path"
  mount --bind "$path" "$r$path" || fail "bind $path"
  ro "$r$path"
done
exec "$@"
"""
SETUP = (
    _SETUP.replace("@ROOT_SIZE@", ROOT_SIZE)
    .replace("@SYSTEM_DIRS@", " ".join(SYSTEM_DIRS))
    .replace("@DEV_NODES@", " ".join(DEV_NODES))
)
_CD_TMP = 'cd /tmp && exec "$@"'

# The sweeper: $1 the cell's cgroup directory, or $2 the systemd scope's unit whose cgroup it finds in
# /proc/self/cgroup (in no such scope, as under a stand-in systemd-run, it sweeps nothing); $3 the chain's
# pid; $4 the chain's parent, spared (a scope's reporting shell, in the same cgroup, writes the report and
# exits itself); $5 the seconds after which it sweeps anyway. Its parent-death signal is WINCH, ignored
# until the trap is set, and the parent is checked after that, so a chain that ended meanwhile is not
# missed. No fork once the chain runs: a cell that fills its pids limit would make one fail, which ends
# a shell. (A runner that ignores WINCH leaves the sweeper deaf to it: it then sweeps at the deadline.)
_SWEEP = r"""
cg=$1 unit=$2 chain=$3 spare=$4 deadline=$5
if [ -n "$unit" ]; then
  while IFS= read -r line; do
    case $line in 0::*/"$unit.scope") cg=/sys/fs/cgroup${line#0::};; esac
  done < /proc/self/cgroup
fi
[ -n "$cg" ] || exit 0
listed() {
  while read -r pid; do [ "$pid" = "$1" ] && return 0; done < "$cg/cgroup.procs"
  return 1
}
sweep() {
  trap '' WINCH
  if [ -e "$cg/cgroup.kill" ] && ! listed "$spare"; then echo 1 > "$cg/cgroup.kill"; fi
  passes=0
  while [ "$passes" -lt 10000 ]; do
    left=
    while read -r pid; do
      case $pid in "$$"|"$spare") ;; *) kill -s KILL "$pid" && left=1;; esac
    done < "$cg/cgroup.procs" || exit 0
    [ -n "$left" ] || exit 0
    passes=$((passes + 1))
  done
  exit 0
}
trap sweep WINCH
read -r _ _ _ parent _ < /proc/$$/stat
[ "$parent" = "$chain" ] || sweep
sleep "$deadline" &
wait $!
sweep
"""
# Starts the sweeper ($1 its script, $2 setpriv or empty, $3 setsid, $4 its deadline, $5 and $6 the cell's
# cgroup directory or scope unit), then execs the chain: the sweeper's parent is the chain's first process.
_GUARD = r"""
sweep=$1 setpriv=$2 setsid=$3 deadline=$4 cg=$5 unit=$6; shift 6
if [ -n "$setpriv" ]; then
  "$setpriv" --pdeathsig WINCH -- "$setsid" /bin/sh -c "$sweep" gguf-sandbox-sweep \
    "$cg" "$unit" $$ "$PPID" "$deadline" < /dev/null > /dev/null 2>&1 &
else
  "$setsid" /bin/sh -c "$sweep" gguf-sandbox-sweep \
    "$cg" "$unit" $$ "$PPID" "$deadline" < /dev/null > /dev/null 2>&1 &
fi
exec "$@"
"""


@dataclass(frozen=True)
class CellCgroup:
    """The cgroup a cell runs in, for its sweeper: a directory, or a systemd scope's unit when systemd
    names the directory only once the cell runs."""

    directory: Path | None = None
    scope_unit: str | None = None


@dataclass(frozen=True)
class Tools:
    """The util-linux and coreutils programs the chains use, by absolute path (None: not installed)."""

    unshare: str | None
    setpriv: str | None
    timeout: str | None
    chroot: str | None
    setsid: str | None

    @classmethod
    def find(cls) -> Tools:
        """Each on PATH, else in the sbin directories: Debian installs chroot in /usr/sbin, which a non-root
        user's PATH lacks, and a cell would then run unjailed on a host that can jail it."""
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
        names = ("unshare", "setpriv", "timeout", "chroot", "setsid")
        return cls(*(shutil.which(name, path=path) for name in names))


@dataclass(frozen=True)
class JailSupport:
    """What this host lets a cell have. route: "root" (namespaces, switch to nobody), "userns"
    (namespaces inside a user namespace, no uid switch needed) or "none" (why: `reason`)."""

    tools: Tools
    route: str
    reason: str = ""

    @property
    def namespaces(self) -> bool:
        return self.route in ("root", "userns")

    @property
    def jails(self) -> bool:
        """Whether jail_command builds the jail here (else it falls back to guard_command)."""
        return self.namespaces and self.tools.chroot is not None

    def unshare_argv(self) -> list[str]:
        if self.tools.unshare is None:
            raise ValueError("no unshare")
        user = ["--user", "--map-root-user"] if self.route == "userns" else []
        return [
            self.tools.unshare,
            *user,
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--mount",
            "--propagation",
            "private",
            "--net",
            "--",
        ]

    def drop_argv(self) -> list[str]:
        """setpriv argv ending the chain: nobody (root route), no capabilities, no new privileges."""
        if self.tools.setpriv is None:
            return []
        uid = [f"--reuid={JAIL_UID}", f"--regid={JAIL_UID}", "--clear-groups"] if self.route == "root" else []
        caps = ["--inh-caps=-all", "--bounding-set=-all"] if self.namespaces else []
        return [self.tools.setpriv, *uid, "--no-new-privs", *caps, "--"]

    def report(self, *, pids_limit: str | None) -> IsolationReport:
        """Which properties a jailed cell has here; pids_limit is None when set, else why it is not."""
        missing: dict[Isolation, str] = {}
        if not self.namespaces:
            for item in (
                Isolation.NO_NETWORK,
                Isolation.PRIVATE_FILESYSTEM,
                Isolation.READ_ONLY_MODEL,
                Isolation.PRIVATE_PROCESSES,
            ):
                missing[item] = self.reason
        if self.tools.setpriv is None:
            missing[Isolation.NO_NEW_PRIVILEGES] = "setpriv (util-linux) is not installed"
        if os.geteuid() == 0 and (self.route != "root" or self.tools.setpriv is None):
            why = self.reason if self.route != "root" else "setpriv (util-linux) is not installed"
            missing[Isolation.NON_ROOT] = f"runs as root: {why}"
        if pids_limit is not None:
            missing[Isolation.PIDS_LIMIT] = pids_limit
        return IsolationReport(frozenset(set(Isolation) - set(missing)), missing)


def _works(argv: Sequence[str]) -> str | None:
    """None when `argv` runs and exits 0, else its last stderr line (or the OSError)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


@functools.cache
def jail_support() -> JailSupport:
    """Probe once per process which route works here (runs `unshare … true`, nothing is left behind)."""
    tools = Tools.find()
    missing = [name for name in ("unshare", "chroot") if getattr(tools, name) is None]
    if missing:
        return JailSupport(tools, "none", f"{' and '.join(missing)} not installed (util-linux, coreutils)")
    routes = ("root", "userns") if os.geteuid() == 0 else ("userns",)
    reasons = []
    for route in routes:
        support = JailSupport(tools, route)
        failure = _works([*support.unshare_argv(), "true"])
        if failure is None:
            return support
        reasons.append(f"{route}: {failure}")
    return JailSupport(tools, "none", "no namespaces (" + "; ".join(reasons) + ")")


def _outermost(paths: Sequence[Path]) -> list[Path]:
    """Resolved, existing paths, dropping any inside another one or inside a system directory."""
    system = [Path("/") / top for top in SYSTEM_DIRS if not (Path("/") / top).is_symlink()]
    resolved = sorted(
        {Path(os.path.realpath(p)) for p in paths if os.path.exists(p)}, key=lambda p: len(p.parts)
    )
    kept: list[Path] = []
    for path in resolved:
        if path == Path("/") or any(path == d or d in path.parents for d in [*system, *kept]):
            continue
        kept.append(path)
    return kept


@dataclass(frozen=True)
class Jail:
    """A request to jail a cell: host paths it may read (interpreter, venv, package, model)."""

    expose: tuple[Path, ...] = ()


def jail_command(
    argv: Sequence[str],
    *,
    jail: Jail,
    support: JailSupport,
    mountpoint: Path,
    tmp_bytes: int,
    deadline: float,
    cgroup: CellCgroup | None = None,
) -> list[str]:
    """The exec chain running `argv` jailed (see the module docstring); argv[0] must be exposed.

    Without namespaces it is guard_command's, which sweeps `cgroup` (see there)."""
    tools = support.tools
    if not support.jails or tools.chroot is None:  # chroot again: mypy does not see it through `jails`
        return guard_command(argv, deadline=deadline, tools=tools, cgroup=cgroup)
    exposed = _outermost([*jail.expose, *(Path(t) for t in (tools.setpriv,) if t)])
    timeout = [tools.timeout, "-s", "KILL", _seconds(deadline)] if tools.timeout else []
    inner = [
        *timeout,
        tools.chroot,
        str(mountpoint),
        "/bin/sh",
        "-c",
        _CD_TMP,
        "sh",
        *support.drop_argv(),
        *argv,
    ]
    pdeathsig = [tools.setpriv, "--pdeathsig", "KILL", "--"] if tools.setpriv else []
    return [
        *pdeathsig,
        *support.unshare_argv(),
        "/bin/sh",
        "-c",
        SETUP,
        "gguf-sandbox-setup",
        str(mountpoint),
        str(tmp_bytes),
        str(len(exposed)),
        *(str(path) for path in exposed),
        *inner,
    ]


def guard_command(
    argv: Sequence[str], *, deadline: float, tools: Tools | None = None, cgroup: CellCgroup | None = None
) -> list[str]:
    """`argv` that ends with the runner (SIGTERM, SIGKILL KILL_AFTER_S later) and at its own deadline.

    For cells without namespaces: the chain's first process has the parent-death signal; `timeout`
    forwards it to the cell's process group, and times the cell out itself if the runner never does.
    The sweeper (module docstring) then kills what is left in `cgroup`, the cell's own (None: no sweeper).
    """
    tools = tools or Tools.find()
    pdeathsig = [tools.setpriv, "--pdeathsig", "TERM", "--"] if tools.setpriv else []
    timeout = (
        [tools.timeout, f"--kill-after={KILL_AFTER_S}", "-s", "KILL", _seconds(deadline)]
        if tools.timeout
        else []
    )
    chain = [*pdeathsig, *timeout, *argv]
    if tools.setsid is None or cgroup is None or (cgroup.directory, cgroup.scope_unit) == (None, None):
        return chain
    sweeper = [
        _SWEEP,
        tools.setpriv or "",
        tools.setsid,
        _seconds(deadline + KILL_AFTER_S),
        str(cgroup.directory or ""),
        cgroup.scope_unit or "",
    ]
    return ["/bin/sh", "-c", _GUARD, "gguf-sandbox-guard", *sweeper, *chain]


def guard_notes(tools: Tools | None = None, *, unjailed: bool = True) -> list[str]:
    """What guard_command (or, `unjailed` False, jail_command) could not add here: each missing tool
    weakens cleanup after a runner crash."""
    tools = tools or Tools.find()
    notes = []
    if tools.setpriv is None:
        notes.append("setpriv not installed: the cell does not die with the runner (the reaper kills it)")
    if tools.timeout is None:
        notes.append("timeout not installed: the cell's deadline holds only while the runner lives")
    if unjailed and tools.setsid is None:
        notes.append(
            "setsid not installed: a process that leaves the cell's process group outlives a crashed runner"
        )
    return notes


def _seconds(value: float) -> str:
    return f"{max(value, 0.001):.3f}"
