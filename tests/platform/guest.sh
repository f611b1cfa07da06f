#!/bin/bash
# Runs inside the cgroup-v2 guest at boot (started by the image's gguf-v2.service through its boot stub,
# output on the second serial port). The run disk holds the checkout (src/), this run's plan (plan.env)
# and out/, where results and logs go back to the host. Each step prints
# `@@gguf-v2 step NAME rc=N seconds=S`; facts print as `@@gguf-v2 fact NAME VALUE`.
set -u
run=/mnt/run
src=$run/src
out=$run/out
venv=/opt/gguf-v2/venv
user=cell
uid=$(id -u "$user")
mkdir -p "$out" && chmod 1777 "$out"
# shellcheck source=/dev/null
. "$run/plan.env"

fact() { echo "@@gguf-v2 fact $*"; }
step() {
  local name=$1 started=$SECONDS rc
  shift
  echo "@@gguf-v2 begin $name"
  "$@"
  rc=$?
  echo "@@gguf-v2 step $name rc=$rc seconds=$((SECONDS - started))"
  return 0
}

common_env=(
  "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "LANG=C.UTF-8"
  "PYTHONPATH=$src"
  "PYTHONDONTWRITEBYTECODE=1"
  "PIP_NO_INDEX=1"
  "PIP_FIND_LINKS=/opt/gguf-v2/wheels"
  "PIP_DISABLE_PIP_VERSION_CHECK=1"
  "OPENBLAS_NUM_THREADS=1"
  "OMP_NUM_THREADS=1"
)
as_root() {
  (cd "$src" && env -i "${common_env[@]}" HOME=/root GGUF_SANDBOX_CACHE=/var/cache/gguf-sandbox "$@")
}
# Root in the root cgroup (exempt from the no-internal-processes rule), as in a container with a private
# cgroup namespace: cells get direct child cgroups (memory.max, memory.swap.max, pids.max, cgroup.kill).
as_root_direct() {
  (echo "$BASHPID" >/sys/fs/cgroup/cgroup.procs && fact pytest_cgroup "$(cat /proc/self/cgroup)" && as_root "$@")
}
# The unprivileged user, with its own systemd manager (lingering) reached through its runtime directory.
as_user() {
  (cd "$src" && runuser -u "$user" -- env -i "${common_env[@]}" HOME="/home/$user" \
    GGUF_SANDBOX_CACHE="/home/$user/.cache/gguf-sandbox" XDG_RUNTIME_DIR="/run/user/$uid" \
    DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" "$@")
}

# Models prepared on the host (the models disk), shared read-only by both caches.
for cache in /var/cache/gguf-sandbox "/home/$user/.cache/gguf-sandbox"; do
  [ -d /mnt/models/models ] && ln -sfn /mnt/models/models "$cache/models"
done

fact controllers "$(cat /sys/fs/cgroup/cgroup.controllers)"
fact kernel "$(uname -r)"
fact cgroup "$(cat /proc/self/cgroup)"
fact python "$($venv/bin/python --version 2>&1)"
fact systemd "$(systemctl --version | head -1)"
fact cpus "$(nproc)"
fact python_numpy_start_s "$( { TIMEFORMAT=%R; time $venv/bin/python -c 'import numpy' >/dev/null; } 2>&1 )"
fact memory_kib "$(awk '/MemTotal/ {print $2}' /proc/meminfo)"

# The user's manager must be up before anything asks it for a scope.
for _ in $(seq 120); do [ -S "/run/user/$uid/bus" ] && break; sleep 0.5; done
fact user_manager "$(systemctl is-active "user@$uid.service") $(ls "/run/user/$uid" 2>/dev/null | tr '\n' ' ')"
fact user_controllers "$(cat "/sys/fs/cgroup/user.slice/user-$uid.slice/user@$uid.service/cgroup.subtree_control" 2>/dev/null)"

# shellcheck disable=SC2206
pytest_args=(-p no:cacheprovider -q -rs --color=no -o addopts="--strict-markers" $PYTEST_DESELECT)
[ -n "$PYTEST_PATHS" ] && step pytest-root as_root_direct $venv/bin/python -m pytest "${pytest_args[@]}" $PYTEST_PATHS \
  --junitxml="$out/pytest-root.xml"
[ -n "$PYTEST_USER_PATHS" ] && step pytest-user as_user $venv/bin/python -m pytest "${pytest_args[@]}" $PYTEST_USER_PATHS \
  --junitxml="$out/pytest-user.xml"
# An explicit delegated scope: what the README tells an unprivileged user to do.
step scope-user as_user systemd-run --user --scope --quiet -p MemoryMax=256M -p MemorySwapMax=0 \
  $venv/bin/python -c "import gguf_sandbox.budget as b; print(b.detect_limit())"

# Each matrix run of the plan: MATRIX_<NAME> holds its `gguf-sandbox run` arguments; "user" runs as the
# unprivileged user (cells in `systemd-run --user --scope`), the others as root from this service's cgroup
# (cells in a system scope: the service's cgroup holds processes, so no child cgroup of it gets memory).
for name in $MATRIX_RUNS; do
  var="MATRIX_${name^^}"
  eval "args=(${!var})"
  who=root
  [ "$name" = user ] && who=user
  step "matrix-$name" "as_$who" $venv/bin/python -m gguf_sandbox run --backend cgroup \
    --results "$out/v2-$name.jsonl" "${args[@]}"
done
exit 0
