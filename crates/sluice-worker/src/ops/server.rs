//! The HTTP server: `/metrics` (Prometheus text), `/healthz` and `/readyz` (the rules
//! are [`Health`]'s).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::ops::health::Health;
use crate::ops::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    health_log: Arc<crate::ops::throttle::LogThrottle>,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.verdict() {
        Ok(()) => {
            s.metrics.healthy.set(1);
            (StatusCode::OK, "ok\n".to_string())
        }
        Err(why) => {
            s.metrics.healthy.set(0);
            if let Some(n) = s.health_log.tick() {
                tracing::error!(reason = %why, probes = n, "/healthz fails: the worker is not making progress");
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            )
        }
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Acquire) && !s.health.failed.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Bind `addr` and serve until the process ends. Returns the bound address (port 0 picks
/// a free one).
pub async fn serve(
    addr: &str,
    metrics: Metrics,
    health: Arc<Health>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health,
            health_log: Arc::new(crate::ops::throttle::LogThrottle::new(Duration::from_secs(
                10,
            ))),
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}
