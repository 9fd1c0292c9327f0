//! The `http` sink: outputs delivered to an HTTP endpoint (a webhook, a microservice).
//!
//! A batch becomes one request (`batch.as: array`, a JSON array of the output values, or
//! `lines`, one value per line) or one request per output (`onePerRequest`, the body the
//! value as it is). Delivered means a 2xx answer. Connections are pooled and kept alive
//! (hyper's client, rustls for `https://`).
//!
//! Errors: no connection, a timeout, `408`, `425`, `429` and every `5xx` are transient: the
//! request is sent again with the pipeline's retry policy, waiting at least what a
//! `Retry-After` header asks, and meanwhile the batch holds its slot so backpressure
//! reaches the consumer. Any other answer (`4xx`, a redirect, which is never followed) is
//! permanent: a batch is bisected until the outputs the endpoint refuses are found, and
//! those go to the dead-letter path with the status and the start of the answer's body;
//! every other output is delivered. An output that cannot be put in the body (not JSON for
//! `array`, a line break for `lines`) is dead-lettered before any request.
//!
//! Every request carries the idempotency header (`Idempotency-Key` by default) naming
//! its source records, so a receiver can drop a redelivery after a restart:
//! `topic/partition/offset` for one output (`offset.n` for the n-th further output of the
//! same record: each output's own, however it is batched), and for a batch
//! `topic/partition/first-last` for each source partition in it, in the order they first
//! appear.
//!
//! Order: with `workers.ordering` `key` or `partition`, a batch is sent only once the one
//! before it is delivered (or dead-lettered), and `onePerRequest` sends the outputs of one
//! source partition one after the other (partitions side by side, at most `maxInFlight`
//! requests at once). With `unordered`, up to `maxInFlight` requests run at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use sluice_api::config::{HttpBatchAs, HttpMethod, HttpSinkConfig, Ordering};
use tokio::sync::Semaphore;

use super::tls::{chain, HttpClient, TlsError};
use super::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::deadletter::DeadLetters;
use crate::record::Origin;
use crate::retry::RetryPolicy;

/// How much of an answer's body is read (the rest is dropped with the connection).
const BODY_LIMIT: usize = 64 << 10;
/// How much of a refusal's body goes into the dead letter's message and the log.
const BODY_START: usize = 256;

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// A header's `valueEnv` variable is missing.
    #[error("http sink: the environment variable {env} (headers[{index}].valueEnv) is not set; it must hold the value of header {name}")]
    MissingEnv {
        /// The variable.
        env: String,
        /// The header.
        name: String,
        /// The header's index in `headers`.
        index: usize,
    },
    /// A header's name or value cannot be sent.
    #[error("http sink: header {name}: {message}")]
    BadHeader {
        /// The header.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The URL does not parse.
    #[error("http sink: url {url}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// No TLS configuration for an `https://` URL.
    #[error("http sink: {0}")]
    Tls(#[from] TlsError),
}

/// What one request came to.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A 2xx.
    Delivered,
    /// Worth sending again: no connection, a timeout, 408, 425, 429, 5xx.
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The endpoint refuses it for good.
    Permanent {
        class: &'static str,
        message: String,
    },
}

/// Classify an answer by its status; `body` is (the start of) the answer's body.
fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Answer {
    if status.is_success() {
        return Answer::Delivered;
    }
    let message = describe(status, body);
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Answer::Transient {
            message,
            retry_after,
        },
        // The endpoint refuses every request, whatever it carries (a redirect, a token
        // that expired, a wrong path): no output is at fault, so none is dead-lettered for
        // it until `retry.maxElapsed` runs out; the log says what to fix.
        300..=399 => Answer::Transient {
            message: format!(
                "{message} (redirects are not followed: point url at the final address)"
            ),
            retry_after,
        },
        401 | 403 | 404 | 405 | 407 | 421 | 426 => Answer::Transient {
            message: format!("{message} (the endpoint refuses the request itself: check url, method and headers)"),
            retry_after,
        },
        _ => Answer::Permanent {
            class: "http_rejected",
            message,
        },
    }
}

/// `HTTP 400 Bad Request: <the body's start>`, on one line.
fn describe(status: StatusCode, body: &[u8]) -> String {
    let mut start = String::from_utf8_lossy(&body[..body.len().min(BODY_START)])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if body.len() > BODY_START {
        start.push_str(" ...");
    }
    let reason = status.canonical_reason().unwrap_or("");
    if start.is_empty() {
        format!("HTTP {} {reason}", status.as_u16())
    } else {
        format!("HTTP {} {reason}: {start}", status.as_u16())
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (the wait until then).
fn retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let v = v.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// One output's part of a body, or why it cannot be one. A tombstone is `null` in a
/// batch body and an empty body on its own.
fn encode(mode: HttpBatchAs, value: Option<&Bytes>) -> Result<Bytes, SinkFailure> {
    let refuse = |class: &'static str, message: String| SinkFailure {
        class,
        message,
        attempts: 0,
    };
    match (mode, value) {
        (HttpBatchAs::OnePerRequest, v) => Ok(v.cloned().unwrap_or_default()),
        (_, None) => Ok(Bytes::from_static(b"null")),
        (HttpBatchAs::Array, Some(v)) => match serde_json::from_slice::<serde::de::IgnoredAny>(v) {
            Ok(_) => Ok(v.clone()),
            Err(e) => Err(refuse(
                "not_json",
                format!("batch.as array needs JSON output values: {e}"),
            )),
        },
        (HttpBatchAs::Lines, Some(v)) => match v.iter().position(|&b| b == b'\n') {
            None => Ok(v.clone()),
            Some(at) => Err(refuse(
                "not_one_line",
                format!(
                    "batch.as lines needs output values without a line break (one at byte {at})"
                ),
            )),
        },
    }
}

/// The body of a request carrying `parts` (one part for `onePerRequest`).
fn body(mode: HttpBatchAs, parts: &[&Bytes]) -> Bytes {
    match mode {
        HttpBatchAs::OnePerRequest => parts.first().map(|b| (*b).clone()).unwrap_or_default(),
        HttpBatchAs::Array => {
            let len = parts.iter().map(|p| p.len() + 1).sum::<usize>() + 2;
            let mut out = BytesMut::with_capacity(len);
            out.put_u8(b'[');
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.put_slice(p);
            }
            out.put_u8(b']');
            out.freeze()
        }
        HttpBatchAs::Lines => {
            let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
            let mut out = BytesMut::with_capacity(len);
            for p in parts {
                out.put_slice(p);
                out.put_u8(b'\n');
            }
            out.freeze()
        }
    }
}

/// Where an output stands in its source partition: the record's offset, then which of the
/// record's outputs it is. Written `offset` for a record's first output, `offset.n` for its
/// n-th further one.
fn position(o: &Origin) -> String {
    if o.output == 0 {
        o.offset.to_string()
    } else {
        format!("{}.{}", o.offset, o.output)
    }
}

/// The idempotency key of one output: `topic/partition/offset` (`offset.n` for a record's
/// n-th further output): the same for the same output however it is batched or redelivered.
fn output_key(origin: &Origin) -> String {
    format!("{}/{}/{}", origin.topic, origin.partition, position(origin))
}

/// The idempotency key of a batch: `topic/partition/first-last` for each source partition,
/// in the order they first appear, `,`-separated (`topic/partition/first` when a partition
/// has one output in it); positions as in [`output_key`].
fn batch_key<'a>(origins: impl Iterator<Item = &'a Origin>) -> String {
    let mut ranges: Vec<(&Origin, &Origin, &Origin)> = Vec::new();
    let at = |o: &Origin| (o.offset, o.output);
    for o in origins {
        match ranges
            .iter_mut()
            .find(|(r, _, _)| r.partition == o.partition && r.topic == o.topic)
        {
            Some((_, lo, hi)) => {
                if at(o) < at(lo) {
                    *lo = o;
                }
                if at(o) > at(hi) {
                    *hi = o;
                }
            }
            None => ranges.push((o, o, o)),
        }
    }
    ranges
        .iter()
        .map(|(o, lo, hi)| {
            if at(lo) == at(hi) {
                format!("{}/{}/{}", o.topic, o.partition, position(lo))
            } else {
                format!(
                    "{}/{}/{}-{}",
                    o.topic,
                    o.partition,
                    position(lo),
                    position(hi)
                )
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Deliver outputs to an HTTP endpoint.
pub struct HttpSink(Arc<Inner>);

struct Inner {
    client: HttpClient,
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    mode: HttpBatchAs,
    timeout: Duration,
    idempotency: Option<HeaderName>,
    /// Batches in flight at once: 1 when ordered.
    batches: Arc<Semaphore>,
    batch_slots: u32,
    /// Requests in flight at once (`maxInFlight`).
    requests: Semaphore,
    max_in_flight: usize,
    ordered: bool,
    retry: RetryPolicy,
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("uri", &self.0.uri)
            .field("mode", &self.0.mode)
            .finish()
    }
}

impl HttpSink {
    /// Resolve the headers (`valueEnv` from the environment) and the TLS trust; no
    /// request is made until the first batch (an endpoint that is down is transient).
    pub fn new(
        config: &HttpSinkConfig,
        ordering: Ordering,
        retry: RetryPolicy,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Result<Arc<Self>, HttpSetupError> {
        Self::with_env(config, ordering, retry, metrics, dead_letters, &|k| {
            std::env::var(k).ok()
        })
    }

    /// [`HttpSink::new`] reading `valueEnv` variables through `env`.
    pub fn with_env(
        config: &HttpSinkConfig,
        ordering: Ordering,
        retry: RetryPolicy,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, HttpSetupError> {
        let uri: Uri =
            config
                .url
                .parse()
                .map_err(|e: http::uri::InvalidUri| HttpSetupError::Url {
                    url: config.url.clone(),
                    message: e.to_string(),
                })?;
        let headers = resolve_headers(config, env)?;
        let idempotency = if config.idempotency_header.is_empty() {
            None
        } else {
            Some(
                HeaderName::from_bytes(config.idempotency_header.as_bytes()).map_err(|e| {
                    HttpSetupError::BadHeader {
                        name: config.idempotency_header.clone(),
                        message: e.to_string(),
                    }
                })?,
            )
        };
        let max_in_flight = config.max_in_flight.max(1) as usize;
        let client = super::tls::http_client(
            uri.scheme_str() == Some("https"),
            config.ca_file.as_deref(),
            config.timeout.get(),
            max_in_flight,
        )?;
        let ordered = ordering != Ordering::Unordered;
        let batch_slots = if ordered { 1 } else { max_in_flight as u32 };
        tracing::info!(sink = "http", url = %uri, mode = ?config.batch.as_, ordered, max_in_flight, "http sink ready");
        Ok(Arc::new(HttpSink(Arc::new(Inner {
            client,
            uri,
            method: match config.method {
                HttpMethod::Post => Method::POST,
                HttpMethod::Put => Method::PUT,
                HttpMethod::Patch => Method::PATCH,
            },
            headers,
            mode: config.batch.as_,
            timeout: config.timeout.get(),
            idempotency,
            batches: Arc::new(Semaphore::new(batch_slots as usize)),
            batch_slots,
            requests: Semaphore::new(max_in_flight),
            max_in_flight,
            ordered,
            retry,
            metrics,
            dead_letters,
        }))))
    }
}

/// Every request's headers: the configured ones (values from the environment where
/// asked), `Content-Type` by `batch.as` unless given, a `User-Agent` unless given.
fn resolve_headers(
    config: &HttpSinkConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, HttpSetupError> {
    let mut headers = HeaderMap::new();
    for (index, h) in config.headers.iter().enumerate() {
        let bad = |message: String| HttpSetupError::BadHeader {
            name: h.name.clone(),
            message,
        };
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let value = match (&h.value, &h.value_env) {
            (Some(v), _) => v.clone(),
            (None, Some(var)) => env(var).ok_or_else(|| HttpSetupError::MissingEnv {
                env: var.clone(),
                name: h.name.clone(),
                index,
            })?,
            (None, None) => return Err(bad("neither value nor valueEnv".into())),
        };
        let mut value = HeaderValue::from_str(value.trim_end_matches(['\n', '\r']))
            .map_err(|_| bad("the value holds a line break or a control character".into()))?;
        value.set_sensitive(h.value_env.is_some());
        headers.insert(name, value);
    }
    if !headers.contains_key(CONTENT_TYPE) {
        let ct = match config.batch.as_ {
            HttpBatchAs::Lines => "application/x-ndjson",
            HttpBatchAs::Array | HttpBatchAs::OnePerRequest => "application/json",
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    if !headers.contains_key(USER_AGENT) {
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
        );
    }
    Ok(headers)
}

impl Inner {
    /// One request: its answer, within `timeout`.
    async fn request(&self, body: Bytes, key: Option<&str>) -> Answer {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        if let (Some(name), Some(key)) = (&self.idempotency, key) {
            // Topic names are ASCII letters, digits, `.`, `_` and `-`: always a value.
            if let Ok(v) = HeaderValue::from_str(key) {
                req.headers_mut().insert(name.clone(), v);
            }
        }
        let work = async {
            let resp = match self.client.request(req).await {
                Ok(r) => r,
                Err(e) => {
                    return Answer::Transient {
                        message: format!("no answer: {}", chain(&e)),
                        retry_after: None,
                    }
                }
            };
            let status = resp.status();
            let wait = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| retry_after(v, SystemTime::now()));
            // Read the body (up to a limit) so the connection goes back to the pool.
            let body = Limited::new(resp.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            classify(status, wait, &body)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(a) => a,
            Err(_) => Answer::Transient {
                message: format!("no whole answer within {:?}", self.timeout),
                retry_after: None,
            },
        }
    }

    /// Deliver `parts` (batch index, body part) as requests of the sink's shape: one for
    /// them all, or, bisecting, for smaller groups until the refused outputs are alone.
    /// Transient errors are retried; returns the outputs that failed for good.
    async fn deliver(
        &self,
        batch: &SinkBatch,
        parts: &[(usize, Bytes)],
    ) -> Vec<(usize, SinkFailure)> {
        let mut rejected = Vec::new();
        // Ranges of `parts` still to send, the next one last.
        let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
        pending.push(0..parts.len());
        while let Some(range) = pending.pop() {
            let group = &parts[range.clone()];
            if group.is_empty() {
                continue;
            }
            // Each group's retries have the whole budget (a half split off after a long
            // outage is not left with none).
            let mut started: Option<Instant> = None;
            let refs: Vec<&Bytes> = group.iter().map(|(_, b)| b).collect();
            let body = body(self.mode, &refs);
            let key = self.idempotency.as_ref().map(|_| match self.mode {
                HttpBatchAs::OnePerRequest => {
                    let i = group[0].0;
                    output_key(&batch.items[i].1)
                }
                _ => batch_key(group.iter().map(|(i, _)| &batch.items[*i].1)),
            });
            let mut attempts = 1;
            loop {
                let answer = {
                    let _permit = self.requests.acquire().await;
                    self.request(body.clone(), key.as_deref()).await
                };
                match answer {
                    Answer::Delivered => break,
                    Answer::Transient {
                        message,
                        retry_after,
                    } => {
                        let since = *started.get_or_insert_with(Instant::now);
                        // At least what Retry-After asks, within what is left of the budget.
                        let left = self.retry.max_elapsed.saturating_sub(since.elapsed());
                        let delay = self
                            .retry
                            .next_delay(attempts, since.elapsed())
                            .map(|d| d.max(retry_after.unwrap_or_default()).min(left))
                            .filter(|d| !d.is_zero() || !left.is_zero());
                        match delay {
                            Some(d) => {
                                tracing::warn!(sink = "http", error = %message, attempts, delay = ?d, outputs = group.len(),
                                    "transient HTTP error; sending again");
                                self.metrics.retries.inc_by(group.len() as u64);
                                tokio::time::sleep(d).await;
                                attempts += 1;
                            }
                            None => {
                                tracing::error!(sink = "http", error = %message, attempts, outputs = group.len(),
                                    "retries exhausted");
                                rejected.extend(group.iter().map(|(i, _)| {
                                    (
                                        *i,
                                        SinkFailure {
                                            class: "retries_exhausted",
                                            message: message.clone(),
                                            attempts,
                                        },
                                    )
                                }));
                                break;
                            }
                        }
                    }
                    Answer::Permanent { class, message } => {
                        if group.len() == 1 {
                            tracing::warn!(sink = "http", error = %message, key = key.as_deref().unwrap_or(""),
                                "the endpoint refused an output");
                            rejected.push((
                                group[0].0,
                                SinkFailure {
                                    class,
                                    message,
                                    attempts,
                                },
                            ));
                        } else {
                            // Some output is refused: split, and the good halves go through
                            // (the left first, so order holds).
                            let mid = range.start + group.len() / 2;
                            pending.push(mid..range.end);
                            pending.push(range.start..mid);
                        }
                        break;
                    }
                }
            }
        }
        rejected
    }

    /// Send a whole batch; returns the outputs that failed for good.
    async fn send(&self, batch: &SinkBatch) -> Vec<(usize, SinkFailure)> {
        let mut rejected = Vec::new();
        let mut parts = Vec::with_capacity(batch.items.len());
        for (i, (o, _)) in batch.items.iter().enumerate() {
            match encode(self.mode, o.value.as_ref()) {
                Ok(b) => parts.push((i, b)),
                Err(mut f) => {
                    f.attempts = 1;
                    rejected.push((i, f));
                }
            }
        }
        match self.mode {
            HttpBatchAs::Array | HttpBatchAs::Lines => {
                rejected.extend(self.deliver(batch, &parts).await);
            }
            HttpBatchAs::OnePerRequest => {
                // Lanes: one per source partition when ordered (sent one after the
                // other), one per output when not.
                let mut lanes: Vec<Vec<(usize, Bytes)>> = Vec::new();
                if self.ordered {
                    let mut index: Vec<(&Origin, usize)> = Vec::new();
                    for p in parts {
                        let o = &batch.items[p.0].1;
                        match index
                            .iter()
                            .find(|(q, _)| q.partition == o.partition && q.topic == o.topic)
                        {
                            Some(&(_, lane)) => lanes[lane].push(p),
                            None => {
                                index.push((o, lanes.len()));
                                lanes.push(vec![p]);
                            }
                        }
                    }
                } else {
                    lanes = parts.into_iter().map(|p| vec![p]).collect();
                }
                let failed: Vec<Vec<(usize, SinkFailure)>> = futures::stream::iter(lanes)
                    .map(|lane| async move {
                        let mut out = Vec::new();
                        for p in lane {
                            out.extend(self.deliver(batch, std::slice::from_ref(&p)).await);
                        }
                        out
                    })
                    .buffer_unordered(self.max_in_flight)
                    .collect()
                    .await;
                rejected.extend(failed.into_iter().flatten());
            }
        }
        rejected
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        "http"
    }

    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Wait for a slot here, so a slow or absent endpoint holds the batcher and,
            // through it, the workers and the consumer.
            let Ok(permit) = self.0.batches.clone().acquire_owned().await else {
                return batch.fail();
            };
            let inner = self.0.clone();
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                let rejected = inner.send(&batch).await;
                batch.settle(rejected, "http", &inner.metrics, &inner.dead_letters);
                drop(permit);
            }));
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            tokio::time::timeout(timeout, self.0.batches.acquire_many(self.0.batch_slots))
                .await
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn origin(topic: &str, partition: i32, offset: i64) -> Origin {
        Origin {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            output: 0,
        }
    }

    #[test]
    fn answers_are_classified_by_status() {
        assert_eq!(classify(StatusCode::OK, None, b""), Answer::Delivered);
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, b""),
            Answer::Delivered
        );
        for s in [408, 425, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(s).unwrap();
            let a = classify(status, Some(Duration::from_secs(2)), b"busy");
            assert!(
                matches!(&a, Answer::Transient { retry_after: Some(d), message } if *d == Duration::from_secs(2) && message.starts_with(&format!("HTTP {s}"))),
                "{s}: {a:?}"
            );
        }
        let a = classify(
            StatusCode::BAD_REQUEST,
            None,
            b"{\"error\":\n  \"field temp missing\"}",
        );
        assert_eq!(
            a,
            Answer::Permanent {
                class: "http_rejected",
                message: "HTTP 400 Bad Request: {\"error\": \"field temp missing\"}".into()
            }
        );
        assert!(
            matches!(classify(StatusCode::CONFLICT, None, b""), Answer::Permanent { class: "http_rejected", message } if message == "HTTP 409 Conflict")
        );
        for s in [301, 401, 403, 404, 405] {
            let a = classify(StatusCode::from_u16(s).unwrap(), None, b"");
            assert!(
                matches!(a, Answer::Transient { .. }),
                "{s}: the endpoint's, no output's: {a:?}"
            );
        }
        let long = vec![b'x'; 1000];
        let Answer::Permanent { message, .. } =
            classify(StatusCode::UNPROCESSABLE_ENTITY, None, &long)
        else {
            panic!()
        };
        assert!(
            message.len() < BODY_START + 64 && message.ends_with(" ..."),
            "{message}"
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            retry_after(&HeaderValue::from_static("3"), now),
            Some(Duration::from_secs(3))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            retry_after(&HeaderValue::from_str(&later).unwrap(), now),
            Some(Duration::from_secs(7))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(
            retry_after(&HeaderValue::from_str(&earlier).unwrap(), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&HeaderValue::from_static("soon"), now), None);
    }

    #[test]
    fn bodies_follow_batch_as() {
        let a = Bytes::from_static(b"{\"id\":1}");
        let b = Bytes::from_static(b"[2]");
        assert_eq!(
            &body(HttpBatchAs::Array, &[&a, &b])[..],
            b"[{\"id\":1},[2]]"
        );
        assert_eq!(&body(HttpBatchAs::Array, &[])[..], b"[]");
        assert_eq!(
            &body(HttpBatchAs::Lines, &[&a, &b])[..],
            b"{\"id\":1}\n[2]\n"
        );
        assert_eq!(&body(HttpBatchAs::OnePerRequest, &[&a])[..], b"{\"id\":1}");
        assert_eq!(&encode(HttpBatchAs::Array, None).unwrap()[..], b"null");
        assert_eq!(&encode(HttpBatchAs::OnePerRequest, None).unwrap()[..], b"");
        assert_eq!(
            encode(
                HttpBatchAs::Array,
                Some(&Bytes::from_static(b"{\"a\":1} x"))
            )
            .unwrap_err()
            .class,
            "not_json"
        );
        assert_eq!(
            encode(HttpBatchAs::Lines, Some(&Bytes::from_static(b"a\nb")))
                .unwrap_err()
                .class,
            "not_one_line"
        );
        assert!(encode(
            HttpBatchAs::OnePerRequest,
            Some(&Bytes::from_static(b"a\nb"))
        )
        .is_ok());
    }

    #[test]
    fn idempotency_keys_name_the_source_records() {
        let os = [
            origin("in", 0, 5),
            origin("in", 1, 9),
            origin("in", 0, 7),
            origin("in", 0, 6),
        ];
        assert_eq!(batch_key(os.iter()), "in/0/5-7,in/1/9");
        assert_eq!(batch_key(os[1..2].iter()), "in/1/9");
        assert_eq!(output_key(&os[0]), "in/0/5");
        // A record's further outputs have keys of their own, in batches too.
        let second = os[0].clone().output(2);
        assert_eq!(output_key(&second), "in/0/5.2");
        assert_eq!(batch_key([&os[0], &second].into_iter()), "in/0/5-5.2");
        assert_eq!(batch_key([&second, &os[2]].into_iter()), "in/0/5.2-7");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]
        /// Every output value either goes into an array body that parses as a JSON array
        /// of exactly the accepted values, or is refused as `not_json`; no input panics.
        #[test]
        fn fuzz_array_bodies_are_json_arrays_of_the_accepted_values(
            values in prop::collection::vec(prop::option::of(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..24),
                "[0-9]{1,5}|\"[a-z]{0,5}\"|\\{\"a\":[0-9]\\}|null|true".prop_map(|s| s.into_bytes()),
            ]), 0..16),
        ) {
            let values: Vec<Option<Bytes>> = values.into_iter().map(|v| v.map(Bytes::from)).collect();
            let mut parts = Vec::new();
            let mut refused = 0;
            for v in &values {
                match encode(HttpBatchAs::Array, v.as_ref()) {
                    Ok(p) => parts.push(p),
                    Err(f) => {
                        prop_assert_eq!(f.class, "not_json");
                        refused += 1;
                    }
                }
            }
            prop_assert_eq!(parts.len() + refused, values.len());
            let refs: Vec<&Bytes> = parts.iter().collect();
            let parsed: Vec<serde_json::Value> = serde_json::from_slice(&body(HttpBatchAs::Array, &refs)).unwrap();
            prop_assert_eq!(parsed.len(), parts.len());
            for (p, v) in parts.iter().zip(&parsed) {
                let want: serde_json::Value = serde_json::from_slice(p).unwrap();
                prop_assert_eq!(&want, v);
            }
        }
    }
}
