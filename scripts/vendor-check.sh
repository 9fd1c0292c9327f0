#!/usr/bin/env bash
# The vendored rdkafka-sys (vendor/rdkafka-sys, used through [patch.crates-io] in Cargo.toml)
# must be exactly the published crate, minus the trims below, plus the patches in
# vendor/patches/*.patch: this rebuilds that tree from the published .crate and compares
# (vendor/patches/README.md tells why the tree exists and how to drop it).
#
#   scripts/vendor-check.sh          check (exit 1 and print the difference when it differs)
#   scripts/vendor-check.sh --write  rebuild vendor/rdkafka-sys from the crate and the patches
#
# The .crate comes from cargo's cache (CARGO_HOME, default ~/.cargo), or is fetched into it
# with `cargo fetch` of a throwaway project: no other network. Its sha256 is pinned (the
# checksum crates.io publishes, the one Cargo.lock carried before the patch).
# Needs: cargo, tar, git (for `git apply`, outside any repository), diff.
set -euo pipefail
cd "$(dirname "$0")/.."

CRATE=rdkafka-sys
VERSION=4.10.0+2.12.1
SHA256=e234cf318915c1059d4921ef7f75616b5219b10b46e9f3a511a15eb4b56a3f77
DEST=vendor/rdkafka-sys
PATCHES=vendor/patches
# Not needed to build the library: librdkafka's own test suite and examples (the build script
# sets RDKAFKA_BUILD_TESTS=0 and RDKAFKA_BUILD_EXAMPLES=0; mklove's `make libs` builds src/ and
# src-cpp/ only) and its distribution packaging (Debian, RPM, NuGet, Homebrew, ...), except
# packaging/cmake (CMakeLists.txt includes it) and packaging/get_version.py (mklove's Makefile
# reads the version with it).
TRIM=(
  librdkafka/tests
  librdkafka/examples
  librdkafka/debian
  librdkafka/packaging/RELEASE.md
  librdkafka/packaging/alpine
  librdkafka/packaging/archlinux
  librdkafka/packaging/cp
  librdkafka/packaging/debian
  librdkafka/packaging/homebrew
  librdkafka/packaging/mingw-w64
  librdkafka/packaging/nuget
  librdkafka/packaging/rpm
  librdkafka/packaging/tools
)

log() { echo "[vendor-check] $*" >&2; }

mode=check
case "${1:-}" in
  "") ;;
  --write) mode=write ;;
  *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
find_crate() {
  compgen -G "$CARGO_HOME/registry/cache/*/$CRATE-$VERSION.crate" | head -n 1 || true
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

crate_file="$(find_crate)"
if [[ -z "$crate_file" ]]; then
  log "$CRATE $VERSION is not in $CARGO_HOME/registry/cache: fetching it with cargo"
  mkdir -p "$WORK/fetch/src"
  cat >"$WORK/fetch/Cargo.toml" <<EOF
[package]
name = "vendor-check-fetch"
version = "0.0.0"
edition = "2021"

[dependencies]
$CRATE = { version = "=$VERSION", default-features = false }
EOF
  : >"$WORK/fetch/src/lib.rs"
  (cd "$WORK/fetch" && cargo fetch --quiet)
  crate_file="$(find_crate)"
  [[ -n "$crate_file" ]] || { log "cargo fetch did not leave $CRATE-$VERSION.crate in $CARGO_HOME"; exit 1; }
fi

actual_sha="$(sha256sum "$crate_file" | cut -d' ' -f1)"
if [[ "$actual_sha" != "$SHA256" ]]; then
  log "$crate_file: sha256 $actual_sha, expected $SHA256"
  exit 1
fi

# The expected tree: the crate as published, trimmed, patched.
tar -xzf "$crate_file" -C "$WORK"
EXPECTED="$WORK/$CRATE-$VERSION"
for t in "${TRIM[@]}"; do
  [[ -e "$EXPECTED/$t" ]] || { log "trim $t: not in the crate (update TRIM)"; exit 1; }
  rm -rf "${EXPECTED:?}/$t"
done
shopt -s nullglob
patches=("$PATCHES"/*.patch)
shopt -u nullglob
[[ ${#patches[@]} -gt 0 ]] || { log "no patches in $PATCHES"; exit 1; }
for p in "${patches[@]}"; do
  abs="$PWD/$p"
  # The patches are against librdkafka (upstream-ready, `git am`-able there). `git apply`
  # refuses any fuzz or offset a plain `patch` would accept; run outside every repository.
  (cd "$EXPECTED/librdkafka" && GIT_CEILING_DIRECTORIES="$WORK" git apply -p1 --whitespace=nowarn "$abs") \
    || { log "$p does not apply to $CRATE $VERSION"; exit 1; }
done

if [[ "$mode" == write ]]; then
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  cp -a "$EXPECTED" "$DEST"
  log "wrote $DEST ($(du -sh "$DEST" | cut -f1)) from $crate_file and ${#patches[@]} patch(es)"
  exit 0
fi

[[ -d "$DEST" ]] || { log "$DEST is missing (scripts/vendor-check.sh --write creates it)"; exit 1; }
status=0
# Contents, and which files exist on either side.
diff -r "$EXPECTED" "$DEST" >"$WORK/diff" || status=1
# Executable bits (git keeps them; configure scripts need them).
(cd "$EXPECTED" && find . -type f -perm -u+x | sort) >"$WORK/x.expected"
(cd "$DEST" && find . -type f -perm -u+x | sort) >"$WORK/x.actual"
diff "$WORK/x.expected" "$WORK/x.actual" >>"$WORK/diff" || status=1
if [[ $status -ne 0 ]]; then
  log "$DEST is not $CRATE $VERSION (trimmed) plus ${patches[*]}:"
  head -n 200 "$WORK/diff" >&2
  log "to rebuild it: scripts/vendor-check.sh --write"
  exit 1
fi
log "ok: $DEST is $CRATE $VERSION (sha256 ${SHA256:0:12}…), trimmed, plus ${patches[*]}"
