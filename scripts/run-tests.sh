#!/usr/bin/env bash
# Run every test binary of the workspace, even after one fails (`--no-fail-fast`: one flaky
# binary must not hide the results of the ones after it), one test at a time (the tests
# share the broker, the database and the cluster), then list every failed test. Exits
# non-zero when any test failed. Extra arguments go to `cargo test` (e.g. `-p sluice-api`).
#
#   scripts/run-tests.sh [cargo test args...]
set -uo pipefail
cd "$(dirname "$0")/.."

log="${SLUICE_TEST_LOG:-target/test-output.log}"
mkdir -p "$(dirname "$log")"
: >"$log"
# Both streams into the log: the test binaries print results on stdout, cargo its errors on
# stderr.
${CARGO:-cargo} test --workspace --all-targets --no-fail-fast "$@" -- --test-threads=1 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

passed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($(i+1) ~ /^passed;?$/) s+=$i} END {print s+0}' "$log")
failed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($(i+1) ~ /^failed;?$/) s+=$i} END {print s+0}' "$log")
binaries=$(grep -c '^test result:' "$log" || true)
echo
echo "=== tests: $passed passed, $failed failed, in $binaries test binaries (log: $log)"
if ((rc != 0)); then
  # `test name ... FAILED` lines, with the binary each ran in (`Running ...` lines).
  awk '/^ *(Running|Doc-tests) / {bin=$0; sub(/^ *(Running|Doc-tests) /, "", bin)} / \.\.\. FAILED$/ {sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "    " $0 "  (" bin ")"}' "$log" >"$log.failed"
  if [[ -s "$log.failed" ]]; then
    echo "=== failed tests:"
    cat "$log.failed"
  fi
  # A binary that did not build, or crashed before reporting, has no `test result:` line.
  grep -E '^error: (could not compile|test failed|[0-9]+ targets? failed)' "$log" | sed 's/^/    /' || true
  echo "=== FAILED (cargo test exited $rc)"
fi
exit "$rc"
