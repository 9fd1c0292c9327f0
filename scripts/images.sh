#!/usr/bin/env bash
# Container images built without Docker, for the local cluster (scripts/cluster.sh) and the
# end-to-end suite: each is a root filesystem made here and packed by scripts/mkimage.py as a
# docker-archive tarball (`ctr images import` / `docker load` take it).
#
#   scripts/images.sh build [NAME...]   build the tarballs into $OUT (default: all)
#   scripts/images.sh load [NAME...]    build, then import them into the local cluster
#   scripts/images.sh list              print NAME REF TARBALL for each image
#   scripts/images.sh prepare           only build (once, cached) what comes from Go modules
#   SLUICE_IMAGE_PROFILE=debug          images of the debug build (quicker while iterating)
#
# Images (tag $TAG, registry name sluice.local, so nothing tries to pull them):
#   sluice-controller, sluice-worker   the release binaries of this checkout
#   sluice-enrich-worker               examples/enrich-worker (a custom processor)
#   sluice-bench                       sluice-loadgen's sluice-bench: the e2e suite's HTTP
#                                      service in the cluster (`http-receiver --print`)
#   prometheus                         Prometheus $PROM_VERSION built from Go modules with
#                                      only Kubernetes service discovery (Debian's build has
#                                      none, so it cannot serve the Prometheus Operator)
#   prometheus-operator,               the Prometheus Operator and its config reloader,
#   prometheus-config-reloader         built from Go modules ($PO_VERSION, cached in $PO_CACHE)
#
# What is inside: the binary (stripped), exactly the shared libraries `ldd` says it loads,
# taken from this machine's Debian packages (glibc, libssl3, libsasl2, libzstd, zlib,
# libcurl, ...), the CA bundle, and /etc/passwd with the non-root user 65532 the pods run as.
# No shell, no package manager. The user-facing recipe stays docker/*.Dockerfile (a Debian
# slim base with the same runtime libraries); `make images` builds those where Docker runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
TAG="${SLUICE_IMAGE_TAG:-dev}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${SLUICE_IMAGES_DIR:-$TARGET/images}"
# release (default: what users run) or debug (quicker to build while iterating).
PROFILE="${SLUICE_IMAGE_PROFILE:-release}"
PROFILE_DIR="$TARGET/$PROFILE"

log() { echo "[images] $*" >&2; }

ALL=(sluice-controller sluice-worker sluice-enrich-worker sluice-bench prometheus prometheus-operator prometheus-config-reloader)
PROM_VERSION="${SLUICE_PROMETHEUS_VERSION:-3.5.0}"
PROM_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}/prometheus-$PROM_VERSION"
PO_VERSION="${SLUICE_PROMETHEUS_OPERATOR_VERSION:-0.85.0}"
PO_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}/prometheus-operator-$PO_VERSION"

# The Prometheus Operator's binaries, once per machine, through a wrapper module (its own
# go.mod replaces its API packages with local folders, which `go install pkg@version` refuses).
prometheus_operator() {
  local c
  for c in operator prometheus-config-reloader; do
    [[ -x "$PO_CACHE/bin/$c" ]] && continue
    command -v go >/dev/null || { log "go not found"; exit 1; }
    mkdir -p "$PO_CACHE/wrapper" "$PO_CACHE/bin"
    log "building the Prometheus Operator's $c v$PO_VERSION from Go modules (once per machine)"
    (
      cd "$PO_CACHE/wrapper"
      if [[ ! -f go.sum ]]; then
        printf 'module sluice.dev/prometheus-operator\n\ngo 1.24\n\nrequire github.com/prometheus-operator/prometheus-operator v%s\n' "$PO_VERSION" > go.mod
        printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/prometheus-operator/prometheus-operator/cmd/operator"\n\t_ "github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader"\n)\n' > tools.go
        GOFLAGS=-mod=mod go mod tidy >/dev/null
      fi
      GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
        -o "$PO_CACHE/bin/$c" "github.com/prometheus-operator/prometheus-operator/cmd/$c"
    )
  done
}

# Prometheus itself (module version v0.3MM.P for 3.MM.P), without the web UI's assets (the
# HTTP API is what the tests use) and with Kubernetes as its only service discovery.
prometheus_server() {
  [[ -x "$PROM_CACHE/bin/prometheus" ]] && return 0
  command -v go >/dev/null || { log "go not found"; exit 1; }
  local minor patch
  IFS=. read -r _ minor patch <<<"$PROM_VERSION"
  mkdir -p "$PROM_CACHE/wrapper" "$PROM_CACHE/bin"
  log "building Prometheus v$PROM_VERSION from Go modules (once per machine)"
  (
    cd "$PROM_CACHE/wrapper"
    printf 'module sluice.dev/prometheus\n\ngo 1.24\n\nrequire github.com/prometheus/prometheus v0.3%02d.%d\n' "$minor" "$patch" > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/prometheus/prometheus/cmd/prometheus"\n' > tools.go
    GOFLAGS=-mod=mod go mod tidy >/dev/null
    GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 go build -tags remove_all_sd,enable_kubernetes_sd -trimpath \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROM_VERSION" \
      -o "$PROM_CACHE/bin/prometheus" github.com/prometheus/prometheus/cmd/prometheus
  )
}

# The folder of the operator's module (CRDs and RBAC examples come from there).
prometheus_operator_dir() {
  prometheus_operator
  (cd "$PO_CACHE/wrapper" && go list -m -f '{{.Dir}}' github.com/prometheus-operator/prometheus-operator)
}

ref() { echo "sluice.local/$1:$TAG"; }

# binary NAME: the host path of what goes into the image.
binary() {
  case "$1" in
    sluice-controller) echo "$PROFILE_DIR/sluice-controller" ;;
    sluice-worker) echo "$PROFILE_DIR/sluice-worker" ;;
    sluice-enrich-worker) echo "$PROFILE_DIR/enrich-worker" ;;
    sluice-bench) echo "$PROFILE_DIR/sluice-bench" ;;
    prometheus) prometheus_server; echo "$PROM_CACHE/bin/prometheus" ;;
    prometheus-operator) prometheus_operator; echo "$PO_CACHE/bin/operator" ;;
    prometheus-config-reloader) prometheus_operator; echo "$PO_CACHE/bin/prometheus-config-reloader" ;;
  esac
}

# rootfs DIR BINARY DEST: the binary at DEST, its libraries, users, CA bundle, /tmp.
rootfs() {
  local dir=$1 bin=$2 dest=$3 lib
  rm -rf "$dir"
  mkdir -p "$dir/etc" "$dir/tmp" "$dir/$(dirname "$dest")"
  chmod 1777 "$dir/tmp"
  cp "$bin" "$dir$dest"
  strip --strip-debug "$dir$dest" 2>/dev/null || true
  for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}'); do
    mkdir -p "$dir$(dirname "$lib")"
    cp -L "$lib" "$dir$lib"
  done
  # /lib64/ld-linux-x86-64.so.2 is the interpreter path written in the binary.
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$dir/etc/group"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    mkdir -p "$dir/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  fi
}

build_one() {
  local name=$1 bin dest dir
  bin="$(binary "$name")"
  [[ -n "$bin" && -x "$bin" ]] || { log "$name: $bin not built"; exit 1; }
  dest="/usr/local/bin/$(basename "$bin")"
  # The operator runs its reloader sidecar as /bin/prometheus-config-reloader.
  [[ "$name" == prometheus-config-reloader ]] && dest=/bin/prometheus-config-reloader
  dir="$OUT/rootfs/$name"
  rootfs "$dir" "$bin" "$dest"
  local args=(--rootfs "$dir" --ref "$(ref "$name")" --out "$OUT/$name.tar" --user 65532:65532 --entrypoint "$dest")
  case "$name" in
    sluice-controller) args+=(--port 8080) ;;
    sluice-worker | sluice-enrich-worker) args+=(--port 9095) ;;
    sluice-bench) args+=(--port 8080) ;;
    prometheus)
      mkdir -p "$dir/prometheus"
      args+=(--port 9090 --cmd=--config.file=/etc/prometheus/prometheus.yml --cmd=--storage.tsdb.path=/prometheus)
      ;;
  esac
  python3 "$HERE/mkimage.py" "${args[@]}" >&2
  rm -rf "$dir"
}

build() {
  local names=("$@")
  ((${#names[@]})) || names=("${ALL[@]}")
  local need_cargo=()
  for n in "${names[@]}"; do
    case "$n" in
      sluice-controller) need_cargo+=(-p sluice-controller) ;;
      sluice-worker) need_cargo+=(-p sluice-worker) ;;
      sluice-enrich-worker) need_cargo+=(-p enrich-worker) ;;
      sluice-bench) need_cargo+=(-p sluice-loadgen) ;;
    esac
  done
  if ((${#need_cargo[@]})); then
    local flags=(--locked --bins)
    [[ "$PROFILE" == release ]] && flags+=(--release)
    log "cargo build ${flags[*]} ${need_cargo[*]}"
    (cd "$ROOT" && cargo build "${flags[@]}" "${need_cargo[@]}")
  fi
  mkdir -p "$OUT"
  for n in "${names[@]}"; do build_one "$n"; done
}

case "${1:-}" in
  build) shift; build "$@" ;;
  load)
    shift
    build "$@"
    names=("$@")
    ((${#names[@]})) || names=("${ALL[@]}")
    "$HERE/cluster.sh" load $(for n in "${names[@]}"; do echo "$OUT/$n.tar"; done)
    ;;
  list) for n in "${ALL[@]}"; do echo "$n $(ref "$n") $OUT/$n.tar"; done ;;
  prometheus-operator-dir) prometheus_operator_dir ;;
  prepare) prometheus_operator; prometheus_server ;;
  prometheus-version) echo "v$PROM_VERSION" ;;
  *) echo "usage: $0 build|load|list|prepare|prometheus-operator-dir|prometheus-version [NAME...]" >&2; exit 2 ;;
esac
