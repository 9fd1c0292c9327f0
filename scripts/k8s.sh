#!/usr/bin/env bash
# Build (once per machine, cached) a real kube-apiserver and etcd from Go modules, for the
# operator's integration tests (the envtest level: API server + etcd, no kubelet).
#
#   scripts/k8s.sh install   build both into $SLUICE_CACHE/k8s-<version>/bin
#   scripts/k8s.sh path      print that bin directory
#
# kube-apiserver comes from k8s.io/kubernetes through a small wrapper module that replaces
# every k8s.io staging module with its v0.<minor> release; etcd from go.etcd.io.
set -euo pipefail

K8S_VERSION="${SLUICE_K8S_VERSION:-1.34.2}"
ETCD_VERSION="${SLUICE_ETCD_VERSION:-3.6.5}"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BIN="$CACHE/bin"
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller)

log() { echo "[k8s] $*" >&2; }

install() {
  if [[ -x "$BIN/kube-apiserver" && -x "$BIN/etcd" ]]; then return 0; fi
  command -v go >/dev/null || { log "go not found"; exit 1; }
  mkdir -p "$BIN" "$CACHE/wrapper"
  local minor="0.${K8S_VERSION#1.}"
  cd "$CACHE/wrapper"
  {
    echo "module sluice.dev/k8s-binaries"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    for m in "${STAGING[@]}"; do echo "replace k8s.io/$m => k8s.io/$m v$minor"; done
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  if [[ ! -x "$BIN/kube-apiserver" ]]; then
    log "building kube-apiserver v$K8S_VERSION from Go modules (once per machine; several minutes)"
    GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go get k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  fi
  if [[ ! -x "$BIN/etcd" ]]; then
    log "building etcd v$ETCD_VERSION from Go modules"
    # etcd's own go.mod has replace directives, so `go install pkg@version` refuses it;
    # a wrapper module builds the same main package.
    mkdir -p "$CACHE/etcd-wrapper"
    cd "$CACHE/etcd-wrapper"
    printf 'module sluice.dev/etcd-binary\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || true
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  fi
  log "installed: $("$BIN/kube-apiserver" --version 2>&1 | head -1); etcd $("$BIN/etcd" --version 2>&1 | head -1)"
}

case "${1:-}" in
  install) install ;;
  path) echo "$BIN" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
