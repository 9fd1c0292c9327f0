//! `sluice-loadgen`: produce sequence-numbered records, audit a topic, or run the demo.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_api::WorkerConfig;
use sluice_loadgen::{audit, create_topic, offsets, produce, ProduceSpec};
use sluice_worker::progress::Snapshot;

#[derive(Parser)]
#[command(
    name = "sluice-loadgen",
    about = "Load generator, auditor and local demo for sluice"
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "SLUICE_BOOTSTRAP",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Produce sequence-numbered JSON records.
    Produce {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Records per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Create the topic with this many partitions first.
        #[arg(long)]
        partitions: Option<i32>,
        /// The producer's linger.ms (lower it when measuring latency).
        #[arg(long, default_value_t = 5)]
        linger_ms: u32,
    },
    /// Read a topic and check that every sequence number arrived.
    Verify {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value = "60s")]
        timeout: humantime_arg::Dur,
    },
    /// Run a real pipeline against the broker with the generator and a live progress line.
    Demo {
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Records per second offered by the generator.
        #[arg(long, default_value_t = 100_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Metrics and health address of the in-process worker.
        #[arg(long, default_value = "127.0.0.1:9095")]
        listen: String,
    },
}

mod humantime_arg {
    /// A duration argument such as `30s`.
    #[derive(Clone, Debug)]
    pub struct Dur(pub std::time::Duration);
    impl std::str::FromStr for Dur {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let n: u64 = n.parse().map_err(|_| format!("bad duration {s}"))?;
            match unit {
                "s" | "" => Ok(Dur(std::time::Duration::from_secs(n))),
                "m" => Ok(Dur(std::time::Duration::from_secs(n * 60))),
                "ms" => Ok(Dur(std::time::Duration::from_millis(n))),
                _ => Err(format!("bad duration unit in {s}; use ms, s or m")),
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    if std::env::var("SLUICE_LOG_FORMAT").is_err() {
        std::env::set_var("SLUICE_LOG_FORMAT", "text");
    }
    if std::env::var("SLUICE_LOG").is_err() {
        std::env::set_var("SLUICE_LOG", "warn,sluice_worker=info");
    }
    sluice_worker::init_logging();
    match cli.cmd {
        Cmd::Produce {
            topic,
            count,
            from,
            rate,
            size,
            partitions,
            linger_ms,
        } => {
            if let Some(p) = partitions {
                create_topic(&cli.bootstrap, &topic, p).await?;
            }
            let spec = ProduceSpec {
                bootstrap: cli.bootstrap,
                topic,
                from,
                count,
                rate: (rate > 0.0).then_some(rate),
                size,
                linger_ms,
            };
            let sent = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let s2 = sent.clone();
            tokio::task::spawn_blocking(move || produce(&spec, &s2)).await??;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "produced {} records in {secs:.2}s ({:.0}/s)",
                sent.load(Ordering::Relaxed),
                sent.load(Ordering::Relaxed) as f64 / secs
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Verify {
            topic,
            count,
            from,
            timeout,
        } => {
            let b = cli.bootstrap.clone();
            let r = tokio::task::spawn_blocking(move || audit(&b, &topic, from, count, timeout.0))
                .await??;
            println!("{r}");
            Ok(if r.complete() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Cmd::Demo {
            count,
            rate,
            partitions,
            size,
            listen,
        } => demo(&cli.bootstrap, count, rate, partitions, size, &listen).await,
    }
}

async fn demo(
    bootstrap: &str,
    count: u64,
    rate: f64,
    partitions: i32,
    size: usize,
    listen: &str,
) -> anyhow::Result<std::process::ExitCode> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (input, output, group) = (
        format!("demo-in-{run}"),
        format!("demo-out-{run}"),
        format!("demo-{run}"),
    );
    eprintln!(
        "[demo] broker {bootstrap}; topics {input} -> {output} ({partitions} partitions each)"
    );
    create_topic(bootstrap, &input, partitions).await?;
    create_topic(bootstrap, &output, partitions).await?;
    let config = WorkerConfig::from_yaml(&format!(
        r#"
pipeline: demo
source: {{bootstrapServers: "{bootstrap}", topic: {input}, groupId: {group}}}
processor: {{passthrough: {{}}}}
sinks: [{{kafka: {{topic: {output}}}}}]
workers: {{perPartition: 4, queueCapacity: 8192, ordering: key}}
batching: {{maxMessages: 5000, maxBytes: 1MiB, linger: 5ms}}
server: {{listen: "{listen}"}}
"#
    ))
    .context("demo configuration")?;
    let rt = sluice_worker::Runtime::new(&config);
    let addr =
        sluice_worker::server::serve(&config.server.listen, rt.metrics.clone(), rt.health.clone())
            .await
            .with_context(|| format!("cannot listen on {listen}; pass --listen 127.0.0.1:0"))?;
    eprintln!("[demo] worker metrics at http://{addr}/metrics (health: /healthz, /readyz)");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = rt.metrics.clone();
    let pipeline = tokio::spawn(sluice_worker::run_pipeline(
        config,
        Arc::new(sluice_worker::processor::Passthrough),
        rt,
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Generate once the worker owns every partition, so the first seconds' latency is the
    // pipeline's, not the time the group took to form.
    let joined = Instant::now();
    loop {
        let assigned = metrics.assigned_partitions.get();
        if assigned >= i64::from(partitions) {
            break;
        }
        if pipeline.is_finished() {
            pipeline.await?.context("pipeline")?;
            anyhow::bail!("the pipeline stopped before it joined its group");
        }
        if joined.elapsed() > Duration::from_secs(120) {
            anyhow::bail!(
                "the worker holds {assigned} of {partitions} partitions after 120 s; is the broker at {bootstrap} healthy?"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[demo] worker joined its group in {:.1}s; generating {count} records of ~{size} bytes at {rate:.0}/s",
        joined.elapsed().as_secs_f64()
    );
    eprintln!("[demo] lag: written to the input, not yet consumed; uncommitted: written, offset not yet committed");
    let sent = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(sluice_worker::progress::report(
        metrics.clone(),
        Duration::from_secs(1),
        sluice_worker::progress::Input::Counted(sent.clone()),
    ));
    let spec = ProduceSpec {
        bootstrap: bootstrap.into(),
        topic: input.clone(),
        from: 0,
        count,
        rate: Some(rate),
        size,
        linger_ms: 5,
    };
    let s2 = sent.clone();
    let started = Instant::now();
    let gen = tokio::task::spawn_blocking(move || produce(&spec, &s2));
    gen.await??;
    eprintln!(
        "[demo] generator done: {count} records in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Wait for the pipeline to deliver everything.
    let deadline = Instant::now() + Duration::from_secs(120 + count / 10_000);
    loop {
        let s = Snapshot::take(&metrics);
        if s.delivered as u64 >= count {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "[demo] timed out waiting for delivery ({} of {count})",
                s.delivered
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    let _ = stop_tx.send(());
    pipeline.await?.context("pipeline")?;
    eprintln!("[demo] pipeline drained and committed; auditing {output}");
    let (b, o) = (bootstrap.to_string(), output.clone());
    let report =
        tokio::task::spawn_blocking(move || audit(&b, &o, 0, count, Duration::from_secs(60)))
            .await??;
    let (b, g, i) = (bootstrap.to_string(), group.clone(), input.clone());
    let offs =
        tokio::task::spawn_blocking(move || offsets::committed_and_end(&b, &g, &i)).await??;
    let behind: i64 = offs.iter().map(|(c, hi)| hi - c.unwrap_or(0)).sum();
    println!();
    println!("sluice demo summary");
    println!("  records produced     {count}");
    println!(
        "  wall time            {elapsed:.1}s ({:.0} records/s end to end)",
        count as f64 / elapsed
    );
    println!("  output audit         {report}");
    println!(
        "  committed vs end     {} partitions, {behind} records uncommitted",
        offs.len()
    );
    let ok = report.complete() && behind == 0;
    println!(
        "  result               {}",
        if ok {
            "OK: every sequence number arrived, offsets fully committed"
        } else {
            "FAILED"
        }
    );
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
