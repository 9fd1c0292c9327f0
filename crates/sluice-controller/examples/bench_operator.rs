//! The operator at scale (`make bench-operator`, BENCHMARKS.md "The operator at scale"):
//! the release controller against a real kube-apiserver and the real broker, N pipelines
//! over shared topics, each its own consumer group. Per N it reports: the time until every
//! pipeline has a status, the controller's CPU, RSS, threads and Kafka connections and its
//! API requests by verb while steady, the lag freshness (records produced -> every
//! pipeline's status shows them) against pollInterval, and after deleting every pipeline
//! (and its children, as the garbage collector would): RSS and the per-pipeline series left.
//!
//! No kubelet runs: the worker Deployments never get pods, so every pipeline stays at its
//! minimum replicas, which is what the controller's cost depends on.
//!
//! One JSON line per N on stdout; progress on stderr.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, CustomResourceExt, ResourceExt};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;
use sluice_api::crd::StreamPipeline;

struct Args {
    controller: String,
    kubeconfig: String,
    bootstrap: String,
    counts: Vec<usize>,
    topics: usize,
    partitions: i32,
    poll: u64,
    steady: u64,
    api_qps: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        controller: "target/release/sluice-controller".into(),
        kubeconfig: String::new(),
        bootstrap: "127.0.0.1:9092".into(),
        counts: vec![100, 1_000, 10_000],
        topics: 100,
        partitions: 12,
        poll: 30,
        steady: 60,
        api_qps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--controller" => a.controller = v,
            "--kubeconfig" => a.kubeconfig = v,
            "--bootstrap" => a.bootstrap = v,
            "--counts" => a.counts = v.split(',').map(|n| n.parse().expect("N")).collect(),
            "--topics" => a.topics = v.parse().expect("topics"),
            "--partitions" => a.partitions = v.parse().expect("partitions"),
            "--poll" => a.poll = v.parse().expect("seconds"),
            "--steady" => a.steady = v.parse().expect("seconds"),
            "--api-qps" => a.api_qps = Some(v),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(!a.kubeconfig.is_empty(), "--kubeconfig is required");
    a
}

/// The machine's 1-minute load average (the bench shares its cores with other work).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn log(s: impl AsRef<str>) {
    eprintln!("[bench-operator] {}", s.as_ref());
}

/// CPU seconds, RSS bytes and threads of a process, from /proc.
fn proc_stats(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // After the ")": state is field 0, utime 11, stime 12 (fields 14 and 15 of stat(5)).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (cpu, field("VmRSS:") * 1024, field("Threads:"))
}

/// Established TCP connections of `pid` to `port` (any address).
fn tcp_connections(pid: u32, port: u16) -> usize {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().to_string();
                if let Some(i) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let remote_port = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // st 01: ESTABLISHED
            if remote_port == Some(port) && f[3] == "01" && inodes.contains(f[9]) {
                n += 1;
            }
        }
    }
    n
}

/// The controller's /metrics, as (name{labels}, value).
fn scrape(addr: &str) -> Vec<(String, f64)> {
    let body = sluice_testkit::http_get(addr, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum(m: &[(String, f64)], prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn by_label(m: &[(String, f64)], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        if let Some(rest) = k.strip_prefix(name).and_then(|r| r.strip_prefix('{')) {
            let needle = format!("{label}=\"");
            if let Some(i) = rest.find(&needle) {
                let val = &rest[i + needle.len()..];
                let val = &val[..val.find('"').unwrap_or(0)];
                *out.entry(val.to_string()).or_default() += v;
            }
        }
    }
    out
}

fn per_pipeline_series(m: &[(String, f64)]) -> usize {
    m.iter().filter(|(k, _)| k.contains("pipeline=\"")).count()
}

async fn client(path: &str) -> Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    cfg.read_timeout = Some(Duration::from_secs(300));
    Client::try_from(cfg).expect("client")
}

fn pipeline(i: usize, n: usize, run: &str, topic: &str, poll: u64) -> StreamPipeline {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": format!("p{i:05}")},
        "spec": {
            "source": {"bootstrapServers": "placeholder", "topic": topic,
                       "groupId": format!("bench-{run}-{n}-{i}")},
            "sinks": [{"null": {}}],
            "scaling": {"minReplicas": 1, "maxReplicas": 12, "lagPerReplica": 100000,
                        "pollInterval": format!("{poll}s")}
        }
    }))
    .expect("pipeline")
}

/// Each pipeline's latest status lag, and when its first status (with partitions) and each
/// lag value were seen.
#[derive(Default)]
struct Seen {
    first_status: HashMap<String, Instant>,
    lag: HashMap<String, (i64, Instant)>,
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn produce(bootstrap: &str, topics: &[String], partitions: i32, per_partition: usize) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for t in topics {
        for part in 0..partitions {
            for i in 0..per_partition {
                let payload = format!("{i}");
                loop {
                    match p.send(BaseRecord::<(), _>::to(t).partition(part).payload(&payload)) {
                        Ok(()) => break,
                        Err(_) => {
                            p.poll(Duration::from_millis(10));
                        }
                    }
                }
            }
            p.poll(Duration::ZERO);
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

async fn delete_all<K>(api: Api<K>, label: Option<&str>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let lp = match label {
        Some(l) => ListParams::default().labels(l),
        None => ListParams::default(),
    };
    // One DeleteCollection of 10,000 objects can outlast the client's timeout (the API
    // server then stops with part of them deleted): again until none is left.
    for attempt in 1.. {
        if let Err(e) = api.delete_collection(&DeleteParams::default(), &lp).await {
            log(format!("delete_collection (attempt {attempt}): {e}"));
        }
        match api.list(&lp.clone().limit(1)).await {
            Ok(l) if l.items.is_empty() => return,
            Ok(_) => {}
            Err(e) => log(format!("list after delete_collection: {e}")),
        }
        if attempt >= 30 {
            log("objects still left after 30 attempts");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let c = client(&a.kubeconfig).await;
    // The CRD.
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let crd = StreamPipeline::crd();
    crds.patch(
        "streampipelines.sluice.dev",
        &PatchParams::apply("sluice-bench").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "streampipelines.sluice.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established")
    .expect("watch");

    // Shared topics, a few records each to start from.
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let topics: Vec<String> = (0..a.topics)
        .map(|t| format!("bench-op-{run}-{t:03}"))
        .collect();
    log(format!(
        "creating {} topics x {} partitions",
        a.topics, a.partitions
    ));
    for t in &topics {
        sluice_testkit::create_topic(&a.bootstrap, t, a.partitions)
            .await
            .expect("topic");
    }
    let mut produced_per_partition = 2usize;
    {
        let (b, t, p) = (a.bootstrap.clone(), topics.clone(), a.partitions);
        tokio::task::spawn_blocking(move || produce(&b, &t, p, 2))
            .await
            .unwrap();
    }

    for &n in &a.counts {
        let ns = format!("bench-{run}-{n}");
        Api::<Namespace>::all(c.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .expect("namespace");
        // The controller, fresh for each N.
        let port = sluice_testkit::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(&a.controller);
        cmd.args(["--leader-election", "false", "--metrics-addr", &addr])
            .env("KUBECONFIG", &a.kubeconfig)
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_BENCH_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "warn,kube=warn".into()),
            )
            .env("SLUICE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(format!("target/bench/operator-controller-{n}.log")).unwrap(),
            );
        if let Some(q) = &a.api_qps {
            cmd.env("SLUICE_CONTROLLER_API_QPS", q);
        }
        let mut controller: Child = cmd.spawn().expect("controller");
        let pid = controller.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while scrape(&addr).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the controller did not serve /metrics"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (_, rss_start, _) = proc_stats(pid);

        // Watch every pipeline's status.
        let seen = Arc::new(Mutex::new(Seen::default()));
        let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
        let watch = {
            let (seen, api) = (seen.clone(), pipelines.clone());
            tokio::spawn(async move {
                let mut s = watcher(api, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Ok(Some(sp)) = s.try_next().await {
                    let now = Instant::now();
                    let name = sp.name_any();
                    let Some(st) = sp.status else { continue };
                    let mut seen = seen.lock().unwrap();
                    if st.partitions.is_some() {
                        seen.first_status.entry(name.clone()).or_insert(now);
                    }
                    if let Some(l) = st.lag {
                        match seen.lag.get(&name) {
                            Some((old, _)) if *old == l => {}
                            _ => {
                                seen.lag.insert(name, (l, now));
                            }
                        }
                    }
                }
            })
        };

        // 1. Create N pipelines.
        log(format!("N={n}: creating pipelines"));
        let t0 = Instant::now();
        let created = Arc::new(Mutex::new(HashMap::new()));
        futures::stream::iter(0..n)
            .for_each_concurrent(16, |i| {
                let (api, created) = (pipelines.clone(), created.clone());
                let mut sp = pipeline(i, n, &run, &topics[i % topics.len()], a.poll);
                sp.spec.source.bootstrap_servers = a.bootstrap.clone();
                async move {
                    loop {
                        match api.create(&PostParams::default(), &sp).await {
                            Ok(_) => break,
                            Err(kube::Error::Api(e)) if e.code == 409 => break,
                            Err(e) => {
                                log(format!("create: {e}"));
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                    created
                        .lock()
                        .unwrap()
                        .insert(sp.name_any(), Instant::now());
                }
            })
            .await;
        let creation = t0.elapsed();
        log(format!("N={n}: created in {creation:.1?}"));
        let deadline = Instant::now() + Duration::from_secs(1_800);
        loop {
            let k = seen.lock().unwrap().first_status.len();
            if k >= n {
                break;
            }
            if Instant::now() > deadline {
                log(format!(
                    "N={n}: only {k} pipelines have status after 30 min"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let all_status = t0.elapsed();
        let worst_own = {
            let (seen, created) = (seen.lock().unwrap(), created.lock().unwrap());
            seen.first_status
                .iter()
                .filter_map(|(k, t)| Some(t.duration_since(*created.get(k)?).as_secs_f64()))
                .fold(0.0f64, f64::max)
        };
        log(format!("N={n}: every pipeline has status {all_status:.1?} after the first create (worst own {worst_own:.1} s)"));
        let m_created = scrape(&addr);

        // 2. Steady: a poll to settle, then the measurement window.
        tokio::time::sleep(Duration::from_secs(a.poll + 5)).await;
        let m0 = scrape(&addr);
        let (cpu0, _, _) = proc_stats(pid);
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.steady)).await;
        let window = w0.elapsed().as_secs_f64();
        let (cpu1, rss_steady, threads) = proc_stats(pid);
        let load_steady = load_average();
        let m1 = scrape(&addr);
        let kafka_port: u16 = a.bootstrap.rsplit(':').next().unwrap().parse().unwrap();
        let kafka_tcp = tcp_connections(pid, kafka_port);
        let per_min = |a: &[(String, f64)], b: &[(String, f64)], name: &str, label: &str| {
            let (x, y) = (by_label(a, name, label), by_label(b, name, label));
            y.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        ((v - x.get(k).unwrap_or(&0.0)) * 60.0 / window).round(),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let api_steady = per_min(&m0, &m1, "sluice_controller_api_requests_total", "verb");
        let kafka_steady = per_min(
            &m0,
            &m1,
            "sluice_controller_kafka_requests_total",
            "request",
        );
        let cpu_per_min = (cpu1 - cpu0) * 60.0 / window;
        log(format!(
            "N={n}: steady {cpu_per_min:.1} CPU-s/min (machine load {load_steady:.1}), RSS {} MiB, {threads} threads, {kafka_tcp} Kafka TCP connections, API/min {api_steady:?}, Kafka/min {kafka_steady:?}",
            rss_steady >> 20
        ));

        // 3. Lag freshness: records into every partition of every topic; each pipeline's
        //    status must show its topic's new total.
        let per = 5usize;
        let m2 = scrape(&addr);
        let (cpu2, _, _) = proc_stats(pid);
        {
            let (b, t, p) = (a.bootstrap.clone(), topics.clone(), a.partitions);
            tokio::task::spawn_blocking(move || produce(&b, &t, p, per))
                .await
                .unwrap();
        }
        let produced = Instant::now();
        produced_per_partition += per;
        let want = (produced_per_partition * a.partitions as usize) as i64;
        let deadline = produced + Duration::from_secs(a.poll * 4 + 60);
        let fresh: Vec<f64> = loop {
            let done: Vec<f64> = {
                let seen = seen.lock().unwrap();
                seen.lag
                    .values()
                    .filter(|(l, _)| *l >= want)
                    .map(|(_, t)| t.saturating_duration_since(produced).as_secs_f64())
                    .collect()
            };
            if done.len() >= n || Instant::now() > deadline {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let fresh_window = produced.elapsed().as_secs_f64().max(1.0);
        let m3 = scrape(&addr);
        let (cpu3, _, _) = proc_stats(pid);
        let w = (cpu3 - cpu2) * 60.0 / fresh_window;
        let api_fresh: BTreeMap<String, f64> = {
            let (x, y) = (
                by_label(&m2, "sluice_controller_api_requests_total", "verb"),
                by_label(&m3, "sluice_controller_api_requests_total", "verb"),
            );
            y.iter()
                .map(|(k, v)| (k.clone(), v - x.get(k).unwrap_or(&0.0)))
                .collect()
        };
        let (p50, p99, max) = (
            quantile(fresh.clone(), 0.5),
            quantile(fresh.clone(), 0.99),
            quantile(fresh.clone(), 1.0),
        );
        log(format!(
            "N={n}: lag freshness over {} of {n} pipelines: p50 {p50:.1} s, p99 {p99:.1} s, max {max:.1} s (pollInterval {} s); requests meanwhile {api_fresh:?}, {w:.1} CPU-s/min",
            fresh.len(), a.poll
        ));

        // 3b. Freshness of a few among N steady pipelines: records into one topic only, so
        //     only its pipelines' lag moves (one status write each), as when one team's
        //     topic gets records while everyone else's is quiet.
        let one: Vec<String> = (0..n)
            .filter(|i| i % topics.len() == 0)
            .map(|i| format!("p{i:05}"))
            .collect();
        {
            let (b, t, p) = (a.bootstrap.clone(), vec![topics[0].clone()], a.partitions);
            tokio::time::sleep(Duration::from_secs(5)).await;
            tokio::task::spawn_blocking(move || produce(&b, &t, p, per))
                .await
                .unwrap();
        }
        let produced_one = Instant::now();
        let want_one = ((produced_per_partition + per) * a.partitions as usize) as i64;
        let deadline = produced_one + Duration::from_secs(a.poll * 4 + 60);
        let fresh_one: Vec<f64> = loop {
            let done: Vec<f64> = {
                let seen = seen.lock().unwrap();
                one.iter()
                    .filter_map(|name| seen.lag.get(name))
                    .filter(|(l, _)| *l >= want_one)
                    .map(|(_, t)| t.saturating_duration_since(produced_one).as_secs_f64())
                    .collect()
            };
            if done.len() >= one.len() || Instant::now() > deadline {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let (one_p50, one_max) = (
            quantile(fresh_one.clone(), 0.5),
            quantile(fresh_one.clone(), 1.0),
        );
        log(format!(
            "N={n}: lag freshness of one topic's {} pipelines among {n}: p50 {one_p50:.1} s, max {one_max:.1} s ({} answered)",
            one.len(),
            fresh_one.len()
        ));
        // Every other topic gets the same records, so all start the next N level.
        {
            let (b, t, p) = (a.bootstrap.clone(), topics[1..].to_vec(), a.partitions);
            tokio::task::spawn_blocking(move || produce(&b, &t, p, per))
                .await
                .unwrap();
        }
        produced_per_partition += per;

        // 4. Delete every pipeline and its children (no garbage collector runs here).
        log(format!("N={n}: deleting"));
        let td = Instant::now();
        delete_all(pipelines.clone(), None).await;
        let sel = Some("app.kubernetes.io/managed-by=sluice");
        delete_all(Api::<Deployment>::namespaced(c.clone(), &ns), sel).await;
        delete_all(Api::<ConfigMap>::namespaced(c.clone(), &ns), sel).await;
        delete_all(Api::<Service>::namespaced(c.clone(), &ns), sel).await;
        delete_all(Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns), sel).await;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left = per_pipeline_series(&scrape(&addr));
            let conns = sum(&scrape(&addr), "sluice_controller_kafka_connections");
            if (left == 0 && conns == 0.0) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let m4 = scrape(&addr);
        let (_, rss_after, threads_after) = proc_stats(pid);
        let series_left = per_pipeline_series(&m4);
        log(format!(
            "N={n}: deleted in {:.1?}; RSS {} MiB (start {} MiB), {threads_after} threads, {series_left} per-pipeline series left, {} Kafka connections",
            td.elapsed(),
            rss_after >> 20,
            rss_start >> 20,
            sum(&m4, "sluice_controller_kafka_connections")
        ));
        let _ = sum(&m_created, "");
        watch.abort();
        let _ = controller.kill();
        let _ = controller.wait();
        println!(
            "{}",
            json!({
                "n": n, "topics": a.topics, "partitions": a.partitions, "poll_s": a.poll,
                "create_s": creation.as_secs_f64(), "all_status_s": all_status.as_secs_f64(),
                "worst_own_status_s": worst_own,
                "steady_cpu_s_per_min": cpu_per_min, "rss_start_mib": rss_start >> 20,
                "rss_steady_mib": rss_steady >> 20, "threads": threads, "kafka_tcp": kafka_tcp,
                "api_per_min_steady": api_steady, "kafka_per_min_steady": kafka_steady,
                "fresh_n": fresh.len(), "fresh_p50_s": p50, "fresh_p99_s": p99, "fresh_max_s": max,
                "fresh_one_topic_n": fresh_one.len(), "fresh_one_topic_of": one.len(),
                "fresh_one_topic_p50_s": one_p50, "fresh_one_topic_max_s": one_max,
                "api_during_fresh": api_fresh, "cpu_s_per_min_during_fresh": w,
                "rss_after_delete_mib": rss_after >> 20, "series_left": series_left,
                "load_avg_steady": load_steady,
            })
        );
        let _ = Api::<Namespace>::all(c.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    }
    // The topics go too.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", &a.bootstrap)
            .create()
            .expect("admin");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin
        .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
        .await;
}
