#!/usr/bin/env bash
# Build (once per machine, cached) a real kube-apiserver and etcd from Go modules, for the
# operator's integration tests (the envtest level: API server + etcd, no kubelet).
#
#   scripts/k8s.sh install   build both into $SLUICE_CACHE/k8s-<version>/bin
#   scripts/k8s.sh install-node   also build kubelet, kube-controller-manager, kube-scheduler
#                            and kube-proxy there (the local cluster: scripts/cluster.sh)
#   scripts/k8s.sh path      print that bin directory
#   scripts/k8s.sh start     start etcd + kube-apiserver on loopback; writes $DIR/kubeconfig
#   scripts/k8s.sh stop      stop both and delete their data
#
# SLUICE_K8S_DIR (default /tmp/sluice-k8s) holds data, certs, logs and the kubeconfig;
# SLUICE_K8S_PORT (default 6443) is the API server's port; etcd's client and peer ports are
# SLUICE_K8S_ETCD_PORT and the next one (default: the API server's port + 10000).
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

DIR="${SLUICE_K8S_DIR:-/tmp/sluice-k8s}"
PORT="${SLUICE_K8S_PORT:-6443}"
ETCD_CLIENT="${SLUICE_K8S_ETCD_PORT:-$((PORT + 10000))}"
ETCD_PEER=$((ETCD_CLIENT + 1))

log() { echo "[k8s] $*" >&2; }

up() { curl -sk --max-time 2 -H "Authorization: Bearer sluice-admin" "https://127.0.0.1:$PORT/readyz" 2>/dev/null | grep -q '^ok$'; }

start() {
  install
  if up; then log "already running on 127.0.0.1:$PORT"; return 0; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    log "port $PORT is taken by something that is not a ready API server; set SLUICE_K8S_PORT or stop it"
    exit 1
  fi
  mkdir -p "$DIR/etcd" "$DIR/certs"
  if [[ ! -f "$DIR/sa.key" ]]; then
    openssl genrsa -out "$DIR/sa.key" 2048 2>/dev/null
    openssl rsa -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub" 2>/dev/null
  fi
  echo 'sluice-admin,admin,admin,system:masters' > "$DIR/tokens.csv"
  "$BIN/etcd" --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER" --log-level warn >"$DIR/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
  "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$PORT" --cert-dir "$DIR/certs" \
    --token-auth-file "$DIR/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$DIR/sa.pub" \
    --service-account-signing-key-file "$DIR/sa.key" --service-cluster-ip-range 10.96.0.0/24 \
    --disable-admission-plugins ServiceAccount --enable-priority-and-fairness=false \
    >"$DIR/apiserver.log" 2>&1 &
  echo $! > "$DIR/apiserver.pid"
  local deadline=$((SECONDS + 90))
  until up; do
    if ! kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null; then log "kube-apiserver exited:"; tail -20 "$DIR/apiserver.log" >&2; exit 1; fi
    if (( SECONDS > deadline )); then log "kube-apiserver not ready after 90s"; tail -20 "$DIR/apiserver.log" >&2; exit 1; fi
    sleep 0.5
  done
  cat > "$DIR/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: sluice-test, cluster: {server: "https://127.0.0.1:$PORT", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: sluice-admin}}]
contexts: [{name: sluice-test, context: {cluster: sluice-test, user: admin, namespace: default}}]
current-context: sluice-test
KC
  log "kube-apiserver ready on https://127.0.0.1:$PORT (kubeconfig: $DIR/kubeconfig)"
}

stop() {
  # The API server first (it would hang on a vanished etcd), then etcd; force after 15 s.
  for f in apiserver etcd; do
    [[ -f "$DIR/$f.pid" ]] || continue
    local p deadline=$((SECONDS + 15))
    p="$(cat "$DIR/$f.pid")"
    kill "$p" 2>/dev/null || true
    while kill -0 "$p" 2>/dev/null; do
      if (( SECONDS > deadline )); then kill -9 "$p" 2>/dev/null || true; fi
      sleep 0.2
    done
  done
  rm -rf "$DIR"
}

# Without these every binary reports v0.0.0-master (the node's VERSION column, /version,
# and helm's kubeVersion checks read it).
version_ldflags() {
  local f="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION")"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

# The wrapper module: k8s.io/kubernetes with every staging module replaced by its release.
wrapper() (
  mkdir -p "$BIN" "$CACHE/wrapper"
  local minor="0.${K8S_VERSION#1.}"
  cd "$CACHE/wrapper"
  [[ -f go.sum && -f tools.go ]] && grep -q kube-proxy tools.go && exit 0
  {
    echo "module sluice.dev/k8s-binaries"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    for m in "${STAGING[@]}"; do echo "replace k8s.io/$m => k8s.io/$m v$minor"; done
  } > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport (\n' > tools.go
  for c in "${COMPONENTS[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c" >> tools.go; done
  printf ')\n' >> tools.go
  log "resolving k8s.io/kubernetes v$K8S_VERSION (once per machine)"
  GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go get "k8s.io/kubernetes@v$K8S_VERSION"
)

COMPONENTS=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy)

# build NAME...: each of k8s.io/kubernetes/cmd/NAME into $BIN, unless already there.
build() {
  local c s
  for c in "$@"; do
    # .stamped: built with version_ldflags (binaries from before that report v0.0.0-master)
    [[ -x "$BIN/$c" && -f "$BIN/.$c.stamped" ]] && continue
    command -v go >/dev/null || { log "go not found"; exit 1; }
    wrapper
    log "building $c v$K8S_VERSION from Go modules (once per machine; minutes)"
    s=$SECONDS
    (cd "$CACHE/wrapper" && GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w $(version_ldflags)" -o "$BIN/$c" "k8s.io/kubernetes/cmd/$c")
    touch "$BIN/.$c.stamped"
    log "built $c in $((SECONDS - s))s"
  done
}

install() {
  build kube-apiserver
  if [[ ! -x "$BIN/etcd" ]]; then
    log "building etcd v$ETCD_VERSION from Go modules"
    # etcd's own go.mod has replace directives, so `go install pkg@version` refuses it;
    # a wrapper module builds the same main package.
    mkdir -p "$CACHE/etcd-wrapper"
    (
      cd "$CACHE/etcd-wrapper"
      printf 'module sluice.dev/etcd-binary\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > go.mod
      printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
      GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || true
      GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
    )
    log "installed: $("$BIN/kube-apiserver" --version 2>&1 | head -1); etcd $("$BIN/etcd" --version 2>&1 | head -1)"
  fi
}

case "${1:-}" in
  install) install ;;
  install-node) install; build "${COMPONENTS[@]}" ;;
  path) echo "$BIN" ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|install-node|path|start|stop" >&2; exit 2 ;;
esac
