#!/usr/bin/env bash
# The benchmark set of BENCHMARKS.md, in one run on one broker:
#   broker pinned to core 0, clients to core 1 (taskset), 8 partitions, 100-byte records,
#   a 2M-record backlog, REPS repetitions of each throughput mode, medians reported.
# Results: target/bench/results.jsonl (one JSON line per measurement) and a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS="${REPS:-3}"
COUNT="${COUNT:-2000000}"
LAT_SECONDS="${LAT_SECONDS:-10}"
PG_COUNT="${PG_COUNT:-200000}"
PG_ROWS_COUNT="${PG_ROWS_COUNT:-20000}"
BROKER_CPU="${BROKER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

log() { echo "[bench] $*" >&2; }

cargo build --release -p sluice-loadgen
BENCH=./target/release/sluice-bench

if [[ -z "${SLUICE_BOOTSTRAP:-}" ]]; then
  log "restarting the local broker pinned to cpu $BROKER_CPU"
  SLUICE_KAFKA_CPUS="$BROKER_CPU" scripts/kafka.sh restart
fi
run() { taskset -c "$CLIENT_CPU" "$BENCH" "$@" 2>"$OUT/last.log" | tee -a "$RESULTS" >&2; }

TOPIC="bench-in-$(date +%s)"
log "preloading $COUNT records into $TOPIC"
"$BENCH" preload --topic "$TOPIC" --count "$COUNT"

# The plain consumer baseline, tuned to what librdkafka can do here: larger fetches and a
# deeper prefetch queue (sluice bounds its prefetch by memory.fetchBuffer instead).
TUNED=(--consumer-property max.partition.fetch.bytes=4194304 --consumer-property fetch.max.bytes=67108864
  --consumer-property queued.min.messages=1000000 --consumer-property queued.max.messages.kbytes=262144)
for rep in $(seq "$REPS"); do
  # (its line has no consumer_properties; bench_summary.py reports it as consume-defaults)
  log "rep $rep: consume (librdkafka defaults)"
  run consume --topic "$TOPIC" --count "$COUNT"
  for mode in consume sluice-null relay sluice-relay sluice-relay-eos sluice-fanout engine engine-jq; do
    log "rep $rep: $mode"
    if [[ $mode == consume || $mode == relay ]]; then
      run "$mode" --topic "$TOPIC" --count "$COUNT" "${TUNED[@]}"
    else
      run "$mode" --topic "$TOPIC" --count "$COUNT"
    fi
  done
done

# The postgres sink: batched statements against one INSERT per row, same server, same run.
if [[ -z "${SLUICE_POSTGRES_URL:-}" ]]; then
  scripts/postgres.sh start
  SLUICE_POSTGRES_URL=$(scripts/postgres.sh url)
fi
export SLUICE_POSTGRES_URL
for rep in $(seq "$REPS"); do
  log "rep $rep: pg-batched ($PG_COUNT rows) and pg-rows ($PG_ROWS_COUNT rows)"
  run pg-batched --count "$PG_COUNT"
  run pg-rows --count "$PG_ROWS_COUNT"
done

# Latency at 10%, 50% and 80% of the bare relay's median maximum rate.
RELAY_MAX=$(python3 - "$RESULTS" <<'PY'
import json, sys, statistics
rates = [json.loads(l)["rate"] for l in open(sys.argv[1]) if json.loads(l)["mode"] == "relay"]
print(int(statistics.median(rates)))
PY
)
log "bare relay maximum (median): $RELAY_MAX records/s"
for pct in 10 50 80; do
  rate=$((RELAY_MAX * pct / 100))
  for which in relay sluice; do
    log "latency $which at $pct% ($rate/s)"
    run "latency-$which" --rate "$rate" --seconds "$LAT_SECONDS"
  done
  log "latency sluice, low-linger configuration, at $pct% ($rate/s)"
  run latency-sluice --rate "$rate" --seconds "$LAT_SECONDS" --linger 0ms --producer-linger-ms 0
  if [[ $pct == 10 ]]; then
    # Exactly-once against at-least-once as a read_committed reader of the output sees
    # them (the reader runs on the client core in both, so they compare with each other).
    log "latency sluice, at-least-once and exactly-once (window 100 ms), read_committed reader, at $pct% ($rate/s)"
    run latency-sluice --rate "$rate" --seconds "$LAT_SECONDS" --visible
    run latency-sluice-eos --rate "$rate" --seconds "$LAT_SECONDS"
  fi
done

# Kafka's own end-to-end latency tool (kafka-tools, in the broker's jars): one record at a
# time, produce with acks=all, then consume it; the floor that sluice's latency is read against.
E2E_TOOL_COUNT="${E2E_TOOL_COUNT:-10000}"
log "Kafka's EndToEndLatency tool: $E2E_TOOL_COUNT records of 100 B, acks=all"
KAFKA_LIBS="$(scripts/kafka.sh libs)"
taskset -c "$CLIENT_CPU" java -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.EndToEndLatency \
  "${SLUICE_BOOTSTRAP:-127.0.0.1:9092}" "e2e-latency-$(date +%s)" "$E2E_TOOL_COUNT" all 100 \
  2>"$OUT/last.log" | python3 -c '
import json, re, sys
text = sys.stdin.read()
m = re.search(r"Percentiles: 50th = (\d+), 99th = (\d+), 99.9th = (\d+)", text)
avg = re.search(r"Avg latency: ([\d.]+) ms", text)
if not m:
    sys.exit("EndToEndLatency printed no percentiles:\n" + text[-2000:])
print(json.dumps({"mode": "kafka-end-to-end-latency-tool", "records": int(sys.argv[1]),
    "p50_ms": float(m.group(1)), "p99_ms": float(m.group(2)), "p999_ms": float(m.group(3)),
    "avg_ms": float(avg.group(1)) if avg else None}))
' "$E2E_TOOL_COUNT" | tee -a "$RESULTS" >&2

python3 scripts/bench_summary.py "$RESULTS" | tee "$OUT/summary.md"

# Schema-registry records and the http sink, beside the JSON path (its own table).
scripts/bench-formats.sh

# Instructions per record and per stage (callgrind), for a fixed small workload.
scripts/profile.sh

# Throughput and latency while faults happen (RELIABILITY.md scenarios 1 and 5), next to
# the same run's steady state: worker processes, generator and auditor on the client cpu.
if [[ -z "${SLUICE_BOOTSTRAP:-}" ]]; then
  cargo build --release -p sluice-worker -p sluice-testkit
  log "faults: SIGKILL x4 and a rebalance storm at ${FAULT_RATE:-20000} records/s"
  taskset -c "$CLIENT_CPU" ./target/release/sluice-chaos --bench --rate "${FAULT_RATE:-20000}" \
    --worker ./target/release/sluice-worker | tee "$OUT/faults.md"
fi
