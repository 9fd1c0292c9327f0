"""Summarise target/bench/results.jsonl: medians per mode, and the ratios BENCHMARKS.md reports."""
import json
import statistics
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]


def med(mode, key, rate=None):
    vals = [r[key] for r in rows if r["mode"] == mode and (rate is None or r.get("offered_rate") == rate) and r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


print("| mode | runs | median records/s | CPU s per 1M | peak RSS MiB |")
print("|---|---|---|---|---|")
for mode in ["consume", "sluice-null", "relay", "sluice-relay", "sluice-fanout", "engine", "engine-jq", "pg-batched", "pg-rows"]:
    n = sum(1 for r in rows if r["mode"] == mode)
    print(f"| {mode} | {n} | {med(mode, 'rate'):,.0f} | {med(mode, 'cpu_s_per_million'):.2f} | {med(mode, 'peak_rss_mib'):.0f} |")
print()
print(f"- sluice-null / consume  = {med('sluice-null', 'rate') / med('consume', 'rate'):.2f} (target >= 0.9)")
print(f"- sluice-relay / relay   = {med('sluice-relay', 'rate') / med('relay', 'rate'):.2f} (target >= 0.9)")
print(f"- engine                 = {med('engine', 'rate') / 1e6:.2f} M records/s on one core (target >= 5)")
if med('engine-jq', 'rate') == med('engine-jq', 'rate'):
    jq_us = 1e6 / med('engine-jq', 'rate') - 1e6 / med('engine', 'rate')
    print(f"- jq cost                = {jq_us:.2f} us per record over passthrough (engine-jq {med('engine-jq', 'rate') / 1e6:.2f} M/s)")
if med('sluice-fanout', 'rate') == med('sluice-fanout', 'rate'):
    print(f"- fan-out / single sink  = {med('sluice-fanout', 'rate') / med('sluice-relay', 'rate'):.2f} (two Kafka sinks vs one)")
if med('pg-batched', 'rate') == med('pg-batched', 'rate'):
    print(f"- postgres batched / row = {med('pg-batched', 'rate') / med('pg-rows', 'rate'):.1f}x ({med('pg-batched', 'rate'):,.0f} vs {med('pg-rows', 'rate'):,.0f} rows/s; target >= 10x)")
print()
print("| offered rate | mode | delivered/s | p50 ms | p99 ms | p99.9 ms |")
print("|---|---|---|---|---|---|")
lat = [r for r in rows if r["mode"].startswith("latency")]
for r in lat:
    label = f"{r['mode']} (linger {r.get('linger', '?')})"
    print(f"| {r['offered_rate']:,.0f} | {label} | {r['rate']:,.0f} | {r['p50_ms'] or float('nan'):.2f} | {r['p99_ms'] or float('nan'):.2f} | {r['p999_ms'] or float('nan'):.2f} |")
