#!/usr/bin/env bash
# The operator at scale (BENCHMARKS.md, "The operator at scale"): the release controller
# against its own kube-apiserver + etcd (started here, stopped and deleted at the end, so
# the shared one other tests use is not loaded) and the broker, N = COUNTS pipelines over
# TOPICS shared topics of PARTITIONS partitions, each pipeline its own group.
#
#   COUNTS=100,1000,10000 TOPICS=100 PARTITIONS=12 POLL=30 STEADY=60 scripts/bench-operator.sh
#
# SLUICE_BENCH_K8S_PORT / SLUICE_BENCH_K8S_DIR (default 7443, /tmp/sluice-k8s-bench) place the
# API server (etcd takes SLUICE_K8S_ETCD_PORT and the next, default that port + 10000);
# SLUICE_KAFKA_PORT / SLUICE_KAFKA_DIR the broker (started if none runs there, and then left
# running: stop it with `scripts/kafka.sh stop` under the same variables). CONTROLLER runs
# another controller binary (a copy under another name is safe from a `pkill` of others'). Results: target/bench/operator.jsonl, a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNTS="${COUNTS:-100,1000,10000}"
TOPICS="${TOPICS:-100}"
PARTITIONS="${PARTITIONS:-12}"
POLL="${POLL:-30}"
STEADY="${STEADY:-60}"
export SLUICE_K8S_PORT="${SLUICE_BENCH_K8S_PORT:-7443}"
export SLUICE_K8S_DIR="${SLUICE_BENCH_K8S_DIR:-/tmp/sluice-k8s-bench}"
OUT=target/bench
mkdir -p "$OUT"

log() { echo "[bench-operator] $*" >&2; }

cargo build --release -p sluice-controller --bin sluice-controller --example bench_operator
BOOTSTRAP="127.0.0.1:${SLUICE_KAFKA_PORT:-9092}"
if ! (exec 3<>"/dev/tcp/127.0.0.1/${SLUICE_KAFKA_PORT:-9092}") 2>/dev/null; then
  scripts/kafka.sh start
fi
log "API server on 127.0.0.1:$SLUICE_K8S_PORT ($SLUICE_K8S_DIR), broker $BOOTSTRAP"
scripts/k8s.sh start
trap 'scripts/k8s.sh stop' EXIT

./target/release/examples/bench_operator \
  --controller "${CONTROLLER:-./target/release/sluice-controller}" \
  --kubeconfig "$SLUICE_K8S_DIR/kubeconfig" --bootstrap "$BOOTSTRAP" \
  --counts "$COUNTS" --topics "$TOPICS" --partitions "$PARTITIONS" \
  --poll "$POLL" --steady "$STEADY" | tee "$OUT/operator.jsonl"

python3 - "$OUT/operator.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| pipelines (topics x partitions) | every pipeline has status | lag freshness p50 / p99 / max (pollInterval) | freshness of one topic's pipelines among N, p50 / max | controller CPU, steady | RSS start -> steady -> after delete | threads | Kafka TCP connections | API requests/min, steady | API requests during the lag change | Kafka requests/min, steady | per-pipeline series left | machine load (1 min) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    api = ", ".join(f"{k} {int(v)}" for k, v in sorted(r["api_per_min_steady"].items()) if v) or "0"
    fresh = ", ".join(f"{k} {int(v)}" for k, v in sorted(r["api_during_fresh"].items()) if v) or "0"
    kafka = ", ".join(f"{k} {int(v)}" for k, v in sorted(r.get("kafka_per_min_steady", {}).items()) if v) or "0"
    print(f"| {r['n']:,} ({r['topics']} x {r['partitions']}) | {r['all_status_s']:.0f} s (creating took {r['create_s']:.0f} s; worst own {r['worst_own_status_s']:.0f} s) "
          f"| {r['fresh_p50_s']:.1f} / {r['fresh_p99_s']:.1f} / {r['fresh_max_s']:.1f} s ({r['poll_s']} s; {r['fresh_n']:,} of {r['n']:,}) "
          f"| {r.get('fresh_one_topic_p50_s', float('nan')):.1f} / {r.get('fresh_one_topic_max_s', float('nan')):.1f} s ({r.get('fresh_one_topic_n', 0)} of {r.get('fresh_one_topic_of', 0)}) "
          f"| {r['steady_cpu_s_per_min']:.1f} CPU-s/min | {r['rss_start_mib']} -> {r['rss_steady_mib']} -> {r['rss_after_delete_mib']} MiB "
          f"| {r['threads']} | {r['kafka_tcp']} | {api} | {fresh} | {kafka} | {r['series_left']} | {r.get('load_avg_steady', float('nan')):.1f} |")
PY
