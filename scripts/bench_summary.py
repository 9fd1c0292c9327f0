"""Summarise target/bench/results.jsonl: medians per mode, and the ratios BENCHMARKS.md reports."""
import json
import statistics
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# The plain consumer runs twice per repetition: with librdkafka's defaults, and tuned
# (--consumer-property ...); the tuned one is the baseline sluice is compared with.
for r in rows:
    if r["mode"] == "consume" and not r.get("consumer_properties"):
        r["mode"] = "consume-defaults"


def med(mode, key, rate=None):
    vals = [r[key] for r in rows if r["mode"] == mode and (rate is None or r.get("offered_rate") == rate) and r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


print("| mode | runs | median records/s | CPU s per 1M | peak RSS MiB |")
print("|---|---|---|---|---|")
for mode in ["consume-defaults", "consume", "sluice-null", "relay", "sluice-relay", "sluice-relay-eos", "sluice-fanout", "engine", "engine-jq", "pg-batched", "pg-rows"]:
    n = sum(1 for r in rows if r["mode"] == mode)
    print(f"| {mode} | {n} | {med(mode, 'rate'):,.0f} | {med(mode, 'cpu_s_per_million'):.2f} | {med(mode, 'peak_rss_mib'):.0f} |")
print()
print(f"- sluice-null / consume  = {med('sluice-null', 'rate') / med('consume', 'rate'):.2f} (target >= 0.9)")
print(f"- sluice-relay / relay   = {med('sluice-relay', 'rate') / med('relay', 'rate'):.2f} (target >= 0.9)")
print(f"- sluice-null            = {med('sluice-null', 'rate') / 1e6:.2f} M records/s at {med('sluice-null', 'cpu_s_per_million'):.2f} CPU-s per million (target >= 1.2 M/s, <= 0.5)")
print(f"- sluice-relay           = {med('sluice-relay', 'rate') / 1e6:.2f} M records/s at {med('sluice-relay', 'cpu_s_per_million'):.2f} CPU-s per million (target >= 1.0 M/s, <= 1.0)")
print(f"- CPU per record vs the tuned plain consumer: sluice-null {med('sluice-null', 'cpu_s_per_million') / med('consume', 'cpu_s_per_million'):.2f}x, sluice-relay {med('sluice-relay', 'cpu_s_per_million') / med('consume', 'cpu_s_per_million'):.2f}x")
if med('sluice-relay-eos', 'rate') == med('sluice-relay-eos', 'rate'):
    print(f"- exactly-once / at-least-once relay = {med('sluice-relay-eos', 'rate') / med('sluice-relay', 'rate'):.2f} (window 100 ms)")
print(f"- engine                 = {med('engine', 'rate') / 1e6:.2f} M records/s on one core (target >= 5)")
if med('engine-jq', 'rate') == med('engine-jq', 'rate'):
    jq_us = 1e6 / med('engine-jq', 'rate') - 1e6 / med('engine', 'rate')
    print(f"- jq cost                = {jq_us:.2f} us per record over passthrough (engine-jq {med('engine-jq', 'rate') / 1e6:.2f} M/s)")
if med('sluice-fanout', 'rate') == med('sluice-fanout', 'rate'):
    print(f"- fan-out / single sink  = {med('sluice-fanout', 'rate') / med('sluice-relay', 'rate'):.2f} (two Kafka sinks vs one)")
if med('pg-batched', 'rate') == med('pg-batched', 'rate'):
    print(f"- postgres batched / row = {med('pg-batched', 'rate') / med('pg-rows', 'rate'):.1f}x ({med('pg-batched', 'rate'):,.0f} vs {med('pg-rows', 'rate'):,.0f} rows/s; target >= 10x)")
print()
print("| offered rate | mode | delivered/s | p50 ms | p99 ms | p99.9 ms | visible p99 ms (read_committed reader) |")
print("|---|---|---|---|---|---|---|")
lat = [r for r in rows if r["mode"].startswith("latency")]
tool = [r for r in rows if r["mode"] == "kafka-end-to-end-latency-tool"]
for r in tool:
    print(f"| one at a time | Kafka's EndToEndLatency tool (acks=all, {r['records']:,} records) | | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | |")
for r in lat:
    label = f"{r['mode']} (linger {r.get('linger', '?')})"
    vis = r.get("visible_p99_ms")
    vis = f"{vis:.2f}" if vis is not None else ""
    print(f"| {r['offered_rate']:,.0f} | {label} | {r['rate']:,.0f} | {r['p50_ms'] or float('nan'):.2f} | {r['p99_ms'] or float('nan'):.2f} | {r['p999_ms'] or float('nan'):.2f} | {vis} |")
if tool:
    # The tool reports whole milliseconds: a p99 under 1 ms reads 0.
    p99_tool = max(tool[-1]["p99_ms"], 1.0)
    for r in lat:
        if r["mode"] == "latency-sluice" and r.get("p99_ms"):
            print(f"- {r['mode']} (linger {r.get('linger', '?')}) at {r['offered_rate']:,.0f}/s: p99 {r['p99_ms']:.2f} ms = {r['p99_ms'] / p99_tool:.2f} x the tool's p99 ({p99_tool:.0f} ms; target <= 2 x at 50% load)")
