//! The sluice controller binary.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use clap::Parser;
use sluice_controller::controller::{run_in, ApiLimits, Context, RdKafka};
use sluice_controller::lease::{acquire, LeaseConfig};

#[derive(Parser)]
#[command(
    name = "sluice-controller",
    version,
    about = "Reconciles StreamPipelines into worker Deployments and scales them on consumer lag"
)]
struct Cli {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: String,
    /// Worker image for pipelines that do not set spec.image.
    #[arg(long, env = "SLUICE_WORKER_IMAGE", default_value = concat!("ghcr.io/sluice-dev/sluice-worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// Take a Lease before acting, so only one replica reconciles.
    #[arg(long, env = "SLUICE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The controller's own namespace: the Lease's, and the Secret that keys the digests of
    /// the pipelines' Secrets (`sluice-digest-key`, created on first use).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    lease_namespace: String,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Requests per second to the Kubernetes API (watches aside), sustained.
    #[arg(long, env = "SLUICE_CONTROLLER_API_QPS", default_value_t = ApiLimits::default().qps)]
    api_qps: f64,
    /// Requests to the Kubernetes API allowed at once after a quiet time.
    #[arg(long, env = "SLUICE_CONTROLLER_API_BURST", default_value_t = ApiLimits::default().burst)]
    api_burst: f64,
    /// The Kafka clusters' `offsets.retention.minutes`: how long a group without members
    /// keeps its committed offsets. A pipeline at zero workers (idle or paused) for three
    /// quarters of it gets `OffsetsExpiring=True` and a Warning Event.
    #[arg(long, env = "SLUICE_OFFSETS_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    offsets_retention: Duration,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "sluice-controller-local")]
    identity: String,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info,kube=warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "text") {
        b.init();
    } else {
        b.json().flatten_event(true).init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let limits = ApiLimits {
        qps: cli.api_qps.max(1.0),
        burst: cli.api_burst.max(1.0),
    };
    let ctx = Context::with_limits(
        client.clone(),
        Arc::new(RdKafka),
        cli.worker_image.clone(),
        limits,
        cli.lease_namespace.clone(),
    );
    ctx.set_offsets_retention(cli.offsets_retention);
    let registry = ctx.metrics.registry.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut buf = String::new();
                    let _ =
                        prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut buf);
                    buf
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }));
    let listener = tokio::net::TcpListener::bind(&cli.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cli.metrics_addr))?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(addr = %cli.metrics_addr, image = %cli.worker_image, "sluice-controller starting");
    // The controller stops on SIGTERM or SIGINT by itself; whatever its watches are doing
    // (retrying an unreachable API server, say), it gets a few seconds, then the process
    // exits anyway: one signal is enough.
    let run = run_in(ctx, cli.watch_namespace.as_deref());
    tokio::pin!(run);
    let stop = async {
        tokio::select! {
            _ = &mut run => return,
            _ = shutdown_signal() => {}
        }
        tracing::info!("shutting down");
        if tokio::time::timeout(Duration::from_secs(3), &mut run)
            .await
            .is_err()
        {
            tracing::warn!("the controller did not stop within 3s; exiting anyway");
        }
    };
    if cli.leader_election {
        let lease = acquire(
            client,
            LeaseConfig {
                name: "sluice-controller".into(),
                namespace: cli.lease_namespace,
                identity: cli.identity,
                duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            },
        );
        tokio::pin!(lease);
        // Waiting for the lease is interruptible too.
        let mut guard = tokio::select! {
            g = &mut lease => g,
            _ = shutdown_signal() => return Ok(()),
        };
        tokio::select! {
            _ = stop => {}
            _ = guard.lost() => anyhow::bail!("lost leadership; exiting so another replica takes over"),
        }
    } else {
        stop.await;
    }
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
