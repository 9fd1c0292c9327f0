"""Summarise the callgrind profiles of scripts/profile.sh: instructions per record, in all
and per stage of the data path (BENCHMARKS.md, "Where the CPU goes").

    python3 scripts/profile_summary.py COUNT DIR/*.cg

Instruction counts (valgrind's Ir) are repeatable on a noisy machine, unlike time: a
regression shows as a number. Stages are read from callgrind's inclusive costs, by the
function (a task by the source file its poll was inlined from: pool.rs, batcher.rs).
Rows are inclusive and overlap where one stage runs inside another (the null sink's
settling inside its batcher, say), so they do not add up; indented rows are part of the
row above them.
Each profile is also written as one JSON line to DIR/profile.jsonl.
"""
import json
import os
import re
import subprocess
import sys

LINE = re.compile(r"^\s*([\d,]+) \([ \d.]+%\)\s+(?:\*\s+)?(.*?)(?: \[[^\]]*\])?$")

# (label, depth, every substring that must appear in "file:function")
STAGES = [
    ("librdkafka broker threads: fetch, parse, produce requests", 0, ["rdkafka_broker.c:rd_kafka_broker_thread_main"]),
    ("parse fetched record batches", 1, ["rdkafka_fetcher.c:rd_kafka_fetch_reply_handle_partition"]),
    ("build produce requests", 1, ["rdkafka_msgset_writer.c:rd_kafka_msgset_create_ProduceRequest"]),
    ("plain consumer's poll loop (baseline only)", 0, ["sluice-bench.rs:sluice_bench::consume"]),
    ("plain consumer's drain loop, a batch at a time (consume-feed only)", 0, ["sluice-bench.rs:sluice_bench::batch_consume"]),
    ("take messages a batch at a time (rd_kafka_consume_callback_queue)", 1, ["rdkafka.c:rd_kafka_consume_callback_queue"]),
    ("take a message from librdkafka (rust-rdkafka stream)", 0, ["stream_consumer.rs:<rdkafka::consumer::stream_consumer::MessageStream"]),
    ("copy key, value, headers out, one allocation each (Record::from_message)", 0, ["record.rs:sluice_worker::record::Record::from_message"]),
    ("copy key, value, headers out (RecordBatchBuilder::push)", 0, ["record.rs:sluice_worker::record::RecordBatchBuilder::push"]),
    ("librdkafka's lazy header parse (records have none)", 1, ["rdkafka_msg.c:rd_kafka_message_headers"]),
    ("records from the batch buffer (RecordBatchBuilder::finish)", 0, ["record.rs:sluice_worker::record::RecordBatchBuilder::finish"]),
    ("destroy librdkafka messages", 0, ["rdkafka_event.c:rd_kafka_event_destroy"]),
    ("worker lanes: process, fan out (pool.rs)", 0, ["sluice-worker/src/pool.rs:<tracing::instrument::Instrumented"]),
    ("batchers, and the null sink (batcher.rs)", 0, ["sluice-worker/src/batcher.rs:<tracing::instrument::Instrumented"]),
    ("kafka sink: hand outputs to the producer", 0, ["sink/kafka.rs:<sluice_worker::sink::kafka::KafkaSink as sluice_worker::sink::Sink>::deliver::{{closure}}"]),
    ("rd_kafka_producev (librdkafka)", 1, ["rdkafka_msg.c:rd_kafka_producev"]),
    ("delivery reports (producer poll thread)", 0, ["base_producer.rs:rdkafka::producer::base_producer::BaseProducer<C,Part>::poll"]),
    ("settle a sink batch: latency histogram, tokens", 0, ["sink/mod.rs:sluice_worker::sink::SinkBatch::acknowledge"]),
    ("offset tracker: batches done", 0, ["partition.rs:sluice_worker::partition::PartitionState::batch_done"]),
    ("statistics callback (lag, liveness)", 0, ["consumer.rs:<sluice_worker::consumer::SluiceContext as rdkafka::client::ClientContext>::stats"]),
]

ALLOC = ("mimalloc", "malloc.c:", "/malloc/")


def annotate(path, inclusive):
    out = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", path],
        capture_output=True, text=True, check=True,
    ).stdout
    costs = {}
    total = None
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        name = m.group(2)
        if name == "PROGRAM TOTALS":
            total = ir
            continue
        costs[name] = max(costs.get(name, 0), ir)
    return total, costs


def main():
    count = int(sys.argv[1])
    files = sys.argv[2:]
    rows = []
    for path in files:
        mode = os.path.basename(path).removesuffix(".cg")
        total, inc = annotate(path, True)
        _, exc = annotate(path, False)
        stages = {}
        for label, _, needles in STAGES:
            v = max((ir for name, ir in inc.items() if all(n in name for n in needles)), default=0)
            stages[label] = v
        alloc = sum(ir for name, ir in exc.items() if any(a in name for a in ALLOC))
        rows.append({"mode": mode, "records": count, "ir_total": total, "ir_per_record": total / count,
                     "stages": {k: v / count for k, v in stages.items()}, "allocator_per_record": alloc / count})
    with open(os.path.join(os.path.dirname(files[0]), "profile.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    modes = [r["mode"] for r in rows]
    print(f"Instructions per record (valgrind --tool=callgrind, {count:,} records of 100 B, whole process incl. start-up)")
    print()
    print("| stage | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    print("| **all** | " + " | ".join(f"**{r['ir_per_record']:,.0f}**" for r in rows) + " |")
    for label, depth, _ in STAGES:
        vals = [r["stages"][label] for r in rows]
        if not any(v >= 1 for v in vals):
            continue
        pad = "&nbsp;&nbsp;" * 2 * depth + ("of which " if depth else "")
        print(f"| {pad}{label} | " + " | ".join(f"{v:,.0f}" if v >= 1 else "" for v in vals) + " |")
    print("| allocator (malloc/free, self) | " + " | ".join(f"{r['allocator_per_record']:,.0f}" for r in rows) + " |")
    if "consume" in modes:
        base = rows[modes.index("consume")]["ir_per_record"]
        print()
        for r in rows:
            if r["mode"] != "consume":
                print(f"- {r['mode']}: {r['ir_per_record'] / base:.2f} x the plain consumer's instructions per record")


if __name__ == "__main__":
    main()
