#!/usr/bin/env bash
# Run `.ci/run` the way a new machine of this kind would, to catch what only a first run
# shows (a wait that races a cold start, an install step only this machine had done):
#
#   - a fresh clone of the committed HEAD (uncommitted changes are not in it), so target/
#     starts empty;
#   - every state directory stopped and removed first: the broker (scripts/kafka.sh), the
#     PostgreSQL server (scripts/postgres.sh), the API server (scripts/k8s.sh) and the local
#     cluster (scripts/cluster.sh);
#   - with --cold, every cache too, without touching this machine's own: the run gets a new
#     empty HOME, so sluice's cache (~/.cache/sluice: the Kafka jars, the Kubernetes and
#     Prometheus binaries, the images), Go's module and build caches, Cargo's registry,
#     Maven's repository and pip's cache all start empty. The toolchains themselves (rustup,
#     pyenv, Go, Java) and the machine's settings files are kept, as a new machine has them.
#     Debian packages installed earlier stay installed (the `packages` phase of .ci/run checks
#     that scripts/setup.sh would install every one the build and the tests used).
#
#   scripts/ci-rehearsal.sh [--cold] [--keep]
#
# --keep leaves the clone (and the temporary HOME) in place; otherwise they are removed at
# the end. The services the run started stay up (as after a CI run), except with --cold,
# where they ran from the temporary caches and are stopped with them. The output of
# `.ci/run` is in $SLUICE_REHEARSAL_DIR/ci.log (default /tmp/sluice-rehearsal).
# Uses the local cluster: run it when no other test is using it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${SLUICE_REHEARSAL_DIR:-/tmp/sluice-rehearsal}"
cold=0 keep=0
for a in "$@"; do
  case "$a" in
    --cold) cold=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: $0 [--cold] [--keep]" >&2; exit 2 ;;
  esac
done

log() { echo "[rehearsal] $*" >&2; }

stop_all() {  # the scripts of $1 (a checkout), against the caches of the current HOME
  local s="$1/scripts"
  "$s/cluster.sh" down || true
  "$s/k8s.sh" stop || true
  "$s/postgres.sh" reset || true
  "$s/kafka.sh" reset || true
  rm -rf "${SLUICE_CLUSTER_DIR:-/tmp/sluice-cluster}"
}

log "stopping the broker, PostgreSQL, the API server and the local cluster; removing their state"
stop_all "$ROOT"
rm -rf "$W"
mkdir -p "$W"
git clone -q --no-local "$ROOT" "$W/sluice"
log "clone of $(git -C "$W/sluice" rev-parse --short HEAD) in $W/sluice"

if ((cold)); then
  home="$W/home"
  mkdir -p "$home"
  # Settings a new machine has (proxies, Go flags, git identity), never caches.
  for f in .config/go/env .gitconfig .npmrc .m2/settings.xml .cargo/config.toml; do
    if [[ -f "$HOME/$f" ]]; then mkdir -p "$(dirname "$home/$f")"; cp "$HOME/$f" "$home/$f"; fi
  done
  export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"
  export CARGO_HOME="$home/.cargo" HOME="$home"
  unset GOPATH GOMODCACHE GOCACHE SLUICE_CACHE
  log "cold: HOME=$HOME (empty caches)"
fi

log "running .ci/run (CI=true, no stdin); output in $W/ci.log"
start=$SECONDS
set +e
(cd "$W/sluice" && CI=true bash .ci/run </dev/null >"$W/ci.log" 2>&1)
rc=$?
set -e
grep -E '^=== \[ci\] phases|^sluice: |^\[e2e\] .*(took)' "$W/ci.log" || true
log "exit $rc after $((SECONDS - start)) s"

if ((cold)); then
  log "stopping the services started from the temporary caches"
  stop_all "$W/sluice"
fi
if ((!keep)); then
  # Go's module cache is read-only by design.
  chmod -R u+w "$W" 2>/dev/null || true
  rm -rf "$W/sluice" "$W/home"
fi
exit "$rc"
