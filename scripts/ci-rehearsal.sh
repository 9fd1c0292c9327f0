#!/usr/bin/env bash
# Run `.ci/run` the way a new machine of this kind would, to catch what only a first run
# shows (a wait that races a cold start, an install step only this machine had done):
#
#   - a fresh clone of the committed HEAD (uncommitted changes are not in it), so target/
#     starts empty;
#   - no state from earlier runs: the broker, the OpenID Connect server (Keycloak), PostgreSQL,
#     the API server and the local cluster get new, empty state directories under $W/state,
#     and the broker, the OpenID Connect server, the replicated Kafka cluster, PostgreSQL and
#     the API server their own ports, so whatever else runs on this machine (another
#     checkout's tests against the default ports) is neither reused nor disturbed;
#   - the local cluster is one per machine: the rehearsal waits for /tmp/sluice-node.lock
#     (the lock anything using the cluster holds), brings a running cluster down, and
#     brings its own down at the end;
#   - with --cold, every cache too, without touching this machine's own: the run gets a new
#     empty HOME, so sluice's cache (~/.cache/sluice: the Kafka jars, Keycloak, the Kubernetes
#     and Prometheus binaries, the images), Go's module and build caches, Cargo's registry,
#     Maven's repository and pip's cache all start empty. The toolchains themselves (rustup,
#     pyenv, Go, Java) and the machine's settings files are kept, as a new machine has them.
#     Debian packages installed earlier stay installed (the `packages` phase of .ci/run checks
#     that scripts/setup.sh would install every one the build and the tests used).
#
#   scripts/ci-rehearsal.sh [--cold] [--keep] [--demo]
#
# --demo runs the README's other command, `make demo`, instead of `.ci/run` (its output in
# $W/demo.log), to time a newcomer's first demo.
#
# The output of `.ci/run` is in $W/ci.log ($SLUICE_REHEARSAL_DIR, default
# /tmp/sluice-rehearsal); the phase times and the summary line are printed at the end.
# Every service the run started is stopped at the end; --keep leaves the clone, its state
# and the temporary HOME on disk (otherwise removed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${SLUICE_REHEARSAL_DIR:-/tmp/sluice-rehearsal}"
cold=0 keep=0 demo=0
for a in "$@"; do
  case "$a" in
    --cold) cold=1 ;;
    --keep) keep=1 ;;
    --demo) demo=1 ;;
    *) echo "usage: $0 [--cold] [--keep] [--demo]" >&2; exit 2 ;;
  esac
done

log() { echo "[rehearsal] $*" >&2; }

exec 8>/tmp/sluice-node.lock
log "waiting for the local cluster's lock (/tmp/sluice-node.lock)"
flock 8
log "bringing down a running local cluster, if any"
"$ROOT/scripts/cluster.sh" down >/dev/null 2>&1 || true

if [[ -d "$W" ]]; then chmod -R u+w "$W" 2>/dev/null || true; rm -rf "$W"; fi
mkdir -p "$W/state"
git clone -q --no-local "$ROOT" "$W/sluice"
log "clone of $(git -C "$W/sluice" rev-parse --short HEAD) in $W/sluice"

# Own state directories and ports (see scripts/kafka.sh, postgres.sh, k8s.sh, cluster.sh).
export SLUICE_KAFKA_DIR="$W/state/kafka" SLUICE_KAFKA_PORT="${SLUICE_REHEARSAL_KAFKA_PORT:-29092}"
# The OpenID Connect server the broker's OAUTHBEARER listener (port+12) trusts (scripts/oidc.sh).
export SLUICE_OIDC_DIR="$W/state/oidc" SLUICE_OIDC_PORT="${SLUICE_REHEARSAL_OIDC_PORT:-29180}"
# The replicated cluster of the chaos_replicated_* tests (scripts/kafka-cluster.sh): its
# default ports (9300-9321) are the ones a `make test` in the main checkout uses.
export SLUICE_KAFKA_CLUSTER_DIR="$W/state/kafka-cluster" SLUICE_KAFKA_CLUSTER_PORT="${SLUICE_REHEARSAL_KAFKA_CLUSTER_PORT:-29300}"
export SLUICE_PG_DIR="$W/state/pg" SLUICE_PG_PORT="${SLUICE_REHEARSAL_PG_PORT:-25433}"
export SLUICE_REGISTRY_DIR="$W/state/registry" SLUICE_REGISTRY_PORT="${SLUICE_REHEARSAL_REGISTRY_PORT:-29280}"
export SLUICE_K8S_DIR="$W/state/k8s" SLUICE_K8S_PORT="${SLUICE_REHEARSAL_K8S_PORT:-26443}"
export SLUICE_CLUSTER_DIR="$W/state/cluster"

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

stop_all() {
  local s="$W/sluice/scripts"
  "$s/cluster.sh" down >/dev/null 2>&1 || true
  "$s/k8s.sh" stop >/dev/null 2>&1 || true
  "$s/postgres.sh" stop >/dev/null 2>&1 || true
  "$s/kafka.sh" stop >/dev/null 2>&1 || true
  "$s/oidc.sh" stop >/dev/null 2>&1 || true
  "$s/registry.sh" stop >/dev/null 2>&1 || true
  "$s/kafka-cluster.sh" stop >/dev/null 2>&1 || true
}
trap stop_all EXIT

start=$SECONDS
set +e
if ((demo)); then
  log "running make demo (no stdin); output in $W/demo.log"
  # Its own metrics port: the default one may be taken by another checkout's demo.
  (cd "$W/sluice" && make demo DEMO_LISTEN=127.0.0.1:0 </dev/null >"$W/demo.log" 2>&1)
  rc=$?
  set -e
  tail -8 "$W/demo.log"
else
  log "running .ci/run (CI=true, no stdin); output in $W/ci.log"
  (cd "$W/sluice" && CI=true bash .ci/run </dev/null >"$W/ci.log" 2>&1)
  rc=$?
  set -e
  grep -E '^=== \[ci\] phases|^sluice: |^\[e2e\] .*took|^=== failed tests|^    .*\(tests/' "$W/ci.log" || true
fi
log "exit $rc after $((SECONDS - start)) s"
stop_all
trap - EXIT
if ((!keep)); then
  chmod -R u+w "$W" 2>/dev/null || true  # Go's module cache is read-only by design
  rm -rf "$W/sluice" "$W/home" "$W/state"
fi
exit "$rc"
