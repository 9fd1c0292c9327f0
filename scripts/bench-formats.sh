#!/usr/bin/env bash
# Formats and services (BENCHMARKS.md, "Schema-registry records and the http sink"), in one
# run on one broker: the same records as JSON and as Avro in a schema registry's wire format
# (Apicurio, scripts/registry.sh), each read by the sluice pipeline into the null sink and
# posted as JSON arrays to a local HTTP receiver (another process, on the broker's core, so
# its CPU is not the pipeline's). REPS repetitions, medians; the pipeline on the client core.
# Results: target/bench/formats.jsonl and a table. `make bench` runs it; alone:
#   scripts/bench-formats.sh     (FMT_COUNT records, default 500000; REPS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

REPS="${REPS:-3}"
FMT_COUNT="${FMT_COUNT:-500000}"
BROKER_CPU="${BROKER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
HTTP_LISTEN="${SLUICE_BENCH_HTTP_LISTEN:-127.0.0.1:9290}"
OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/formats.jsonl"
: > "$RESULTS"
log() { echo "[bench-formats] $*" >&2; }

# As `make bench`: the broker without its OAUTHBEARER listener, so no Keycloak.
export SLUICE_KAFKA_OAUTH="${SLUICE_KAFKA_OAUTH:-0}"
cargo build --release -p sluice-loadgen
BENCH=./target/release/sluice-bench
if [[ -z "${SLUICE_BOOTSTRAP:-}" ]]; then scripts/kafka.sh start; fi
if [[ -n "${SLUICE_BENCH_REGISTRY:-}" ]]; then REG="$SLUICE_BENCH_REGISTRY"; else scripts/registry.sh start; REG="$(scripts/registry.sh url)"; fi

stamp=$(date +%s)
JSON_TOPIC="bench-fmt-json-$stamp"
AVRO_TOPIC="bench-fmt-avro-$stamp"
log "preloading $FMT_COUNT records as JSON into $JSON_TOPIC and as Avro into $AVRO_TOPIC"
"$BENCH" preload --topic "$JSON_TOPIC" --count "$FMT_COUNT"
"$BENCH" preload-avro --topic "$AVRO_TOPIC" --count "$FMT_COUNT" --registry "$REG"

taskset -c "$BROKER_CPU" "$BENCH" http-receiver --listen "$HTTP_LISTEN" 2>"$OUT/http-receiver.log" &
rx=$!
trap 'kill $rx 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/${HTTP_LISTEN%:*}/${HTTP_LISTEN#*:}") 2>/dev/null && break; sleep 0.1; done

run() { taskset -c "$CLIENT_CPU" "$BENCH" "$@" 2>"$OUT/last.log" | tee -a "$RESULTS" >&2; }
URL="http://$HTTP_LISTEN/ingest"
for rep in $(seq "$REPS"); do
  log "rep $rep: null sink, JSON and Avro"
  run sluice-null --topic "$JSON_TOPIC" --count "$FMT_COUNT"
  run sluice-null --topic "$AVRO_TOPIC" --count "$FMT_COUNT" --registry "$REG"
  log "rep $rep: http sink, JSON and Avro"
  run sluice-http --topic "$JSON_TOPIC" --count "$FMT_COUNT" --http-url "$URL"
  run sluice-http --topic "$AVRO_TOPIC" --count "$FMT_COUNT" --http-url "$URL" --registry "$REG"
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/formats.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(mode, key):
    v = [r[key] for r in rows if r["mode"] == mode]
    return statistics.median(v) if v else float("nan")
print("| mode | runs | median records/s | CPU s per 1M records | peak RSS MiB |")
print("|---|---|---|---|---|")
for m in ["sluice-null", "sluice-null-avro", "sluice-http-json", "sluice-http-avro"]:
    n = sum(1 for r in rows if r["mode"] == m)
    print(f"| {m} | {n} | {med(m, 'rate'):,.0f} | {med(m, 'cpu_s_per_million'):.2f} | {med(m, 'peak_rss_mib'):.0f} |")
print()
for a, b in [("sluice-null-avro", "sluice-null"), ("sluice-http-json", "sluice-null"), ("sluice-http-avro", "sluice-http-json")]:
    print(f"- CPU per record, {a} / {b}: {med(a, 'cpu_s_per_million') / med(b, 'cpu_s_per_million'):.2f}x; "
          f"records/s: {med(a, 'rate') / med(b, 'rate'):.2f}x")
PY
