//! Harness for sluice's integration tests: the Kafka broker under test, worker processes
//! (real binaries, so tests can SIGKILL and SIGTERM them), metrics scraping, polling with
//! deadlines, and the independent auditor from `sluice-loadgen`.
//!
//! The broker is `SLUICE_TEST_BOOTSTRAP` when set (any Kafka or Redpanda), otherwise the
//! local Apache Kafka started by `scripts/kafka.sh` (started here if it is not running).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod chaos;
pub mod cluster;
pub mod http_receiver;
pub mod replicated;

pub use sluice_loadgen::{
    audit, create_topic, create_topic_with, key, offsets, parse_seq, payload, produce, AuditReport,
    ProduceSpec,
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Run `scripts/<name> <arg>` from the repository (they install and start what tests use);
/// panic if it fails, return its standard output.
fn script(name: &str, arg: &str) -> String {
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts").join(name))
            .arg(arg)
            .stderr(Stdio::inherit()),
    )
}

/// Bootstrap servers of the broker under test. Prints, once, which broker it is.
pub fn bootstrap() -> String {
    static B: OnceLock<String> = OnceLock::new();
    B.get_or_init(|| {
        if let Ok(b) = std::env::var("SLUICE_TEST_BOOTSTRAP") {
            eprintln!("[testkit] broker: external, SLUICE_TEST_BOOTSTRAP={b}");
            return b;
        }
        let port = std::env::var("SLUICE_KAFKA_PORT").unwrap_or_else(|_| "9092".into());
        let b = format!("127.0.0.1:{port}");
        if TcpStream::connect(&b).is_err() {
            eprintln!("[testkit] no broker on {b}; starting the local Apache Kafka (scripts/kafka.sh start)");
            script("kafka.sh", "start");
        }
        let version = std::env::var("SLUICE_KAFKA_VERSION").unwrap_or_else(|_| "4.1.1".into());
        eprintln!("[testkit] broker: local Apache Kafka {version} (KRaft) at {b}");
        b
    })
    .clone()
}

/// Path of a kubeconfig for a real Kubernetes API server: `SLUICE_TEST_KUBECONFIG` when
/// set, otherwise the local kube-apiserver + etcd of `scripts/k8s.sh` (started here if it
/// is not running; built from Go modules into the cache the first time).
pub fn kubeconfig() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        if let Ok(k) = std::env::var("SLUICE_TEST_KUBECONFIG") {
            eprintln!("[testkit] api server: external, SLUICE_TEST_KUBECONFIG={k}");
            return PathBuf::from(k);
        }
        script("k8s.sh", "start");
        let dir = std::env::var("SLUICE_K8S_DIR").unwrap_or_else(|_| "/tmp/sluice-k8s".into());
        eprintln!("[testkit] api server: local kube-apiserver + etcd ({dir})");
        PathBuf::from(dir).join("kubeconfig")
    })
    .clone()
}

/// Path of a real `kubectl` or `helm` binary (`scripts/tools.sh`, installed on first use).
pub fn tool(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        script("tools.sh", "install");
        PathBuf::from(script("tools.sh", "path").trim())
    })
    .join(name)
}

/// Run a command; return stdout, or panic with its stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bootstrap servers of the broker's SASL_PLAINTEXT listener (PLAIN user `sluice`,
/// password `sluice-secret`): `SLUICE_TEST_SASL_BOOTSTRAP`, or the local broker's port + 2.
/// `None` when an external broker is used without a SASL address.
pub fn sasl_bootstrap() -> Option<String> {
    if let Ok(b) = std::env::var("SLUICE_TEST_SASL_BOOTSTRAP") {
        return Some(b);
    }
    local_listener(2)
}

/// `127.0.0.1:<port + offset>` of the local broker's extra listeners (scripts/kafka.sh);
/// `None` when the tests run against an external broker.
fn local_listener(offset: u16) -> Option<String> {
    if std::env::var("SLUICE_TEST_BOOTSTRAP").is_ok() {
        return None;
    }
    bootstrap();
    let port: u16 = std::env::var("SLUICE_KAFKA_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9092);
    Some(format!("127.0.0.1:{}", port + offset))
}

/// The TLS listener of the local broker (`scripts/kafka.sh`: port + 4) and the CA file
/// that signed its certificate; `None` against an external broker unless
/// `SLUICE_TEST_TLS_BOOTSTRAP` and `SLUICE_TEST_TLS_CA` name them.
pub fn tls_bootstrap() -> Option<(String, PathBuf)> {
    secured_listener("SLUICE_TEST_TLS_BOOTSTRAP", 4)
}

/// The SASL_SSL listener of the local broker (port + 5: SASL over TLS, the users of
/// [`sasl_bootstrap`], the certificate of [`tls_bootstrap`]) and its CA file; against an
/// external broker `SLUICE_TEST_SASL_SSL_BOOTSTRAP` and `SLUICE_TEST_TLS_CA` name them.
pub fn sasl_ssl_bootstrap() -> Option<(String, PathBuf)> {
    secured_listener("SLUICE_TEST_SASL_SSL_BOOTSTRAP", 5)
}

fn secured_listener(var: &str, offset: u16) -> Option<(String, PathBuf)> {
    if let (Ok(b), Ok(ca)) = (std::env::var(var), std::env::var("SLUICE_TEST_TLS_CA")) {
        return Some((b, ca.into()));
    }
    let listener = local_listener(offset)?;
    let dir = std::env::var("SLUICE_KAFKA_DIR").unwrap_or_else(|_| "/tmp/sluice-kafka".into());
    Some((listener, Path::new(&dir).join("tls/ca.pem")))
}

/// The local broker's listener that requires a client certificate signed by its test CA
/// (`scripts/kafka.sh`: port + 9), with the files of that test PKI.
#[derive(Clone, Debug)]
pub struct MtlsListener {
    /// Its bootstrap address.
    pub bootstrap: String,
    /// The CA that signed the broker's certificate and the client's.
    pub ca: PathBuf,
    /// A client certificate the broker accepts.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, not encrypted).
    pub key: PathBuf,
    /// The same key, encrypted with [`MtlsListener::key_password`].
    pub encrypted_key: PathBuf,
    /// The password of `encrypted_key`.
    pub key_password: String,
    /// A certificate signed by another CA, which the broker refuses.
    pub stranger_cert: PathBuf,
    /// Its key.
    pub stranger_key: PathBuf,
}

/// The client-certificate listener of the local broker; against an external broker,
/// `SLUICE_TEST_MTLS_BOOTSTRAP` and `SLUICE_TEST_MTLS_DIR` (a directory with `ca.pem`,
/// `client.pem`, `client.key`, `client-encrypted.key`, `client-key.password`,
/// `stranger.pem`, `stranger.key`) name it, else `None`. Panics, saying what to do, when
/// the local broker was started before the listener existed.
pub fn mtls_listener() -> Option<MtlsListener> {
    let (bootstrap, dir) = match (
        std::env::var("SLUICE_TEST_MTLS_BOOTSTRAP"),
        std::env::var("SLUICE_TEST_MTLS_DIR"),
    ) {
        (Ok(b), Ok(d)) => (b, PathBuf::from(d)),
        _ => {
            let b = local_listener(9)?;
            let d =
                std::env::var("SLUICE_KAFKA_DIR").unwrap_or_else(|_| "/tmp/sluice-kafka".into());
            assert!(
                TcpStream::connect(&b).is_ok(),
                "the local broker has no client-certificate listener on {b}: it was started by an older scripts/kafka.sh; restart it (scripts/kafka.sh restart keeps its data)"
            );
            (b, Path::new(&d).join("tls"))
        }
    };
    let key_password = std::fs::read_to_string(dir.join("client-key.password"))
        .expect("client-key.password")
        .trim()
        .to_string();
    Some(MtlsListener {
        bootstrap,
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        encrypted_key: dir.join("client-encrypted.key"),
        key_password,
        stranger_cert: dir.join("stranger.pem"),
        stranger_key: dir.join("stranger.key"),
    })
}

/// The local broker's OAUTHBEARER listener and the OpenID Connect provider whose tokens it
/// accepts, with client credentials that provider issues tokens for.
#[derive(Clone, Debug)]
pub struct OAuthListener {
    /// Its bootstrap address (SASL_PLAINTEXT, mechanism OAUTHBEARER).
    pub bootstrap: String,
    /// The provider's token endpoint.
    pub token_endpoint_url: String,
    /// A client with the client-credentials grant.
    pub client_id: String,
    /// Its secret.
    pub client_secret: String,
    /// How long the provider's access tokens live: a client that stays connected for more
    /// than two of these has fetched new ones (the broker re-authenticates every
    /// connection before its token expires and refuses an expired one).
    pub token_lifetime: Duration,
}

/// The OAUTHBEARER listener of the local broker (`scripts/kafka.sh`: port + 12) and the
/// local Keycloak (`scripts/oidc.sh`: realm `sluice`, client `sluice-worker`, 15 s tokens);
/// against an external broker `SLUICE_TEST_OAUTH_BOOTSTRAP`, `SLUICE_TEST_OAUTH_TOKEN_URL`,
/// `SLUICE_TEST_OAUTH_CLIENT_ID` and `SLUICE_TEST_OAUTH_CLIENT_SECRET` name them (and
/// `SLUICE_TEST_OAUTH_TOKEN_SECONDS` the tokens' lifetime), else `None`. Panics, saying
/// what to do, when the local broker was started without that listener.
pub fn oauth_listener() -> Option<OAuthListener> {
    let var = |v: &str| std::env::var(v).ok();
    if let (Some(bootstrap), Some(token_endpoint_url), Some(client_id), Some(client_secret)) = (
        var("SLUICE_TEST_OAUTH_BOOTSTRAP"),
        var("SLUICE_TEST_OAUTH_TOKEN_URL"),
        var("SLUICE_TEST_OAUTH_CLIENT_ID"),
        var("SLUICE_TEST_OAUTH_CLIENT_SECRET"),
    ) {
        let seconds = var("SLUICE_TEST_OAUTH_TOKEN_SECONDS")
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        return Some(OAuthListener {
            bootstrap,
            token_endpoint_url,
            client_id,
            client_secret,
            token_lifetime: Duration::from_secs(seconds),
        });
    }
    let bootstrap = local_listener(12)?;
    let oidc_port = var("SLUICE_OIDC_PORT").unwrap_or_else(|| "9180".into());
    if TcpStream::connect(format!("127.0.0.1:{oidc_port}")).is_err() {
        eprintln!("[testkit] no OIDC provider on 127.0.0.1:{oidc_port}; starting the local Keycloak (scripts/oidc.sh start)");
        script("oidc.sh", "start");
    }
    assert!(
        TcpStream::connect(&bootstrap).is_ok(),
        "the local broker has no OAUTHBEARER listener on {bootstrap}: it was started by an older scripts/kafka.sh or with SLUICE_KAFKA_OAUTH=0; restart it (scripts/kafka.sh restart keeps its data)"
    );
    Some(OAuthListener {
        bootstrap,
        token_endpoint_url: format!(
            "http://127.0.0.1:{oidc_port}/realms/sluice/protocol/openid-connect/token"
        ),
        client_id: "sluice-worker".into(),
        client_secret: "sluice-oidc-secret".into(),
        token_lifetime: Duration::from_secs(15),
    })
}

/// The local broker's plaintext listener that advertises itself on port + 7 instead of
/// its own port + 6 (`scripts/kafka.sh`): a [`TcpProxy`] listening on the advertised port
/// carries every connection a client makes through it, so cutting the proxy makes the
/// broker unreachable on that address alone. Returns (the listener, the advertised
/// address); `None` against an external broker.
pub fn proxied_listener() -> Option<(String, String)> {
    Some((local_listener(6)?, local_listener(7)?))
}

/// Run `scripts/kafka.sh <action>` (stop, start, restart) on the broker under test, when
/// that broker is the local one the script manages: `bootstrap()` must be
/// `127.0.0.1:$SLUICE_KAFKA_PORT` (default 9092), and the script is run with the same
/// `SLUICE_KAFKA_PORT`/`SLUICE_KAFKA_DIR`, so it never stops another broker. Returns false
/// (and does nothing) against an external broker: the scenarios that stop the broker are
/// skipped there.
pub fn local_broker(action: &str) -> bool {
    let port = std::env::var("SLUICE_KAFKA_PORT").unwrap_or_else(|_| "9092".into());
    if bootstrap() != format!("127.0.0.1:{port}") {
        eprintln!(
            "[testkit] not running `kafka.sh {action}`: the broker under test ({}) is not the local one on port {port}",
            bootstrap()
        );
        return false;
    }
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .arg(action)
            .env("SLUICE_KAFKA_PORT", &port)
            .stderr(Stdio::inherit()),
    );
    true
}

/// The HTTP status of a GET on loopback (`None` when nothing answers).
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// Where `bin` is on the PATH, if anywhere.
pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// Fresh input and output topics (`partitions` each) and a group name for one test.
pub fn pipeline_topics(prefix: &str, partitions: i32) -> (String, String, String) {
    let b = bootstrap();
    let names = (
        unique(&format!("{prefix}-in")),
        unique(&format!("{prefix}-out")),
        unique(&format!("{prefix}-g")),
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            create_topic(&b, &names.0, partitions)
                .await
                .expect("input topic");
            create_topic(&b, &names.1, partitions)
                .await
                .expect("output topic");
        });
    names
}

/// Create `topic` with `partitions` on the broker under test, now.
pub fn create_topic_now(topic: &str, partitions: i32) {
    let b = bootstrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(create_topic(&b, topic, partitions))
        .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
}

/// Produce `count` sequence-numbered records (0..count, 100 bytes) into `topic`, now.
pub fn produce_seq(topic: &str, count: u64) {
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: topic.into(),
        from: 0,
        count,
        rate: None,
        size: 100,
        linger_ms: 5,
    };
    produce(&spec, &std::sync::atomic::AtomicU64::new(0)).expect("produce");
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// The pause between two checks of a wait: 100 ms at first, doubling to at most 1 s, so a
/// wait that polls `kubectl` for minutes does not start ten processes a second.
fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(Duration::from_secs(1))
}

/// Poll `check` until it returns `Ok`, or panic once `timeout` has passed, naming `what` and
/// showing what the check last saw (its `Err`). A check that cannot read the state yet (an
/// object with no status, a connection refused, an empty answer) returns `Err` and is asked
/// again: a wait never fails because the object is not yet in the shape the check reads.
pub fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        match check() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = next_pause(pause);
    }
}

/// [`poll`] for async checks (tests on a tokio runtime).
pub async fn poll_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = next_pause(pause);
    }
}

/// Poll until every object in `what` (`kind/name`; in namespace `ns`, or cluster-scoped when
/// `ns` is `None`) has the condition `ty` with status `True`, through `kubectl` (a command
/// with its kubeconfig set); panic after `timeout` with the conditions last seen. Unlike
/// `kubectl wait --for=condition=..`, an object that does not exist yet or has no status yet
/// (a CRD just created) is waited for, not an error.
pub fn wait_condition(
    kubectl: &dyn Fn() -> Command,
    ns: Option<&str>,
    what: &[&str],
    ty: &str,
    timeout: Duration,
) {
    for w in what {
        poll(&format!("{w} to be {ty}"), timeout, || {
            let mut args = vec!["get", *w, "-o", "json"];
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            let out = kubectl().args(&args).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            let obj: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("not JSON: {e}"))?;
            let conditions = &obj["status"]["conditions"];
            let found =
                conditions.as_array().into_iter().flatten().any(|c| {
                    c["type"].as_str() == Some(ty) && c["status"].as_str() == Some("True")
                });
            if found {
                Ok(())
            } else if conditions.is_null() {
                Err("no status conditions yet".into())
            } else {
                Err(format!("conditions {conditions}"))
            }
        });
    }
}

/// Poll `cond` until it returns true, or panic after `timeout` (see [`poll`], which also
/// reports what it last saw: prefer it when there is something to show).
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    poll(what, timeout, || {
        cond().then_some(()).ok_or_else(|| "not yet".to_string())
    })
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A worker process under test.
pub struct WorkerProcess {
    child: Child,
    /// Its metrics address.
    pub metrics_addr: String,
    /// Where its logs go.
    pub log: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
}

impl WorkerProcess {
    /// Start `bin` with `config_yaml` (which should listen on `metrics_addr`).
    pub fn start(bin: &str, name: &str, config_yaml: &str, metrics_addr: &str) -> Self {
        Self::start_with_env(bin, name, config_yaml, metrics_addr, &[])
    }

    /// Like [`WorkerProcess::start`], with extra environment variables.
    pub fn start_with_env(
        bin: &str,
        name: &str,
        config_yaml: &str,
        metrics_addr: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = std::env::temp_dir().join("sluice-tests");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, config_yaml).expect("write config");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("SLUICE_LOG_FORMAT", "text")
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_TEST_WORKER_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            // After the defaults: a test's own SLUICE_LOG wins.
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn worker");
        WorkerProcess {
            child,
            metrics_addr: metrics_addr.to_string(),
            log,
            config,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET /metrics (empty string while the server is not up).
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics").unwrap_or_default()
    }

    /// Sum of all series of metric `name` (optionally only those whose labels contain
    /// `label_filter`).
    pub fn metric(&self, name: &str, label_filter: &str) -> f64 {
        metric_sum(&self.metrics(), name, label_filter)
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The last `n` lines of its log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Sum the samples of `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// Sum over partitions of (end offset - committed offset); uncommitted partitions count
/// in full.
pub fn uncommitted(bootstrap: &str, group: &str, topic: &str) -> i64 {
    offsets::committed_and_end(bootstrap, group, topic)
        .map(|v| v.iter().map(|(c, hi)| hi - c.unwrap_or(0)).sum())
        .unwrap_or(i64::MAX)
}

/// A worker configuration for tests: `input` -> kafka `output`, metrics on `addr`.
pub fn worker_config(
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
    addr: &str,
    extra: &str,
) -> String {
    format!(
        r#"pipeline: test
source:
  bootstrapServers: "{bootstrap}"
  topic: {input}
  groupId: {group}
  sessionTimeout: 10s
sinks:
  - kafka: {{topic: {output}}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
{extra}
"#
    )
}

/// Connection string of the PostgreSQL under test: `SLUICE_TEST_POSTGRES` when set,
/// otherwise the local server of `scripts/postgres.sh` (started here if it is not up).
pub fn postgres_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = match std::env::var("SLUICE_TEST_POSTGRES") {
            Ok(u) if !u.is_empty() => u,
            _ => {
                // idempotent: starts it, or restarts one running without TLS
                script("postgres.sh", "start");
                script("postgres.sh", "url").trim().to_string()
            }
        };
        eprintln!(
            "PostgreSQL under test: {}",
            url.split('@').next_back().unwrap_or("?")
        );
        url
    })
    .clone()
}

/// The CA file that signed the test PostgreSQL's certificate: the local server's
/// (`scripts/postgres.sh` serves TLS to `sslmode=require`), or `SLUICE_TEST_POSTGRES_CA`
/// with an external `SLUICE_TEST_POSTGRES`; `None` when an external server has none.
pub fn postgres_ca() -> Option<PathBuf> {
    postgres_url();
    if std::env::var("SLUICE_TEST_POSTGRES").is_ok_and(|u| !u.is_empty()) {
        return std::env::var("SLUICE_TEST_POSTGRES_CA")
            .ok()
            .map(PathBuf::from);
    }
    let dir = std::env::var("SLUICE_PG_DIR").unwrap_or_else(|_| "/tmp/sluice-pg".into());
    Some(Path::new(&dir).join("tls/ca.pem"))
}

/// One record to produce: an explicit partition (or by key), a key and a value.
#[derive(Clone, Debug, Default)]
pub struct TestRecord {
    /// Partition, or `None` to let the key decide.
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<String>,
    /// Value.
    pub value: Vec<u8>,
    /// Produce no value at all (a tombstone) instead of `value`.
    pub tombstone: bool,
}

/// Produce `records` to `topic` (idempotent, acks=all) and wait for every delivery.
pub fn produce_records(topic: &str, records: impl IntoIterator<Item = TestRecord>) {
    produce_records_at(topic, records, None)
}

/// Like [`produce_records`], paced at `rate` records per second when given.
pub fn produce_records_at(
    topic: &str,
    records: impl IntoIterator<Item = TestRecord>,
    rate: Option<f64>,
) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // up to the broker's own limit, so tests can offer records too large for a sink
        .set("message.max.bytes", "1048000")
        .create()
        .expect("producer");
    let started = Instant::now();
    for (i, r) in records.into_iter().enumerate() {
        if let Some(rate) = rate {
            if i % 100 == 0 {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic);
        if !r.tombstone {
            rec = rec.payload(&r.value[..]);
        }
        if let Some(k) = &r.key {
            rec = rec.key(k.as_str());
        }
        if let Some(part) = r.partition {
            rec = rec.partition(part);
        }
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60))
        .expect("every record delivered");
}

/// A record read back from a topic.
#[derive(Clone, Debug)]
pub struct ReadRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers with a value.
    pub headers: Vec<(String, String)>,
    /// Every header exactly as read, in order: its name and its value bytes (`None` for a
    /// null value).
    pub all_headers: Vec<(String, Option<Vec<u8>>)>,
}

impl ReadRecord {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A consumer of its own (a fresh group, nothing committed) reading `topics` from the
/// beginning: what the auditors use, never the worker's group.
pub fn reader(topics: &[&str], prefix: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique(prefix))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(topics).expect("subscribe");
    c
}

/// A consumer reading every partition of `topics` from the beginning by explicit
/// assignment: no group, so nothing about the broker's group coordination (a session that
/// expires while the broker is away) can stop it. What the chaos auditor uses.
pub fn reader_assigned(topics: &[&str]) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("auditor"))
        .set("enable.auto.commit", "false")
        // librdkafka's default, stated: an exactly-once pipeline's aborted transactions
        // must not count as deliveries.
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in topics {
        let md = c
            .fetch_metadata(Some(t), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("metadata of {t}: {e}"));
        for mt in md.topics() {
            for p in mt.partitions() {
                tpl.add_partition_offset(t, p.id(), rdkafka::Offset::Beginning)
                    .expect("partition");
            }
        }
    }
    c.assign(&tpl).expect("assign");
    c
}

/// Read every record of `topic` from the beginning, until `timeout` passes with nothing
/// new for 3 s (or the end is reached and stays put).
pub fn read_all(topic: &str, timeout: Duration) -> Vec<ReadRecord> {
    use rdkafka::message::{Headers, Message};
    let c = reader(&[topic], "reader");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(3) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                out.push(ReadRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .filter_map(|h| {
                                    Some((
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value?).into_owned(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    all_headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// A TCP proxy on loopback the test controls: [`TcpProxy::cut`] drops every connection
/// and refuses new ones (the far side looks unreachable), [`TcpProxy::restore`] lets them
/// through again. Dropping it closes its port.
pub struct TcpProxy {
    /// The proxy's `host:port`.
    pub addr: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    /// Milliseconds every chunk from the server waits before it is passed on (0: none).
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TcpProxy {
    /// Forward a fresh loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> Self {
        Self::start_on("127.0.0.1:0", target)
    }

    /// Forward `listen` (`host:port`; port 0 picks one) to `target`.
    pub fn start_on(listen: &str, target: &str) -> Self {
        use std::sync::atomic::Ordering;
        // A proxy just dropped on the same port may still be closing its listener.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(listen) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("bind a proxy on {listen}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("addr").to_string();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>> = Default::default();
        let delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let (up2, closed2, live2, delay2, target) = (
            up.clone(),
            closed.clone(),
            live.clone(),
            delay_ms.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if closed2.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::Acquire) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                {
                    let mut l = live2.lock().expect("live lock");
                    l.push(client.try_clone().expect("clone"));
                    l.push(server.try_clone().expect("clone"));
                }
                for (mut from, mut to, delay) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                        None,
                    ),
                    (server, client, Some(delay2.clone())),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Answers from the server wait while a delay is set.
                            if let Some(d) = &delay {
                                let ms = d.load(Ordering::Acquire);
                                if ms > 0 {
                                    std::thread::sleep(Duration::from_millis(ms));
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        TcpProxy {
            addr,
            up,
            closed,
            live,
            delay_ms,
        }
    }

    /// Hold every chunk the server sends for `delay` before passing it on (zero: none).
    pub fn delay_responses(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::Release);
        for s in self.live.lock().expect("live lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        // wake the accept loop so it sees `closed` and drops the listener
        let _ = TcpStream::connect(&self.addr);
    }
}

/// The Confluent-compatible base URL of the schema registry under test:
/// `SLUICE_TEST_REGISTRY` when set, otherwise the local Apicurio Registry of
/// `scripts/registry.sh` (started here if it is not up).
pub fn registry_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("SLUICE_TEST_REGISTRY") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            script("registry.sh", "start");
            script("registry.sh", "url").trim().to_string()
        }
    })
    .clone()
}

/// Run `scripts/registry-roundtrip.py` (Confluent's own Python client, serializers and
/// deserializers) with `args`; its standard output.
pub fn registry_client(args: &[&str]) -> String {
    run_ok(
        Command::new("python3")
            .arg(repo_root().join("scripts/registry-roundtrip.py"))
            .args(args)
            .stderr(Stdio::inherit()),
    )
}
