#!/usr/bin/env bash
# Instruction-count profile of a fixed small workload (BENCHMARKS.md, "Where the CPU goes"):
# valgrind's callgrind counts the instructions each stage of the data path runs for
# PROFILE_COUNT records, which repeats to within a few percent on a shared, noisy machine,
# so a regression in CPU per record shows as a number. `make bench` runs it; `make profile`
# runs it alone.
#
#   PROFILE_COUNT   records in the workload (default 200000, 100 B each, 8 partitions)
#   PROFILE_MODES   sluice-bench modes to profile (default: consume sluice-null sluice-relay relay)
#   SLUICE_BOOTSTRAP  broker (default: the local one, started if needed)
#
# Output: target/bench/profile/<mode>.cg (open with callgrind_annotate or kcachegrind),
# target/bench/profile/profile.jsonl and the table in target/bench/profile/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${PROFILE_COUNT:-200000}"
MODES="${PROFILE_MODES:-consume sluice-null sluice-relay relay}"
OUT=target/bench/profile
log() { echo "[profile] $*" >&2; }

command -v valgrind >/dev/null || { log "valgrind not found (scripts/setup.sh installs it)"; exit 1; }
cargo build --release -p sluice-loadgen
BENCH=./target/release/sluice-bench
if [[ -z "${SLUICE_BOOTSTRAP:-}" ]]; then scripts/kafka.sh start; fi

mkdir -p "$OUT"
rm -f "$OUT"/*.cg
# A topic with exactly COUNT records: every mode does the same work, start to finish.
TOPIC="profile-in-$(date +%s)"
log "preloading $COUNT records into $TOPIC"
"$BENCH" preload --topic "$TOPIC" --count "$COUNT"
for mode in $MODES; do
  log "$mode under callgrind (about 50x slower than native)"
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$mode.cg" \
    "$BENCH" "$mode" --topic "$TOPIC" --count "$COUNT" >"$OUT/$mode.json" 2>"$OUT/$mode.log"
done
FILES=()
for mode in $MODES; do FILES+=("$OUT/$mode.cg"); done
python3 scripts/profile_summary.py "$COUNT" "${FILES[@]}" | tee "$OUT/summary.md"
