#!/usr/bin/env python3
"""Pack a root filesystem folder into a container image tarball, without Docker.

The output is a docker-archive (the `docker save` layout: manifest.json, an image config and
one layer) that `ctr images import` and `docker load` both accept. Files are owned by root
with their mtimes zeroed, so the same folder always gives the same image ID.

usage: mkimage.py --rootfs DIR --ref NAME:TAG --out FILE.tar --cmd ARG [--cmd ARG ...]
                  [--entrypoint ARG ...] [--user UID:GID] [--env K=V ...] [--port N ...]
"""
import argparse
import hashlib
import io
import json
import os
import tarfile


def layer_of(rootfs):
    buf = io.BytesIO()

    def normalize(ti):
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 0
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(rootfs)):
            t.add(os.path.join(rootfs, name), arcname=name, filter=normalize)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", required=True)
    ap.add_argument("--ref", required=True, help="the image reference, e.g. sluice.local/sluice-worker:dev")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--user", default="")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--port", action="append", default=[])
    a = ap.parse_args()

    layer = layer_of(a.rootfs)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": env,
            "WorkingDir": "/",
            **({"Cmd": a.cmd} if a.cmd else {}),
            **({"Entrypoint": a.entrypoint} if a.entrypoint else {}),
            **({"User": a.user} if a.user else {}),
            **({"ExposedPorts": {f"{p}/tcp": {} for p in a.port}} if a.port else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/mkimage.py"}],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [a.ref], "Layers": ["layer/layer.tar"]}]).encode()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as t:
        for name, data in ((cfg_name, cfg), ("layer/layer.tar", layer), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    os.replace(tmp, a.out)
    print(f"{a.out} {a.ref} {len(layer) // 1024} KiB sha256:{hashlib.sha256(cfg).hexdigest()[:12]}")


if __name__ == "__main__":
    main()
