//! `sluice-bench`: one benchmark measurement per invocation, printed as a JSON line.
//! `scripts/bench.sh` runs the set with repetitions, pinning, and takes medians.
//!
//! Modes:
//! - `preload`       fill the backlog topic (not measured)
//! - `consume`       plain rdkafka BaseConsumer drain loop, no processing (baseline)
//! - `consume-feed`  the same, but each partition's queue split off and drained a batch at
//!   a time through `sluice-rdkafka-ffi`'s `PartitionFeed` (issue 21: batch consume)
//! - `sluice-null`   the sluice pipeline into the null sink, commits on
//! - `relay`         bare relay: consume + produce, auto-commit, fire and forget
//! - `sluice-relay`  the sluice pipeline, passthrough to a Kafka topic, contiguous commits
//! - `engine`        the in-memory engine alone (no broker) on one core, passthrough
//! - `engine-jq`     the same with the jq processor running the IoT transform
//! - `sluice-fanout` the sluice pipeline, passthrough to two Kafka topics
//! - `pg-batched` / `pg-rows`: the postgres sink writing `count` rows in batches of 5000,
//!   or one row per statement (`SLUICE_POSTGRES_URL` names the database)
//! - `latency-relay` / `latency-sluice`: end-to-end latency at an offered `--rate`
//! - `sluice-relay-eos` / `latency-sluice-eos`: `sluice-relay` / `latency-sluice` with
//!   `delivery: exactly-once` (one transaction per `--window`)
//! - `preload-avro`  fill `--topic` with the same records in Avro, in a schema registry's
//!   wire format (`--registry`; the schema registered as `<topic>-value`)
//! - `http-receiver` an HTTP server on `--listen` answering 200 to every request after
//!   reading it (run apart, so its CPU is not the pipeline's); `--print` writes each body
//!   on a line of standard output (the e2e suite's HTTP service in the cluster)
//! - `sluice-http`   the sluice pipeline posting JSON arrays to `--http-url`; with
//!   `--registry`, reading Avro records decoded by their schema (reported as
//!   `sluice-http-avro`, else `sluice-http-json`). `sluice-null --registry` is the decoding
//!   alone (`sluice-null-avro`)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use prometheus::{Histogram, HistogramOpts};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use sluice_api::WorkerConfig;
use sluice_loadgen::{create_topic, produce, ProduceSpec};
use sluice_worker::metrics::LATENCY_BUCKETS;
use sluice_worker::progress::{quantile_interpolated, Snapshot};

#[derive(Parser)]
struct Args {
    mode: String,
    #[arg(long, env = "SLUICE_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value = "bench-in")]
    topic: String,
    #[arg(long, default_value_t = 2_000_000)]
    count: u64,
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Offered load for the latency modes (records/s).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Duration of a latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Batching linger for the sluice modes.
    #[arg(long, default_value = "5ms")]
    linger: String,
    /// linger.ms of the sluice Kafka sink's producer.
    #[arg(long, default_value_t = 2)]
    producer_linger_ms: u32,
    /// The transaction window of the `-eos` modes.
    #[arg(long, default_value = "100ms")]
    window: String,
    /// Latency modes: also measure what a `read_committed` reader of the output sees (a
    /// consumer in this process, so on the client's core: compare runs that both have it).
    /// Always on for `latency-sluice-eos`.
    #[arg(long)]
    visible: bool,
    /// A librdkafka consumer property (`name=value`, repeatable) for every consumer under
    /// test: the plain baselines' and sluice's (`source.consumerProperties`).
    #[arg(long = "consumer-property", value_parser = parse_property)]
    consumer_properties: Vec<(String, String)>,
    /// A Confluent-compatible schema registry: `preload-avro` registers its schema there;
    /// the sluice modes decode their input by it (`source.format.schemaRegistry`).
    #[arg(long)]
    registry: Option<String>,
    /// The endpoint of `sluice-http`.
    #[arg(long, default_value = "http://127.0.0.1:9290/ingest")]
    http_url: String,
    /// Where `http-receiver` listens.
    #[arg(long, default_value = "127.0.0.1:9290")]
    listen: String,
    /// `http-receiver`: print each request's body on a line of its own.
    #[arg(long)]
    print: bool,
}

/// The Avro schema of the load generator's records (`sluice_loadgen::payload`).
const AVRO_SCHEMA: &str = r#"{"type":"record","name":"Reading","namespace":"sluice.bench","fields":[{"name":"seq","type":"long"},{"name":"deviceId","type":"string"},{"name":"tempC","type":"double"},{"name":"pad","type":"string"}]}"#;

/// Fill `a.topic` with `a.count` records like `preload`'s, Avro-encoded in the wire format.
async fn preload_avro(a: &Args) -> anyhow::Result<()> {
    let url = a
        .registry
        .clone()
        .context("preload-avro needs --registry")?;
    create_topic(&a.bootstrap, &a.topic, a.partitions).await?;
    let config = sluice_api::config::SinkRegistryConfig {
        url,
        credentials_env: None,
        ca_file: None,
        subject_strategy: Default::default(),
        schema: sluice_api::config::WriterSchema::Avro(AVRO_SCHEMA.into()),
        auto_register: true,
    };
    let encoder =
        Arc::new(sluice_worker::format::encode::Encoder::new(&config, &a.topic, &|_| None).await?);
    let id = encoder.id;
    let (bootstrap, topic, count) = (a.bootstrap.clone(), a.topic.clone(), a.count);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("linger.ms", "5")
                .set("batch.num.messages", "10000")
                .set("queue.buffering.max.messages", "1000000")
                .set("enable.idempotence", "true")
                .create()?;
        for seq in 0..count {
            let v = encoder
                .encode(&sluice_loadgen::payload(seq, 100))
                .map_err(|e| anyhow::anyhow!("record {seq}: {e}"))?;
            let k = sluice_loadgen::key(seq);
            let mut rec = BaseRecord::to(&topic).key(&k).payload(&v);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => anyhow::bail!("produce failed: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(120))?;
        Ok(())
    })
    .await??;
    eprintln!("preloaded {} Avro records (schema id {id})", a.count);
    Ok(())
}

/// An HTTP server answering 200 to every request once its body is read; with `--print`,
/// each body is written to standard output on a line of its own (what the e2e suite reads
/// back from the pod's log).
async fn http_receiver(a: &Args) -> anyhow::Result<()> {
    use std::io::Write;
    let print = a.print;
    let take = move |body: axum::body::Bytes| async move {
        if print {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&body);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        std::hint::black_box(body.len());
        "ok"
    };
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    eprintln!("http receiver on {}", a.listen);
    let app = axum::Router::new()
        .fallback(take)
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20));
    axum::serve(listener, app).await?;
    Ok(())
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=value, got {s:?}"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// The consumer properties as a JSON object, for the measurement's line.
fn properties_json(a: &Args) -> serde_json::Value {
    a.consumer_properties
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A consumer configuration with the bench's `--consumer-property` settings applied.
fn consumer_client(a: &Args) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &a.bootstrap);
    for (k, v) in &a.consumer_properties {
        c.set(k, v);
    }
    c
}

/// Records, seconds, CPU seconds, and latency buckets (upper bound, cumulative count).
type Measurement = (u64, f64, f64, Vec<(f64, u64)>);

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0;
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

fn report(mode: &str, records: u64, secs: f64, cpu: f64, extra: serde_json::Value) {
    let mut v = serde_json::json!({
        "mode": mode,
        "records": records,
        "seconds": secs,
        "rate": records as f64 / secs,
        "cpu_s_per_million": cpu / (records as f64 / 1e6),
        "peak_rss_mib": peak_rss_mib(),
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    println!("{v}");
}

fn assign_all(c: &BaseConsumer, topic: &str, parts: i32) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(())
}

/// (1) Plain consumer: poll until `count` records were read.
fn consume(a: &Args) -> anyhow::Result<()> {
    let c: BaseConsumer = consumer_client(a)
        .set("group.id", format!("bench-consume-{}", run_id()))
        .set("enable.auto.commit", "false")
        .create()?;
    assign_all(&c, &a.topic, a.partitions)?;
    let mut n = 0u64;
    let mut bytes = 0u64;
    let (mut cpu0, mut t0) = (cpu_seconds(), Instant::now());
    while n < a.count {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            if n == 0 {
                // Time from the first record: group join and metadata are not throughput.
                (cpu0, t0) = (cpu_seconds(), Instant::now());
            }
            n += 1;
            bytes += m.payload_len() as u64;
        }
    }
    report(
        "consume",
        n,
        t0.elapsed().as_secs_f64(),
        cpu_seconds() - cpu0,
        serde_json::json!({"bytes": bytes, "consumer_properties": properties_json(a)}),
    );
    Ok(())
}

/// (1b) Plain consumer taking records a batch at a time: each partition's queue split off
/// into a [`PartitionFeed`] and drained with `rd_kafka_consume_callback_queue`, against
/// `consume`'s one `poll` per record. No processing either.
fn batch_consume(a: &Args) -> anyhow::Result<()> {
    use sluice_rdkafka_ffi::{Flow, PartitionFeed};
    let c: Arc<BaseConsumer> = Arc::new(
        consumer_client(a)
            .set("group.id", format!("bench-consume-{}", run_id()))
            .set("enable.auto.commit", "false")
            .create()?,
    );
    // Split before the assignment, so no record lands on the consumer's queue.
    let mut feeds = (0..a.partitions)
        .map(|p| PartitionFeed::split(&c, &a.topic, p).context("split the partition queue"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assign_all(&c, &a.topic, a.partitions)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let (mut cpu0, mut t0) = (cpu_seconds(), Instant::now());
    rt.block_on(async {
        while n < a.count {
            let mut got = 0;
            for f in feeds.iter_mut() {
                got += f.drain(|m| {
                    if m.error().is_some() {
                        return Flow::Continue;
                    }
                    if n == 0 {
                        (cpu0, t0) = (cpu_seconds(), Instant::now());
                    }
                    n += 1;
                    bytes += m.payload().map_or(0, <[u8]>::len) as u64;
                    if n >= a.count {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                });
            }
            if got == 0 {
                std::future::poll_fn(|cx| {
                    if feeds.iter().any(|f| f.poll_ready(cx).is_ready()) {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                })
                .await;
            }
        }
    });
    report(
        "consume-feed",
        n,
        t0.elapsed().as_secs_f64(),
        cpu_seconds() - cpu0,
        serde_json::json!({"bytes": bytes, "consumer_properties": properties_json(a)}),
    );
    Ok(())
}

struct RelayCtx {
    hist: Histogram,
    delivered: AtomicU64,
}
impl ClientContext for RelayCtx {}
impl ProducerContext for RelayCtx {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, source_ts_ms: usize) {
        if r.is_ok() {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            let now = sluice_worker::sink::now_ms();
            self.hist
                .observe(((now - source_ts_ms as i64).max(0) as f64) / 1000.0);
        }
    }
}

/// (3) Bare relay: auto-commit, fire-and-forget produce. Runs until `count` records were
/// consumed and delivered, or (latency mode) for `seconds`.
fn relay(
    a: &Args,
    input: &str,
    output: &str,
    deadline: Option<Instant>,
    warmup_end: Option<Instant>,
) -> anyhow::Result<Measurement> {
    let c: BaseConsumer = consumer_client(a)
        .set("group.id", format!("bench-relay-{}", run_id()))
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let hist = Histogram::with_opts(
        HistogramOpts::new("relay_e2e", "e2e").buckets(LATENCY_BUCKETS.to_vec()),
    )?;
    let p: ThreadedProducer<RelayCtx> = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(RelayCtx {
            hist: hist.clone(),
            delivered: AtomicU64::new(0),
        })?;
    c.subscribe(&[input])?;
    let (mut cpu0, mut t0) = (cpu_seconds(), Instant::now());
    let mut n = 0u64;
    let mut base: Option<Vec<(f64, u64)>> = None;
    loop {
        let now = Instant::now();
        if deadline.map_or(n >= a.count, |d| now >= d) {
            break;
        }
        if base.is_none() && warmup_end.is_some_and(|w| now >= w) {
            base = Some(hist_buckets(&hist));
            (cpu0, t0, n) = (cpu_seconds(), now, 0);
        }
        if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
            if n == 0 && warmup_end.is_none() {
                (cpu0, t0) = (cpu_seconds(), Instant::now());
            }
            n += 1;
            let ts = m.timestamp().to_millis().unwrap_or(0).max(0) as usize;
            let mut rec =
                BaseRecord::with_opaque_to(output, ts).payload(m.payload().unwrap_or(&[]));
            if let Some(k) = m.key() {
                rec = rec.key(k);
            }
            let mut rec = rec;
            while let Err((_, back)) = p.send(rec) {
                rec = back;
                p.poll(Duration::from_millis(1));
            }
        }
    }
    p.flush(Duration::from_secs(60))?;
    let secs = t0.elapsed().as_secs_f64();
    let buckets = delta(&base.unwrap_or_default(), &hist_buckets(&hist));
    Ok((n, secs, cpu_seconds() - cpu0, buckets))
}

/// Cumulative buckets observed between two readings.
fn delta(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|&(b, c)| {
            let prev = before.iter().find(|x| x.0 == b).map_or(0, |x| x.1);
            (b, c - prev.min(c))
        })
        .collect()
}

fn sluice_config(a: &Args, input: &str, sink: &str) -> anyhow::Result<WorkerConfig> {
    // The `-eos` modes: exactly-once, which needs a dead-letter topic (nothing is written
    // there in a benchmark).
    let eos = if a.mode.ends_with("-eos") {
        format!(
            "deadLetter: {{topic: bench-dlq-{}}}\ndelivery: {{guarantee: exactly-once, transactionWindow: {}}}\n",
            run_id(),
            a.window
        )
    } else {
        String::new()
    };
    let format = match &a.registry {
        Some(url) => format!(", format: {{schemaRegistry: {{url: \"{url}\"}}}}"),
        None => String::new(),
    };
    Ok(WorkerConfig::from_yaml(&format!(
        r#"
pipeline: bench
source: {{bootstrapServers: "{}", topic: {input}, groupId: bench-sluice-{}, consumerProperties: {}{format}}}
sinks: [{sink}]
workers: {{perPartition: 2, queueCapacity: 8192, ordering: key}}
batching: {{maxMessages: 5000, maxBytes: 1MiB, linger: {}}}
server: {{listen: "127.0.0.1:0"}}
{eos}"#,
        a.bootstrap,
        run_id(),
        // JSON is YAML: the properties as a flow mapping.
        properties_json(a),
        a.linger
    ))?)
}

/// (2)/(4) The sluice pipeline in-process: until `count` delivered, or for `seconds`.
async fn sluice(
    a: &Args,
    input: &str,
    sink: &str,
    deadline: Option<Instant>,
    warmup_end: Option<Instant>,
) -> anyhow::Result<Measurement> {
    let config = sluice_config(a, input, sink)?;
    let rt = sluice_worker::Runtime::new(&config);
    let metrics = rt.metrics.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (mut cpu0, mut t0) = (cpu_seconds(), Instant::now());
    let h = tokio::spawn(sluice_worker::run_pipeline(
        config,
        Arc::new(sluice_worker::processor::Passthrough),
        rt,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut s;
    let mut base: Option<Snapshot> = None;
    let mut started = false;
    loop {
        s = Snapshot::take(&metrics);
        let now = Instant::now();
        if !started && warmup_end.is_none() && s.consumed > 0.0 {
            // Time from the first record: group join and metadata are not throughput.
            (cpu0, t0, started) = (cpu_seconds(), now, true);
            base = Some(s.clone());
        }
        if base.is_none() && warmup_end.is_some_and(|w| now >= w) {
            (cpu0, t0) = (cpu_seconds(), now);
            base = Some(s.clone());
        }
        if deadline.map_or(s.delivered as u64 >= a.count, |d| now >= d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let _ = stop_tx.send(());
    h.await?.context("pipeline")?;
    let base = base.unwrap_or_default();
    let n = (s.delivered - base.delivered) as u64;
    Ok((n, secs, cpu, delta(&base.e2e, &s.e2e)))
}

/// The jq program of the `engine-jq` mode (and the processing tests).
const JQ_PROGRAM: &str = r#"{seq, device: .deviceId, tempF: ((.tempC | tonumber) * 9 / 5 + 32)}"#;

/// (5) The in-memory engine on a current-thread runtime (one core), null sink.
async fn engine(a: &Args) -> anyhow::Result<()> {
    let processor: Arc<dyn sluice_worker::Processor> = if a.mode == "engine-jq" {
        Arc::new(sluice_worker::processor::Jq::compile(JQ_PROGRAM, false)?)
    } else {
        Arc::new(sluice_worker::processor::Passthrough)
    };
    use sluice_api::config::{BatchingConfig, Ordering as O, WorkersConfig};
    let m = sluice_worker::metrics::Metrics::new("engine-sink");
    let sink = Arc::new(sluice_worker::sink::null::NullSink::new(
        sluice_worker::sink::SinkMetrics::new(&m, "null"),
    ));
    let workers = WorkersConfig {
        per_partition: 2,
        queue_capacity: 8192,
        ordering: O::Key,
    };
    let mut e = sluice_worker::engine::Engine::new(
        "t",
        a.partitions,
        &workers,
        &BatchingConfig::default(),
        256 << 20,
        processor,
        vec![sink],
        sluice_worker::deadletter::DeadLetters::stall(&m),
    );
    let payload = Bytes::from(sluice_loadgen::payload(1, 100));
    let keys: Vec<Bytes> = (0..1000).map(|i| Bytes::from(format!("dev-{i}"))).collect();
    let topic: Arc<str> = "t".into();
    let per_partition = a.count / a.partitions as u64;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut offset = 0i64;
    while (offset as u64) < per_partition {
        for p in 0..a.partitions {
            let recs = (0..sluice_worker::engine::DISPATCH_BATCH as i64)
                .map(|i| sluice_worker::Record {
                    topic: topic.clone(),
                    partition: p,
                    offset: offset + i,
                    timestamp_ms: None,
                    key: Some(keys[((offset + i) % 1000) as usize].clone()),
                    value: Some(payload.clone()),
                    headers: Vec::new(),
                })
                .collect();
            e.feed(p as usize, recs).await;
        }
        offset += sluice_worker::engine::DISPATCH_BATCH as i64;
    }
    anyhow::ensure!(
        e.wait_idle(Duration::from_secs(60)).await,
        "engine did not drain"
    );
    let n = offset as u64 * a.partitions as u64;
    report(
        &a.mode,
        n,
        t0.elapsed().as_secs_f64(),
        cpu_seconds() - cpu0,
        serde_json::json!({}),
    );
    e.close().await;
    Ok(())
}

fn quantiles(buckets: &[(f64, u64)]) -> serde_json::Value {
    let q = |x| quantile_interpolated(buckets, x).map(|s| s * 1000.0);
    serde_json::json!({"p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999)})
}

fn hist_buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let m = prometheus::core::Collector::collect(h);
    m[0].get_metric()[0]
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .chain([(f64::INFINITY, h.get_sample_count())])
        .collect()
}

/// Wall-clock ms since the epoch (record timestamps use this clock).
fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Latency as a `read_committed` reader sees it (for the sluice modes: with exactly-once
/// an output becomes visible only when its transaction commits, after the sink's
/// acknowledgement the pipeline's own histogram measures). Reads `input` (each record's
/// timestamp, set by the generator) and `output` (when each sequence number became
/// readable) until `stop`; returns (p50, p99, p99.9) in ms over the records produced
/// between `from_ms` and `to_ms`.
fn visible_latency(
    bootstrap: &str,
    input: &str,
    output: &str,
    from_ms: i64,
    to_ms: i64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<serde_json::Value> {
    use std::collections::HashMap;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-visible-{}", run_id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in [input, output] {
        for p in 0..sluice_loadgen::partition_count(&c, t)? {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    let (mut produced, mut visible) = (HashMap::new(), HashMap::new());
    while !stop.load(Ordering::Acquire) {
        let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
            continue;
        };
        let Some(seq) = m.payload().and_then(sluice_loadgen::parse_seq) else {
            continue;
        };
        if m.topic() == input {
            if let Some(ts) = m.timestamp().to_millis() {
                produced.insert(seq, ts);
            }
        } else {
            visible.entry(seq).or_insert_with(epoch_ms);
        }
    }
    let mut lat: Vec<i64> = produced
        .iter()
        .filter(|(_, &p)| p >= from_ms && p < to_ms)
        .filter_map(|(q, &p)| visible.get(q).map(|&v| (v - p).max(0)))
        .collect();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
    };
    Ok(serde_json::json!({
        "visible_records": lat.len(),
        "visible_p50_ms": pct(0.5),
        "visible_p99_ms": pct(0.99),
        "visible_p999_ms": pct(0.999),
    }))
}

/// Offer `rate` records/s to a fresh topic for `seconds` while the relay under test runs.
async fn latency(a: &Args, which: &str) -> anyhow::Result<()> {
    let id = run_id();
    let (input, output) = (format!("lat-in-{id}"), format!("lat-out-{id}"));
    create_topic(&a.bootstrap, &input, a.partitions).await?;
    create_topic(&a.bootstrap, &output, a.partitions).await?;
    // The relay under test starts first and joins the group; the generator (a separate
    // process, pinned next to the broker, linger 1 ms) starts after 3 s; the first 4 s of
    // load are warm-up and not measured.
    let start = Instant::now();
    let warmup_end = start + Duration::from_secs(7);
    let deadline = warmup_end + Duration::from_secs(a.seconds);
    let count = (a.rate * (a.seconds as f64 + 6.0)) as u64;
    let loadgen = std::env::current_exe()?.with_file_name("sluice-loadgen");
    let gen_cpus = std::env::var("SLUICE_BENCH_GEN_CPUS").unwrap_or_else(|_| "0".into());
    let gen_cmd = {
        let mut c = std::process::Command::new("taskset");
        c.arg("-c")
            .arg(&gen_cpus)
            .arg(&loadgen)
            .arg("--bootstrap")
            .arg(&a.bootstrap)
            .args([
                "produce",
                "--topic",
                &input,
                "--count",
                &count.to_string(),
                "--rate",
                &a.rate.to_string(),
                "--linger-ms",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let gen = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let mut gen_cmd = gen_cmd;
        gen_cmd.status()
    });
    let mode = format!("latency-{which}");
    let extra = |q: serde_json::Value| {
        let mut q = q;
        q["offered_rate"] = serde_json::json!(a.rate);
        q["linger"] = serde_json::json!(if which == "relay" {
            "producer 2ms".to_string()
        } else if which == "sluice-eos" {
            format!(
                "batch {}, producer {}ms, transaction window {}",
                a.linger, a.producer_linger_ms, a.window
            )
        } else {
            format!("batch {}, producer {}ms", a.linger, a.producer_linger_ms)
        });
        q
    };
    // With --visible (always for exactly-once), also as a read_committed reader sees them.
    let stop_reader = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = (which == "sluice-eos" || (a.visible && which != "relay")).then(|| {
        let (b, i, o, stop) = (
            a.bootstrap.clone(),
            input.clone(),
            output.clone(),
            stop_reader.clone(),
        );
        let from_ms = epoch_ms()
            + warmup_end
                .saturating_duration_since(Instant::now())
                .as_millis() as i64;
        let to_ms = epoch_ms()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as i64;
        std::thread::spawn(move || visible_latency(&b, &i, &o, from_ms, to_ms, stop))
    });
    let (n, secs, cpu, buckets) = if which == "relay" {
        let (a2, i, o) = (clone_args(a), input.clone(), output.clone());
        tokio::task::spawn_blocking(move || relay(&a2, &i, &o, Some(deadline), Some(warmup_end)))
            .await??
    } else {
        let sink = format!(
            "{{kafka: {{topic: {output}, producerProperties: {{linger.ms: \"{}\"}}}}}}",
            a.producer_linger_ms
        );
        sluice(a, &input, &sink, Some(deadline), Some(warmup_end)).await?
    };
    let mut q = quantiles(&buckets);
    if let Some(r) = reader {
        // Time for the last window's outputs to become readable.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop_reader.store(true, Ordering::Release);
        let v = r
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
        if let (Some(o), serde_json::Value::Object(e)) = (q.as_object_mut(), v) {
            o.extend(e);
        }
    }
    report(&mode, n, secs, cpu, extra(q));
    let _ = gen.join();
    Ok(())
}

/// (6) The postgres sink alone: `count` rows into a fresh table, in batches of `batch`.
async fn postgres(a: &Args, batch: usize) -> anyhow::Result<()> {
    use sluice_worker::record::{Origin, Output};
    use sluice_worker::sink::{Sink, SinkBatch, SinkMetrics};
    let url = std::env::var("SLUICE_POSTGRES_URL")
        .context("SLUICE_POSTGRES_URL must hold the benchmark database's connection string")?;
    let table = format!("bench_{}", run_id().replace('-', "_"));
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (seq bigint PRIMARY KEY, device text NOT NULL, temp_f double precision)"
        ))
        .await?;
    let config: sluice_api::config::PostgresSinkConfig =
        serde_json::from_value(serde_json::json!({
            "table": table,
            "columns": [{"name": "seq"}, {"name": "device"}, {"name": "temp_f", "field": "tempF"}],
        }))?;
    let m = sluice_worker::metrics::Metrics::new("bench-pg");
    let sink = sluice_worker::sink::postgres::PostgresSink::connect(
        &config,
        sluice_worker::retry::RetryPolicy::from(&sluice_api::config::RetryConfig::default()),
        SinkMetrics::new(&m, "postgres"),
        sluice_worker::deadletter::DeadLetters::stall(&m),
    )
    .await?;
    let rows: Vec<(Output, Origin)> = (0..a.count)
        .map(|i| {
            let v = format!(
                r#"{{"seq":{i},"device":"dev-{}","tempF":{}}}"#,
                i % 1000,
                (i % 400) as f64 / 10.0 * 1.8 + 32.0
            );
            (
                Output {
                    key: None,
                    value: Some(Bytes::from(v)),
                    headers: Vec::new(),
                },
                Origin::default(),
            )
        })
        .collect();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut it = rows.into_iter().peekable();
    while it.peek().is_some() {
        let items: Vec<_> = it.by_ref().take(batch).collect();
        sink.deliver(SinkBatch {
            bytes: 0,
            items,
            tokens: Vec::new(),
            created: std::time::Instant::now(),
        })
        .await;
    }
    anyhow::ensure!(
        sink.flush(Duration::from_secs(600)).await,
        "postgres sink did not finish"
    );
    let secs = t0.elapsed().as_secs_f64();
    let stored: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    anyhow::ensure!(
        stored as u64 == a.count,
        "stored {stored} of {} rows",
        a.count
    );
    client.batch_execute(&format!("DROP TABLE {table}")).await?;
    report(
        &a.mode,
        a.count,
        secs,
        cpu_seconds() - cpu0,
        serde_json::json!({"batch": batch}),
    );
    Ok(())
}

fn clone_args(a: &Args) -> Args {
    Args {
        mode: a.mode.clone(),
        bootstrap: a.bootstrap.clone(),
        topic: a.topic.clone(),
        count: a.count,
        partitions: a.partitions,
        rate: a.rate,
        seconds: a.seconds,
        linger: a.linger.clone(),
        producer_linger_ms: a.producer_linger_ms,
        window: a.window.clone(),
        consumer_properties: a.consumer_properties.clone(),
        visible: a.visible,
        registry: a.registry.clone(),
        http_url: a.http_url.clone(),
        listen: a.listen.clone(),
        print: a.print,
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.mode == "engine" || a.mode == "engine-jq" {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(engine(&a));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match a.mode.as_str() {
            "preload" => {
                create_topic(&a.bootstrap, &a.topic, a.partitions).await?;
                let spec = ProduceSpec {
                    bootstrap: a.bootstrap.clone(),
                    topic: a.topic.clone(),
                    from: 0,
                    count: a.count,
                    rate: None,
                    size: 100,
                    linger_ms: 5,
                };
                tokio::task::spawn_blocking(move || produce(&spec, &AtomicU64::new(0))).await??;
                Ok(())
            }
            "consume" => {
                let a2 = clone_args(&a);
                tokio::task::spawn_blocking(move || consume(&a2)).await?
            }
            "consume-feed" => {
                let a2 = clone_args(&a);
                tokio::task::spawn_blocking(move || batch_consume(&a2)).await?
            }
            "relay" => {
                let out = format!("bench-out-{}", run_id());
                create_topic(&a.bootstrap, &out, a.partitions).await?;
                let (a2, t) = (clone_args(&a), a.topic.clone());
                let (n, secs, cpu, _) =
                    tokio::task::spawn_blocking(move || relay(&a2, &t, &out, None, None)).await??;
                report("relay", n, secs, cpu, serde_json::json!({}));
                Ok(())
            }
            "sluice-null" => {
                let (n, secs, cpu, _) = sluice(&a, &a.topic, "{null: {}}", None, None).await?;
                let mode = if a.registry.is_some() {
                    "sluice-null-avro"
                } else {
                    "sluice-null"
                };
                report(mode, n, secs, cpu, serde_json::json!({}));
                Ok(())
            }
            "sluice-http" => {
                let sink = format!(
                    "{{http: {{url: \"{}\", batch: {{as: array}}, maxInFlight: 4}}}}",
                    a.http_url
                );
                let (n, secs, cpu, _) = sluice(&a, &a.topic, &sink, None, None).await?;
                let mode = if a.registry.is_some() {
                    "sluice-http-avro"
                } else {
                    "sluice-http-json"
                };
                report(mode, n, secs, cpu, serde_json::json!({}));
                Ok(())
            }
            "preload-avro" => preload_avro(&a).await,
            "http-receiver" => http_receiver(&a).await,
            "sluice-relay" | "sluice-relay-eos" => {
                let out = format!("bench-out-{}", run_id());
                create_topic(&a.bootstrap, &out, a.partitions).await?;
                let (n, secs, cpu, _) = sluice(
                    &a,
                    &a.topic,
                    &format!("{{kafka: {{topic: {out}}}}}"),
                    None,
                    None,
                )
                .await?;
                let extra = if a.mode.ends_with("-eos") {
                    serde_json::json!({"window": a.window})
                } else {
                    serde_json::json!({})
                };
                report(&a.mode, n, secs, cpu, extra);
                Ok(())
            }
            "sluice-fanout" => {
                let (o1, o2) = (
                    format!("bench-out-{}", run_id()),
                    format!("bench-out2-{}", run_id()),
                );
                create_topic(&a.bootstrap, &o1, a.partitions).await?;
                create_topic(&a.bootstrap, &o2, a.partitions).await?;
                let sinks = format!("{{kafka: {{topic: {o1}}}}}, {{kafka: {{topic: {o2}}}}}");
                let (n, secs, cpu, _) = sluice(&a, &a.topic, &sinks, None, None).await?;
                report(
                    "sluice-fanout",
                    n,
                    secs,
                    cpu,
                    serde_json::json!({"sinks": 2}),
                );
                Ok(())
            }
            "pg-batched" => postgres(&a, 5000).await,
            "pg-rows" => postgres(&a, 1).await,
            "latency-relay" => latency(&a, "relay").await,
            "latency-sluice" => latency(&a, "sluice").await,
            "latency-sluice-eos" => latency(&a, "sluice-eos").await,
            m => anyhow::bail!("unknown mode {m}"),
        }
    })
}
