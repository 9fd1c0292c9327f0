//! A real HTTP server on loopback for the http sink's tests: it answers each request as
//! the test's policy says (a status, headers, a body, after a delay) and keeps a log of
//! every request and its answer, with when it came and when it was answered.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};

/// One request as it came in.
#[derive(Clone, Debug)]
pub struct Received {
    /// Its place among every request (from 0).
    pub n: u64,
    /// The method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Headers, names lower-case, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// When it came in.
    pub at: Instant,
    /// When it was answered (after the policy's delay).
    pub answered: Instant,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The first header of this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What to answer: a status, extra headers, a body, and how long to wait first.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Answer {
    /// `status` with no body, at once.
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    /// 200 OK.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// With this body.
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_string();
        self
    }

    /// With this header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// After this delay.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// Decides the answer to a request (its number, method, path, headers and body are set;
/// `answered` and `status` are not yet).
pub type Policy = dyn Fn(&Received) -> Answer + Send + Sync;

struct Shared {
    policy: Box<Policy>,
    log: Mutex<Vec<Received>>,
    count: Mutex<u64>,
    in_flight: Mutex<(u64, u64)>,
}

/// The server; it stops when dropped.
pub struct HttpReceiver {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpReceiver {
    /// Start on a free loopback port, answering as `policy` says.
    pub fn start(policy: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> Self {
        Self::start_with(None, policy)
    }

    /// Start speaking HTTPS with the certificate chain `cert` and key `key` (PEM files).
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        policy: impl Fn(&Received) -> Answer + Send + Sync + 'static,
    ) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("the certificate file")
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM certificates");
        let key = PrivateKeyDer::from_pem_file(key).expect("the key file");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("a certificate and its key");
        Self::start_with(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            policy,
        )
    }

    fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        policy: impl Fn(&Received) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            policy: Box::new(policy),
            log: Mutex::new(Vec::new()),
            count: Mutex::new(0),
            in_flight: Mutex::new((0, 0)),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, addr) = std::sync::mpsc::channel();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                match tls {
                    None => {
                        let app = axum::Router::new().fallback(handle).with_state(state);
                        axum::serve(listener, app)
                            .with_graceful_shutdown(async {
                                let _ = stopped.await;
                            })
                            .await
                            .unwrap();
                    }
                    Some(acceptor) => {
                        let accept = async move {
                            loop {
                                let Ok((tcp, _)) = listener.accept().await else {
                                    continue;
                                };
                                let (acceptor, state) = (acceptor.clone(), state.clone());
                                tokio::spawn(async move {
                                    // A client that does not trust the certificate ends here.
                                    let Ok(tls) = acceptor.accept(tcp).await else {
                                        return;
                                    };
                                    let service = hyper::service::service_fn(
                                        move |req: hyper::Request<hyper::body::Incoming>| {
                                            let state = state.clone();
                                            async move {
                                                Ok::<_, std::convert::Infallible>(
                                                    handle(
                                                        State(state),
                                                        req.map(axum::body::Body::new),
                                                    )
                                                    .await,
                                                )
                                            }
                                        },
                                    );
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(
                                            hyper_util::rt::TokioIo::new(tls),
                                            service,
                                        )
                                        .await;
                                });
                            }
                        };
                        tokio::select! {
                            _ = accept => {}
                            _ = stopped => {}
                        }
                    }
                }
            });
        });
        let addr = addr
            .recv_timeout(Duration::from_secs(10))
            .expect("the HTTP receiver listens");
        HttpReceiver {
            addr,
            scheme,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:port` (or `https://`) + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Every request answered so far, in the order they were answered (a request whose
    /// client went away before its answer is not in it).
    pub fn log(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.in_flight.lock().unwrap().1
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts a request in flight until it is answered or its client goes away.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let mut f = shared.in_flight.lock().unwrap();
        f.0 += 1;
        f.1 = f.1.max(f.0);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.lock().unwrap().0 -= 1;
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: axum::extract::Request) -> Response {
    let at = Instant::now();
    let in_flight = InFlight::enter(&shared);
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = axum::body::to_bytes(req.into_body(), 256 << 20)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let n = {
        let mut c = shared.count.lock().unwrap();
        *c += 1;
        *c - 1
    };
    let mut got = Received {
        n,
        method,
        path,
        headers,
        body,
        at,
        answered: at,
        status: 0,
    };
    let answer = (shared.policy)(&got);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    got.answered = Instant::now();
    got.status = answer.status;
    drop(in_flight);
    shared.log.lock().unwrap().push(got);
    let mut resp = (
        axum::http::StatusCode::from_u16(answer.status).unwrap(),
        answer.body,
    )
        .into_response();
    for (k, v) in answer.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with `openssl` in `dir`:
/// (the CA's PEM file, the server's certificate, its key).
pub fn test_certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sluice-test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
