#!/usr/bin/env python3
"""Produce and consume schema-registry-framed records with Confluent's own Python client.

An independent, real client for the schema-registry tests: records are written by
confluent_kafka's AvroSerializer / ProtobufSerializer (Confluent wire format: magic byte 0,
4-byte big-endian schema id, then the Avro body, or for Protobuf the message-index list and the
message), their schemas registered in the registry (scripts/registry.sh), and read back by
AvroDeserializer / ProtobufDeserializer.

    registry-roundtrip.py setup
        create the client's virtualenv (once per machine) and print its path
    registry-roundtrip.py produce --bootstrap 127.0.0.1:9092 --registry URL --topic T [-n N]
                                  [--format avro|protobuf|both] [--subject-strategy record|topic]
        create the topic if missing (1 partition), then write N records of each format; record
        i is {"id": i, "name": "sensor-<i>", "temp": 20.0 + i / 4} in both formats; prints one
        JSON line per format: its subject and schema id
    registry-roundtrip.py consume --bootstrap ... --registry URL --topic T [-n N] [--timeout S]
                                  [--verify]
        read the topic from the start and print one JSON line per record: partition, offset,
        schema id, format (from the registry: GET /schemas/ids/<id>), for Protobuf the
        message indexes, and the decoded value. Stops after N records (default: when the topic
        is drained) or S seconds without a record. --verify: exit 1 unless every record is the
        one produce writes at its index.

Subjects: with --subject-strategy record (the default) Avro records go under
`sluice.regprobe.avro.Reading` and Protobuf ones under `sluice.regprobe.pb.Reading`, so both
formats can share one topic; with `topic`, under `<topic>-value` (then use one format a topic:
a subject holds one schema type).

Runs itself under a virtualenv with confluent-kafka[avro,protobuf,schemaregistry] and
grpcio-tools (which carries protoc: the Protobuf message class is compiled from the .proto
text below at run time), made on first use in $SLUICE_CACHE/registry-client-<version>/venv
(default ~/.cache/sluice). SLUICE_REGISTRY_CLIENT_VERSION picks confluent-kafka's version.
"""

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time

CK_VERSION = os.environ.get("SLUICE_REGISTRY_CLIENT_VERSION", "2.16.1")
CACHE = os.path.join(
    os.environ.get("SLUICE_CACHE", os.path.expanduser("~/.cache/sluice")), f"registry-client-{CK_VERSION}"
)
VENV = os.path.join(CACHE, "venv")
REQUIREMENTS = [f"confluent-kafka[avro,protobuf,schemaregistry]=={CK_VERSION}", "grpcio-tools"]

AVRO_SCHEMA = json.dumps({
    "type": "record",
    "name": "Reading",
    "namespace": "sluice.regprobe.avro",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": "string"},
        {"name": "temp", "type": "double"},
    ],
})

# The second message makes the message-index list visible: Reading is index 0 (written as the
# single byte 0x00), Envelope would be [1] (0x02 0x02: the count, then index 1, zigzag varints).
PROTO_FILE = "sluice_regprobe.proto"
PROTO_TEXT = """syntax = "proto3";
package sluice.regprobe.pb;

message Envelope {
  string source = 1;
}

message Reading {
  int64 id = 1;
  string name = 2;
  double temp = 3;
}
"""


def log(msg):
    print(f"[registry-roundtrip] {msg}", file=sys.stderr, flush=True)


def in_venv():
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def ensure_venv():
    """Create the virtualenv once (under a lock: tests may start several of us at once)."""
    done = os.path.join(VENV, ".complete")
    if os.path.exists(done):
        return
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):
            return
        t = time.monotonic()
        log(f"creating {VENV} with {' '.join(REQUIREMENTS)} from PyPI (once per machine)")
        subprocess.run(["rm", "-rf", VENV], check=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        pip = [os.path.join(VENV, "bin", "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + REQUIREMENTS, check=True)
        open(done, "w").close()
        log(f"virtualenv ready in {time.monotonic() - t:.0f}s")


def reexec_in_venv():
    ensure_venv()
    py = os.path.join(VENV, "bin", "python")
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def reading(i):
    return {"id": i, "name": f"sensor-{i}", "temp": 20.0 + i / 4}


def proto_module():
    """The generated module for PROTO_TEXT, compiled by grpcio-tools' protoc into the cache."""
    import importlib.util

    from grpc_tools import protoc

    out = os.path.join(CACHE, "gen")
    os.makedirs(out, exist_ok=True)
    src = os.path.join(out, PROTO_FILE)
    mod_path = os.path.join(out, PROTO_FILE.replace(".proto", "_pb2.py"))
    if not os.path.exists(src) or open(src).read() != PROTO_TEXT or not os.path.exists(mod_path):
        tmp = f"{src}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(PROTO_TEXT)
        os.replace(tmp, src)
        if protoc.main(["protoc", f"-I{out}", f"--python_out={out}", src]) != 0:
            raise SystemExit(f"protoc failed on {src}")
    spec = importlib.util.spec_from_file_location(PROTO_FILE.replace(".proto", "_pb2"), mod_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def registry_client(url):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": url})


def ensure_topic(bootstrap, topic):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=10).topics:
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic]
    try:
        fut.result(timeout=30)
    except KafkaException as e:
        if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise


def produce(args):
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import record_subject_name_strategy, topic_subject_name_strategy
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    sr = registry_client(args.registry)
    strategy = record_subject_name_strategy if args.subject_strategy == "record" else topic_subject_name_strategy
    ensure_topic(args.bootstrap, args.topic)
    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    ctx = SerializationContext(args.topic, MessageField.VALUE)
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    def write(values):
        for i, value in enumerate(values):
            producer.produce(args.topic, key=str(i).encode(), value=value, on_delivery=delivered)
            producer.poll(0)

    formats = ["avro", "protobuf"] if args.format == "both" else [args.format]
    for fmt in formats:
        if fmt == "avro":
            ser = AvroSerializer(sr, AVRO_SCHEMA, conf={"subject.name.strategy": strategy})
            subject = strategy(ctx, "sluice.regprobe.avro.Reading")
            write([ser(reading(i), ctx) for i in range(args.n)])
        else:
            pb = proto_module()
            ser = ProtobufSerializer(pb.Reading, sr, conf={"subject.name.strategy": strategy})
            subject = strategy(ctx, pb.Reading.DESCRIPTOR.full_name)
            write([ser(pb.Reading(**reading(i)), ctx) for i in range(args.n)])
        schema_id = sr.get_latest_version(subject).schema_id
        print(json.dumps({"format": fmt, "subject": subject, "schema_id": schema_id, "records": args.n}), flush=True)
    left = producer.flush(30)
    if failures or left:
        raise SystemExit(f"{len(failures)} records failed, {left} undelivered: {failures[:3]}")


def read_varint(buf, pos):
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def message_indexes(value):
    """Confluent's Protobuf framing after the schema id: a zigzag-varint count, then as many
    zigzag-varint indexes; the single byte 0 stands for [0] (the file's first message)."""
    zz = lambda n: (n >> 1) ^ -(n & 1)  # noqa: E731
    count, pos = read_varint(value, 5)
    count = zz(count)
    if count == 0:
        return [0]
    idx = []
    for _ in range(count):
        n, pos = read_varint(value, pos)
        idx.append(zz(n))
    return idx


def consume(args):
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    sr = registry_client(args.registry)
    avro = AvroDeserializer(sr)
    pb = None
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": f"regprobe-{os.getpid()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    meta = consumer.list_topics(args.topic, timeout=10).topics[args.topic]
    if meta.error is not None:
        raise SystemExit(f"topic {args.topic}: {meta.error}")
    parts = [TopicPartition(args.topic, p) for p in meta.partitions]
    ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    consumer.assign([TopicPartition(args.topic, p.partition, 0) for p in parts])
    ctx = SerializationContext(args.topic, MessageField.VALUE)
    types = {}
    seen = bad = 0
    per_format = {}
    last = time.monotonic()
    try:
        while args.n is None or seen < args.n:
            if args.n is None and all(consumer.position([TopicPartition(args.topic, p)])[0].offset >= end
                                      for p, end in ends.items() if end > 0):
                break
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() - last > args.timeout:
                    break
                continue
            if msg.error():
                raise SystemExit(f"consume error: {msg.error()}")
            last = time.monotonic()
            raw = msg.value()
            if not raw or raw[0] != 0 or len(raw) < 5:
                raise SystemExit(f"offset {msg.offset()}: not Confluent-framed: {raw[:8]!r}")
            schema_id = int.from_bytes(raw[1:5], "big")
            if schema_id not in types:
                types[schema_id] = sr.get_schema(schema_id).schema_type or "AVRO"
            out = {"partition": msg.partition(), "offset": msg.offset(), "schema_id": schema_id,
                   "format": types[schema_id].lower()}
            if types[schema_id] == "AVRO":
                out["value"] = avro(raw, ctx)
            elif types[schema_id] == "PROTOBUF":
                if pb is None:
                    pb = ProtobufDeserializer(proto_module().Reading, {"use.deprecated.format": False})
                out["message_indexes"] = message_indexes(raw)
                m = pb(raw, ctx)
                out["value"] = {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}
            else:
                raise SystemExit(f"schema {schema_id} is {types[schema_id]}, not AVRO or PROTOBUF")
            k = int(msg.key()) if msg.key() and msg.key().isdigit() else None
            if args.verify and (k is None or out["value"] != reading(k)):
                bad += 1
                log(f"offset {msg.offset()}: {out['value']} is not record {k}")
            per_format[out["format"]] = per_format.get(out["format"], 0) + 1
            print(json.dumps(out), flush=True)
            seen += 1
    finally:
        consumer.close()
    log(f"read {seen} records ({', '.join(f'{v} {k}' for k, v in sorted(per_format.items())) or 'none'})")
    if args.verify and (bad or seen == 0 or (args.n is not None and seen < args.n)):
        raise SystemExit(f"verify failed: {bad} wrong, {seen} read")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create the virtualenv and print its path")
    for name in ("produce", "consume"):
        s = sub.add_parser(name)
        s.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, e.g. 127.0.0.1:9092")
        s.add_argument("--registry", required=True, help="Confluent-compatible registry base URL "
                       "(scripts/registry.sh url)")
        s.add_argument("--topic", required=True)
        if name == "produce":
            s.add_argument("-n", type=int, default=10, help="records of each format (default 10)")
            s.add_argument("--format", choices=["avro", "protobuf", "both"], default="both")
            s.add_argument("--subject-strategy", choices=["record", "topic"], default="record")
        else:
            s.add_argument("-n", type=int, default=None, help="stop after N records")
            s.add_argument("--timeout", type=float, default=10.0, help="seconds without a record before stopping")
            s.add_argument("--verify", action="store_true", help="exit 1 unless each record is the produced one")
    args = p.parse_args()
    if args.cmd == "setup":
        ensure_venv()
        print(VENV)
        return
    if not in_venv():
        reexec_in_venv()
    produce(args) if args.cmd == "produce" else consume(args)


if __name__ == "__main__":
    main()
