//! sluice-worker: the data path of a sluice pipeline.
//!
//! ```text
//! consumer (one per process, group member)             (kafka/consumer.rs)
//!   -> one queue per assigned partition, split in the rebalance callback
//!   -> dispatcher per partition         (kafka/dispatcher.rs, engine/dispatch.rs)  batches of <= 512
//!   -> worker lanes per partition       (engine/lanes.rs, engine/pool.rs)  processor runs here
//!   -> one batcher per sink             (engine/batcher.rs)  count / bytes / linger
//!   -> sink acknowledges the batch      (sink/)
//!   -> offset tracker marks ranges done (engine/offsets.rs, engine/ack.rs)
//!   -> the delivery guarantee commits   (delivery/: at-least-once's committer, or
//!                                        exactly-once's transaction per window)
//! ```
//!
//! The coordinator (`coordinator.rs`) owns the assigned partitions (`kafka/assignment.rs`)
//! and the delivery guarantee; `pipeline.rs` wires it all; `ops/` holds the liveness
//! rules, the HTTP server and the metrics.
//!
//! To run custom processing logic, implement [`processor::Processor`] and call [`run`]
//! from your own `main`:
//!
//! ```no_run
//! use std::sync::Arc;
//! use sluice_worker::{Output, ProcessError, Processor, Record};
//!
//! struct Upper;
//! impl Processor for Upper {
//!     fn name(&self) -> &'static str { "upper" }
//!     fn process(&self, r: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
//!         let v = r.value.as_deref().unwrap_or_default().to_ascii_uppercase();
//!         out.push(Output { key: r.key.clone(), value: Some(v.into()), headers: r.headers.clone() });
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // with `processor: {custom: {name: upper}}` in the configuration
//!     sluice_worker::run(Some(Arc::new(Upper)))
//! }
//! ```

/// With the opt-in `mimalloc` feature, the process's allocator: mimalloc, for Rust and
/// (its `override`) for librdkafka's C allocations alike. glibc's allocation and the frees
/// on other threads (librdkafka allocates a record's op on its broker thread, the
/// dispatcher frees it) are about a sixth of the worker's instructions per record with
/// it off (BENCHMARKS.md, "Where the CPU goes"). It is off by default because mimalloc's
/// per-thread heaps keep freed memory: with 64 partitions and a stalled sink the worker's
/// RSS went to 105-161 MiB against the 100 MiB its memory bound states (glibc: within it).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod clock;
pub mod coordinator;
pub mod deadletter;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod format;
pub mod kafka;
pub mod ops;
pub mod pipeline;
pub mod processor;
pub mod record;
pub mod retry;
pub mod sink;

// The operating side keeps its old paths (`sluice_worker::metrics`, `::progress`, `::server`).
pub use ops::{metrics, progress, server};

/// Cases per fuzzing property: `default` in `cargo test` (CI), more with
/// `PROPTEST_CASES=N` for a longer run (`make fuzz`).
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_api::config::ProcessorConfig;
use sluice_api::WorkerConfig;

pub use pipeline::{run_pipeline, Runtime};
pub use processor::{ProcessError, Processor};
pub use record::{Output, Record};

/// Command-line interface of a worker binary.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-worker",
    version,
    about = "Run a sluice pipeline: consume, process, deliver in batches, commit."
)]
pub struct Cli {
    /// The worker configuration (YAML). `SLUICE__…` environment variables override fields.
    #[arg(
        long,
        short,
        env = "SLUICE_CONFIG",
        default_value = "/etc/sluice/config.yaml"
    )]
    pub config: PathBuf,
    /// Print a live progress line to stderr every second.
    #[arg(long, env = "SLUICE_PROGRESS")]
    pub progress: bool,
    /// Check the configuration (compiling a jq program too), print it with defaults
    /// filled in, and exit.
    #[arg(long)]
    pub check: bool,
}

/// Set up logging: JSON lines by default (`SLUICE_LOG_FORMAT=text` for people), level
/// from `SLUICE_LOG` or `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("SLUICE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    // Colour only on a terminal: piped or collected logs get no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let text = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "text");
    let _ = if text {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}

/// Read and validate the configuration file with environment overrides.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<WorkerConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    Ok(WorkerConfig::from_yaml_with_env(&text, std::env::vars())?)
}

/// Resolves once SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Pick the processor named by the configuration. `custom` is what a custom binary
/// passed to [`run`].
pub fn select_processor(
    config: &ProcessorConfig,
    custom: Option<Arc<dyn Processor>>,
) -> anyhow::Result<Arc<dyn Processor>> {
    match (config, custom) {
        (ProcessorConfig::Passthrough {}, _) => Ok(Arc::new(processor::Passthrough)),
        (ProcessorConfig::Delay { per_record }, _) => Ok(Arc::new(processor::Delay(per_record.0))),
        (ProcessorConfig::Jq { program, envelope }, _) => {
            Ok(Arc::new(processor::Jq::compile(program, *envelope)?))
        }
        (ProcessorConfig::Custom { name }, Some(p)) if p.name() == name => Ok(p),
        (ProcessorConfig::Custom { name }, Some(p)) => anyhow::bail!(
            "processor.custom.name is `{name}` but this binary provides `{}`",
            p.name()
        ),
        (ProcessorConfig::Custom { name }, None) => anyhow::bail!(
            "processor.custom.name is `{name}` but this is the stock worker binary; build one with sluice_worker::run(your_processor)"
        ),
    }
}

/// The whole worker process: parse the CLI, load the config, serve metrics and health,
/// run the pipeline until SIGTERM, drain, commit, and return the exit code.
///
/// A custom worker binary is `fn main() -> std::process::ExitCode { sluice_worker::run(Some(Arc::new(MyProcessor))) }`.
pub fn run(custom: Option<Arc<dyn Processor>>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let cli = Cli::parse();
    init_logging();
    let config = match load_config(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let processor = match select_processor(&config.processor, custom) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sluice-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    // After the processor, so `--check` also compiles a jq program.
    if cli.check {
        print!("{}", config.to_yaml());
        return ExitCode::SUCCESS;
    }
    let tokio_rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = tokio_rt.block_on(async move {
        let rt = Runtime::new(&config);
        match server::serve(&config.server.listen, rt.metrics.clone(), rt.health.clone()).await {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /healthz and /readyz"),
            Err(e) => {
                eprintln!(
                    "sluice-worker: cannot listen on {}: {e}",
                    config.server.listen
                );
                return ExitCode::FAILURE;
            }
        }
        let progress = cli.progress.then(|| {
            tokio::spawn(progress::report(
                rt.metrics.clone(),
                Duration::from_secs(1),
                progress::Input::Metrics,
            ))
        });
        // One signal for every run: the pipeline is run again in this process when the
        // input topic grew past what its consumer was sized for (`PipelineError::Resize`).
        use futures::FutureExt;
        let shutdown = Box::pin(shutdown_signal()).shared();
        let res = loop {
            let res = run_pipeline(
                config.clone(),
                processor.clone(),
                rt.clone(),
                shutdown.clone(),
            )
            .await;
            match res {
                // Asked to stop meanwhile: no second run.
                Err(e) if e.is_resize() && shutdown.clone().now_or_never().is_none() => continue,
                Err(e) if e.is_resize() => break Ok(()),
                res => break res,
            }
        };
        if let Some(p) = progress {
            p.abort();
        }
        match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "pipeline failed");
                ExitCode::FAILURE
            }
        }
    });
    // Dropping a runtime waits for every blocking task, and a librdkafka call that never
    // returns (a commit left unanswered: it cannot be cancelled) would keep the process
    // alive after the pipeline stopped, until the kubelet's SIGKILL. What it held is
    // uncommitted and is redelivered.
    tokio_rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}
