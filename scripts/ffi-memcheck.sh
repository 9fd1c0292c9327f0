#!/usr/bin/env bash
# The sluice-rdkafka-ffi tests under valgrind's memcheck (issue 21): no invalid access, no
# use of uninitialised memory, no definite leak, or exit 1. The one suppression is a leak
# of rust-rdkafka's own (crates/sluice-rdkafka-ffi/valgrind.supp). The tests run against
# librdkafka's in-process mock cluster; SLUICE_FFI_TEST_RECORDS scales them down (about
# 30x slower under valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind not found (scripts/setup.sh installs it)" >&2; exit 1; }
BIN=$(cargo test -p sluice-rdkafka-ffi --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sluice_rdkafka_ffi":
        print(m["executable"])')
SLUICE_FFI_TEST_RECORDS="${SLUICE_FFI_TEST_RECORDS:-300}" valgrind --tool=memcheck --error-exitcode=1 \
  --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --suppressions=crates/sluice-rdkafka-ffi/valgrind.supp --num-callers=30 \
  "$BIN" --test-threads=1 "$@"
