#!/usr/bin/env python3
"""Check that every Debian package the build and the tests use will be on a new machine.

A package counts as provided when it is on a new machine of this kind
(scripts/polyglot-packages.txt) or installed by scripts/setup.sh
(scripts/debian-packages.txt). The files the build and the tests use are found, not listed by
hand where that can be avoided:

  * every system header and library that a native build (librdkafka's cmake build, cc-rs
    builds) read, from the compilers' dependency files (*.d) under target/*/build;
  * the shared libraries every built executable loads (ldd);
  * the programs the scripts, the Makefile and the tests run (PROGRAMS below: a program that
    is not installed at all is reported too).

Each file is mapped to its package with `dpkg -S`. Exit 1, naming the package, the file and
who used it, when a package is in neither list: that is a build that only works on a machine
where somebody installed the package by hand (librdkafka's build needing libcurl's headers
was one).

usage: scripts/check-packages.py [TARGET_DIR]   (default: $CARGO_TARGET_DIR or target)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Programs run by scripts/*.sh, the Makefile and the tests (not the ones a new machine has
# for sure: bash, coreutils, git, cargo, go). Keep in step with what they call.
PROGRAMS = [
    "cmake", "cc", "make", "pkg-config", "curl", "openssl", "java", "mvn", "python3",
    "promtool", "prometheus", "taskset", "ip", "iptables", "containerd", "ctr", "runc",
    "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/portmap",
    "/usr/lib/cni/loopback", "gcc", "strip", "valgrind", "callgrind_annotate",
]
POSTGRES_PROGRAMS = ["initdb", "pg_ctl", "postgres", "psql"]


def read_list(name):
    with open(os.path.join(ROOT, "scripts", name)) as f:
        return {(l.split("#")[0].split() or [""])[0] for l in f} - {""}


def dpkg_owners(paths):
    """file -> package for every path dpkg knows (tries the /usr-merged twin too)."""
    owners = {}
    candidates = {}
    for p in paths:
        forms = {p, os.path.realpath(p)}
        for f in list(forms):
            if f.startswith("/usr/lib/") or f.startswith("/usr/bin/") or f.startswith("/usr/sbin/"):
                forms.add(f[4:])
            elif f.startswith(("/lib/", "/bin/", "/sbin/", "/lib64/")):
                forms.add("/usr" + f)
        candidates[p] = forms
    allforms = sorted({f for fs in candidates.values() for f in fs})
    found = {}
    for i in range(0, len(allforms), 200):
        out = subprocess.run(["dpkg", "-S", *allforms[i:i + 200]], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pkgs, _, path = line.partition(": ")
            if path in allforms and not pkgs.startswith("diversion"):
                found[path] = pkgs.split(",")[0].strip().split(":")[0]
    for p, forms in candidates.items():
        for f in forms:
            if f in found:
                owners[p] = found[f]
                break
    return owners


def build_inputs(target):
    """System files read by native builds: headers and libraries from *.d dependency files."""
    used = {}
    for d in glob.glob(os.path.join(target, "*", "build", "*", "out", "**", "*.d"), recursive=True):
        crate = re.sub(r"-[0-9a-f]{16}$", "", d.split("/build/")[1].split("/")[0])
        try:
            text = open(d, errors="replace").read()
        except OSError:
            continue
        for tok in re.split(r"[\s\\]+", text):
            tok = tok.rstrip(":")
            if tok.startswith("/usr/") and os.path.exists(tok):
                used.setdefault(tok, f"native build of {crate}")
    return used


def executables(target):
    out = []
    for profile in ("debug", "release"):
        d = os.path.join(target, profile)
        for f in glob.glob(os.path.join(d, "*")):
            if os.path.isfile(f) and os.access(f, os.X_OK) and "." not in os.path.basename(f):
                out.append(f)
    return out


def loaded_libraries(binaries):
    used = {}
    for b in binaries:
        res = subprocess.run(["ldd", b], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            m = re.search(r"=> (/\S+)", line)
            if m:
                used.setdefault(m.group(1), f"{os.path.basename(b)} loads it")
            elif "not found" in line:
                used.setdefault(line.split()[0], f"{os.path.basename(b)} loads it (NOT FOUND)")
    return used


def programs():
    used, missing = {}, []
    pg_bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    for prog in PROGRAMS + POSTGRES_PROGRAMS:
        path = prog if prog.startswith("/") else shutil.which(prog)
        if not path and prog in POSTGRES_PROGRAMS and pg_bins:
            cand = os.path.join(pg_bins[-1], prog)
            path = cand if os.path.exists(cand) else None
        if not path or not os.path.exists(path):
            missing.append(prog)
            continue
        used.setdefault(path, f"the scripts/tests run {prog}")
    return used, missing


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    base, declared = read_list("polyglot-packages.txt"), read_list("debian-packages.txt")
    used = {}
    inputs = build_inputs(target)
    if not inputs:
        print(f"check-packages: no native build dependency files under {target}/*/build: build first", file=sys.stderr)
        return 2
    used.update(inputs)
    bins = executables(target)
    used.update(loaded_libraries(bins))
    progs, missing_progs = programs()
    used.update(progs)
    owners = dpkg_owners(list(used))
    problems = []
    for prog in missing_progs:
        problems.append(f"program {prog!r} is not installed at all (scripts/debian-packages.txt should bring it)")
    by_pkg = {}
    for path, why in sorted(used.items()):
        if "NOT FOUND" in why:
            problems.append(f"{path}: {why}")
            continue
        pkg = owners.get(path)
        if pkg is None:
            continue  # not from a Debian package (e.g. rustup's or a locally built file)
        by_pkg.setdefault(pkg, (path, why))
    for pkg, (path, why) in sorted(by_pkg.items()):
        if pkg not in base and pkg not in declared:
            problems.append(
                f"Debian package {pkg} ({path}, {why}) is neither on a new polyglot machine nor in scripts/debian-packages.txt"
            )
    print(
        f"check-packages: {len(used)} files from {len(by_pkg)} Debian packages "
        f"({len(inputs)} build inputs, {len(bins)} executables, {len(progs)} programs); "
        f"{len(problems)} problem(s)"
    )
    for p in problems:
        print(f"  - {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
