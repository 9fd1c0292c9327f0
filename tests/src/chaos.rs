//! The fault harness: each scenario runs real worker processes under a steady load from
//! the generator, injects a fault, and lets an independent auditor (this module's
//! [`Watcher`], which reads the output topics with its own consumer and knows nothing of
//! the worker) count what arrived: records lost (must be 0), duplicates (with the most
//! for one fault), the time to get back to 90% of the offered rate, and peak RSS.
//!
//! `make chaos` runs every scenario at full length (`sluice-chaos --full`) and prints the
//! table RELIABILITY.md holds; the worker's test suite runs the short version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{
    bootstrap, create_topic, free_port, key, parse_seq, payload, postgres_url, produce, unique,
    wait_for, ProduceSpec, TcpProxy, TestRecord, WorkerProcess,
};

pub mod replicated;

/// How long and how hard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// CI: each scenario in well under a minute.
    Short,
    /// `make chaos`: the figures RELIABILITY.md reports.
    Full,
}

/// What one scenario measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// Faults injected.
    pub faults: u32,
    /// Records produced.
    pub records: u64,
    /// Records that never arrived anywhere (output, dead-letter topic or table).
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicates: u64,
    /// The most extra copies attributable to one fault.
    pub max_duplicates_per_fault: u64,
    /// Slowest recovery to 90% of the offered rate after a fault, in seconds.
    pub recovery_s: Option<f64>,
    /// Peak RSS of any worker, MiB.
    pub peak_rss_mib: f64,
    /// Anything worth a line in the report.
    pub note: String,
}

impl Outcome {
    /// One Markdown table row.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} (max {} per fault) | {} | {:.0} | {} |",
            self.name,
            self.faults,
            self.records,
            self.lost,
            self.duplicates,
            self.max_duplicates_per_fault,
            self.recovery_s
                .map_or("n/a".to_string(), |r| format!("{r:.1} s")),
            self.peak_rss_mib,
            self.note
        )
    }
}

/// The table header matching [`Outcome::row`].
pub const TABLE_HEADER: &str = "| scenario | faults | records | lost | duplicates | recovery to 90% | peak RSS MiB | notes |\n|---|---|---|---|---|---|---|---|";

/// Wall-clock milliseconds since the epoch: fault moments, comparable with the output
/// records' timestamps (the sink's producer stamps each record when it sends it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Seen {
    copies: HashMap<u64, u32>,
    /// Output timestamp of each record's first copy.
    first_out: HashMap<u64, i64>,
    /// Input timestamp (the generator's create time) of each record, when the watcher
    /// also reads the input topic.
    produced: HashMap<u64, i64>,
    /// Deliveries per 250 ms of output timestamp.
    buckets: std::collections::BTreeMap<i64, u64>,
    /// Output timestamps of the extra copies.
    dup_times: Vec<i64>,
}

/// The independent auditor: reads topics from the beginning with its own consumer, counts
/// copies of every sequence number, and places every delivery in time by the output
/// record's own timestamp (so the auditor's reading pace does not matter).
pub struct Watcher {
    seen: Arc<Mutex<Seen>>,
    other: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Start reading `topics`.
    pub fn start(topics: &[&str]) -> Self {
        Self::start_with_input(topics, None)
    }

    /// Start reading `topics`, and `input` for when each record was produced (for
    /// end-to-end latency: first output timestamp minus input timestamp).
    pub fn start_with_input(topics: &[&str], input: Option<&str>) -> Self {
        Self::start_on(&bootstrap(), topics, input)
    }

    /// [`Watcher::start_with_input`] on the cluster at `bootstrap`.
    pub fn start_on(bootstrap: &str, topics: &[&str], input: Option<&str>) -> Self {
        use rdkafka::message::Message;
        let mut all: Vec<&str> = topics.to_vec();
        all.extend(input);
        let input = input.map(str::to_string);
        // By assignment, not in a group: the auditor must keep reading through the
        // broker outages the scenarios cause.
        let c = reader_assigned_on(bootstrap, &all);
        let seen: Arc<Mutex<Seen>> = Default::default();
        let other = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, o2, st2) = (seen.clone(), other.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !st2.load(Ordering::Acquire) {
                let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let ts = m.timestamp().to_millis().unwrap_or_else(now_ms);
                let mut s = s2.lock().expect("seen");
                if input.as_deref() == Some(m.topic()) {
                    if let Some(seq) = m.payload().and_then(parse_seq) {
                        s.produced.entry(seq).or_insert(ts);
                    }
                    continue;
                }
                *s.buckets.entry(ts.div_euclid(250)).or_insert(0) += 1;
                match m.payload().and_then(parse_seq) {
                    Some(seq) => {
                        let n = s.copies.entry(seq).or_insert(0);
                        *n += 1;
                        if *n > 1 {
                            s.dup_times.push(ts);
                        } else {
                            s.first_out.insert(seq, ts);
                        }
                    }
                    None => {
                        o2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Watcher {
            seen,
            other,
            stop,
            handle: Some(handle),
        }
    }

    /// Copies seen so far.
    pub fn total(&self) -> u64 {
        let s = self.seen.lock().expect("seen");
        s.copies.values().map(|&n| n as u64).sum()
    }

    /// How many of `expected` have not arrived yet.
    pub fn missing(&self, expected: std::ops::Range<u64>) -> u64 {
        let s = self.seen.lock().expect("seen");
        expected.filter(|q| !s.copies.contains_key(q)).count() as u64
    }

    /// Wait until every one of `expected` arrived (or `timeout`), then stop reading.
    /// Returns (lost, duplicates).
    pub fn finish(&mut self, expected: impl Iterator<Item = u64>, timeout: Duration) -> (u64, u64) {
        let expected: Vec<u64> = expected.collect();
        let deadline = Instant::now() + timeout;
        loop {
            let missing = {
                let s = self.seen.lock().expect("seen");
                expected
                    .iter()
                    .filter(|q| !s.copies.contains_key(q))
                    .count() as u64
            };
            if missing == 0 || Instant::now() > deadline {
                // A little longer for late duplicates.
                std::thread::sleep(Duration::from_secs(2));
                self.stop.store(true, Ordering::Release);
                if let Some(h) = self.handle.take() {
                    let _ = h.join();
                }
                let s = self.seen.lock().expect("seen");
                let total: u64 = s.copies.values().map(|&n| n as u64).sum();
                return (missing, total - s.copies.len() as u64);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Seconds from `fault_ms` until deliveries are back to 90% of `rate` over a second,
    /// if that happens before `until_ms`.
    pub fn recovery(&self, fault_ms: i64, rate: f64, until_ms: i64) -> Option<f64> {
        let s = self.seen.lock().expect("seen");
        let first = fault_ms.div_euclid(250);
        let last = (*s.buckets.keys().next_back()?).min(until_ms.div_euclid(250));
        (first..=last - 3).find_map(|b| {
            let n: u64 = (b..b + 4)
                .map(|k| s.buckets.get(&k).copied().unwrap_or(0))
                .sum();
            (n as f64 >= 0.9 * rate).then(|| ((b * 250 - fault_ms).max(0)) as f64 / 1000.0)
        })
    }

    /// Extra copies delivered between `from_ms` and `to_ms`.
    pub fn duplicates_between(&self, from_ms: i64, to_ms: i64) -> u64 {
        let s = self.seen.lock().expect("seen");
        s.dup_times
            .iter()
            .filter(|&&t| t >= from_ms && t < to_ms)
            .count() as u64
    }

    /// Throughput and latency of the records produced in `[from_ms, to_ms)`: first
    /// deliveries per second in that span (mean and the slowest whole second) and the
    /// end-to-end latency percentiles of those records.
    pub fn window(&self, from_ms: i64, to_ms: i64) -> Window {
        let s = self.seen.lock().expect("seen");
        let mut lat: Vec<i64> = s
            .produced
            .iter()
            .filter(|(_, &p)| p >= from_ms && p < to_ms)
            .filter_map(|(q, &p)| s.first_out.get(q).map(|&o| (o - p).max(0)))
            .collect();
        lat.sort_unstable();
        let pct = |q: f64| -> f64 {
            if lat.is_empty() {
                return f64::NAN;
            }
            lat[((lat.len() - 1) as f64 * q).round() as usize] as f64
        };
        let seconds = (to_ms - from_ms).max(1) as f64 / 1000.0;
        let mut per_second: HashMap<i64, u64> = HashMap::new();
        for &o in s.first_out.values().filter(|&&o| o >= from_ms && o < to_ms) {
            *per_second.entry((o - from_ms) / 1000).or_insert(0) += 1;
        }
        let whole = ((to_ms - from_ms) / 1000).max(1);
        let delivered: u64 = per_second.values().sum();
        let seconds_counts = || (0..whole).map(|k| per_second.get(&k).copied().unwrap_or(0));
        Window {
            seconds,
            records: lat.len() as u64,
            rate: delivered as f64 / seconds,
            slowest_second: seconds_counts().min().unwrap_or(0),
            fastest_second: seconds_counts().max().unwrap_or(0),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
        }
    }

    /// Records read that carried no sequence number.
    pub fn unparsable(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }
}

/// Per-fault figures over `faults` (epoch ms, in order): the most duplicates after one
/// fault, the slowest recovery among the faults that recovered before the next one, and
/// how many did not (the next fault came first).
fn per_fault(w: &Watcher, faults: &[i64], rate: f64) -> (u64, Option<f64>, usize) {
    let mut max_dup = 0;
    let mut recovery: Option<f64> = None;
    let mut unrecovered = 0;
    for (i, &at) in faults.iter().enumerate() {
        let next = faults.get(i + 1).copied().unwrap_or(i64::MAX);
        max_dup = max_dup.max(w.duplicates_between(at, next));
        match w.recovery(at, rate, next) {
            Some(r) => recovery = Some(recovery.map_or(r, |m: f64| m.max(r))),
            None => unrecovered += 1,
        }
    }
    (max_dup, recovery, unrecovered)
}

fn unrecovered_note(unrecovered: usize, faults: usize) -> String {
    if unrecovered == 0 {
        String::new()
    } else {
        format!("; {unrecovered} of {faults} faults struck before the previous had recovered")
    }
}

/// The end of a scenario of repeated faults: wait for the load, audit every record, and
/// make its row; the note gains how many faults struck before the previous had recovered.
fn repeated_faults(
    name: &str,
    gen: std::thread::JoinHandle<()>,
    mut w: Workers,
    mut watcher: Watcher,
    plan: &Plan,
    faults: &[i64],
    note: String,
) -> Outcome {
    gen.join().expect("generator");
    let n = plan.count();
    let peak = w.peak_mib();
    let (lost, duplicates) = watcher.finish(0..n, Duration::from_secs(120));
    let (max_dup, recovery, unrecovered) = per_fault(&watcher, faults, plan.rate);
    w.stop_all();
    Outcome {
        name: name.into(),
        faults: faults.len() as u32,
        records: n,
        lost,
        duplicates,
        max_duplicates_per_fault: max_dup,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!("{note}{}", unrecovered_note(unrecovered, faults.len())),
    }
}

/// A steady generator in the background: `count` records at `rate`/s.
fn generate(topic: &str, count: u64, rate: f64) -> std::thread::JoinHandle<()> {
    generate_sized(topic, count, rate, 100)
}

fn generate_sized(topic: &str, count: u64, rate: f64, size: usize) -> std::thread::JoinHandle<()> {
    generate_on(&bootstrap(), topic, count, rate, size)
}

/// [`generate_sized`] on the cluster at `bootstrap`.
fn generate_on(
    bootstrap: &str,
    topic: &str,
    count: u64,
    rate: f64,
    size: usize,
) -> std::thread::JoinHandle<()> {
    let spec = ProduceSpec {
        bootstrap: bootstrap.to_string(),
        topic: topic.into(),
        from: 0,
        count,
        rate: Some(rate),
        size,
        linger_ms: 5,
    };
    std::thread::spawn(move || produce(&spec, &AtomicU64::new(0)).expect("generator"))
}

fn topics(name: &str, n: usize, partitions: i32) -> Vec<String> {
    let names: Vec<String> = (0..n)
        .map(|i| unique(&format!("chaos-{name}-{i}")))
        .collect();
    let b = bootstrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            for t in &names {
                create_topic(&b, t, partitions).await.expect("topic");
            }
        });
    names
}

/// One worker process of a scenario.
struct Workers {
    bin: String,
    config: String,
    /// More fields of the `server` section (`, name: value`).
    server_extra: String,
    env: Vec<(String, String)>,
    running: Vec<WorkerProcess>,
    peak_rss: u64,
}

impl Workers {
    fn new(bin: &str, input: &str, group: &str, body: &str, env: &[(&str, &str)]) -> Self {
        Self::new_on(&bootstrap(), bin, input, group, body, env)
    }

    fn new_on(
        bootstrap: &str,
        bin: &str,
        input: &str,
        group: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Workers {
            bin: bin.into(),
            server_extra: String::new(),
            config: format!(
                "pipeline: chaos\nsource:\n  bootstrapServers: \"{bootstrap}\"\n  topic: {input}\n  groupId: {group}\n  sessionTimeout: 10s\ncommit: {{interval: 500ms, drainTimeout: 8s}}\n{body}\n"
            ),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            running: Vec::new(),
            peak_rss: 0,
        }
    }

    fn start(&mut self) {
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = format!(
            "{}server: {{listen: \"{addr}\"{}}}\n",
            self.config, self.server_extra
        );
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let w =
            WorkerProcess::start_with_env(&self.bin, &unique("chaos-worker"), &cfg, &addr, &env);
        wait_for(
            "a worker's metrics endpoint",
            Duration::from_secs(30),
            || !w.metrics().is_empty(),
        );
        self.running.push(w);
    }

    fn sample_rss(&mut self) {
        for w in &self.running {
            self.peak_rss = self.peak_rss.max(w.rss_bytes());
        }
    }

    fn kill_one(&mut self) {
        if let Some(mut w) = self.running.pop() {
            self.peak_rss = self.peak_rss.max(w.rss_bytes());
            w.signal("KILL");
            let _ = w.wait(Duration::from_secs(10));
        }
    }

    fn term_one(&mut self) {
        if let Some(mut w) = self.running.pop() {
            self.peak_rss = self.peak_rss.max(w.rss_bytes());
            w.signal("TERM");
            let st = w.wait(Duration::from_secs(40));
            assert!(
                st.is_some_and(|s| s.success()),
                "a worker did not drain and exit 0 on SIGTERM: {st:?}\n{}",
                w.log_tail(30)
            );
        }
    }

    /// Restart every worker that exited by itself (what a Deployment does; an
    /// exactly-once worker exits non-zero after an aborted transaction). Returns how many.
    fn restart_exited(&mut self) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.running.len() {
            if let Some(st) = self.running[i].wait(Duration::ZERO) {
                let dead = self.running.remove(i);
                eprintln!(
                    "[chaos] worker {} exited ({st}); restarting it\n{}",
                    dead.pid(),
                    dead.log_tail(10)
                );
                self.start();
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    fn stop_all(&mut self) {
        while !self.running.is_empty() {
            self.term_one();
        }
    }

    /// One round of a kubelet's liveness probe: GET /healthz on every running worker; one
    /// that failed `threshold` rounds in a row is killed and replaced (what Kubernetes
    /// does). Returns the moments (epoch ms) of the first failure of each restarted worker.
    fn probe(&mut self, failures: &mut Vec<u32>, threshold: u32) -> Vec<i64> {
        failures.resize(self.running.len(), 0);
        let mut first_failures = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let ok = crate::http_status(&self.running[i].metrics_addr, "/healthz") == Some(200);
            failures[i] = if ok { 0 } else { failures[i] + 1 };
            if failures[i] == 1 {
                eprintln!(
                    "[chaos] /healthz of worker {} failed",
                    self.running[i].pid()
                );
            }
            // SLUICE_CHAOS_NO_RESTART=1: only report failed probes (to see whether a
            // worker recovers on its own).
            let restart = std::env::var_os("SLUICE_CHAOS_NO_RESTART").is_none();
            if failures[i] >= threshold && restart {
                let mut dead = self.running.remove(i);
                failures.remove(i);
                eprintln!(
                    "[chaos] liveness: restarting worker {} after {threshold} failed probes\n{}",
                    dead.pid(),
                    dead.log_tail(15)
                );
                dead.signal("KILL");
                let _ = dead.wait(Duration::from_secs(10));
                first_failures
                    .push(now_ms() - i64::from(threshold - 1) * PROBE_PERIOD.as_millis() as i64);
                self.start();
                failures.push(0);
            } else {
                i += 1;
            }
        }
        first_failures
    }

    /// Sum of metric `name` over every running worker.
    fn metric_sum(&self, name: &str) -> f64 {
        self.running.iter().map(|p| p.metric(name, "")).sum()
    }

    fn peak_mib(&self) -> f64 {
        self.peak_rss as f64 / (1 << 20) as f64
    }
}

/// Sleep `d`, sampling RSS every 250 ms.
fn pace(w: &mut Workers, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        w.sample_rss();
        std::thread::sleep(
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        );
    }
}

struct Plan {
    rate: f64,
    seconds: u64,
}

impl Plan {
    fn of(len: Length) -> Self {
        match len {
            Length::Short => Plan {
                rate: 5_000.0,
                seconds: 20,
            },
            Length::Full => Plan {
                rate: 20_000.0,
                seconds: 90,
            },
        }
    }
    fn count(&self) -> u64 {
        (self.rate * self.seconds as f64) as u64
    }
}

fn kafka_sink(out: &str) -> String {
    format!("sinks: [{{kafka: {{topic: {out}}}}}]")
}

/// The common set-up: input and output topics (`chaos-<name>-0/1`), the auditor on the
/// output, the generator's steady load, and one worker relaying input to output.
fn relay_scenario(
    bin: &str,
    name: &str,
    partitions: i32,
    plan: &Plan,
) -> (Vec<String>, Watcher, std::thread::JoinHandle<()>, Workers) {
    let t = topics(name, 2, partitions);
    let watcher = Watcher::start(&[&t[1]]);
    let gen = generate(&t[0], plan.count(), plan.rate);
    let mut w = Workers::new(
        bin,
        &t[0],
        &unique(&format!("chaos-{name}-g")),
        &kafka_sink(&t[1]),
        &[],
    );
    w.start();
    (t, watcher, gen, w)
}

/// 1. SIGKILL at random moments, restarted at once.
pub fn sigkill(bin: &str, len: Length) -> Outcome {
    // Full: 20 kills 15 s apart, so the group (10 s session timeout) can settle between.
    let plan = match len {
        Length::Full => Plan {
            rate: 10_000.0,
            seconds: 315,
        },
        Length::Short => Plan::of(len),
    };
    let kills = if len == Length::Full { 20 } else { 3 };
    let (_, watcher, gen, mut w) = relay_scenario(bin, "kill", 4, &plan);
    let every = Duration::from_secs(plan.seconds) / (kills + 1);
    let mut faults = Vec::new();
    for _ in 0..kills {
        let jitter = rand_ms(every.as_millis() as u64 / 2);
        pace(&mut w, every / 2 + Duration::from_millis(jitter));
        faults.push(now_ms());
        w.kill_one();
        w.start();
    }
    repeated_faults(
        "1. SIGKILL, restarted at once",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        format!(
            "{} records/s offered, commits every 500 ms, session timeout 10 s",
            plan.rate
        ),
    )
}

fn rand_ms(max: u64) -> u64 {
    use rand::Rng;
    rand::rng().random_range(0..=max.max(1))
}

/// 2. The broker stops and starts mid-stream (its data is on disk).
pub fn broker_restart(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let t = topics("broker", 2, 4);
    let mut watcher = Watcher::start(&[&t[1]]);
    let gen = generate(&t[0], plan.count(), plan.rate);
    let mut w = Workers::new(
        bin,
        &t[0],
        &unique("chaos-broker-g"),
        &kafka_sink(&t[1]),
        &[],
    );
    // The default session timeout (30 s), not the harness's 10 s: this scenario measures a
    // restart that the group rides out; a broker away for longer than the session is
    // scenario 9.
    w.config = w
        .config
        .replace("sessionTimeout: 10s", "sessionTimeout: 30s");
    w.start();
    pace(&mut w, Duration::from_secs(plan.seconds / 3));
    let at = Instant::now();
    let fault = now_ms();
    if !crate::local_broker("restart") {
        return skipped(
            "2. broker restart",
            "needs the local broker (scripts/kafka.sh)",
        );
    }
    let down_for = at.elapsed();
    gen.join().expect("generator");
    let peak = w.peak_mib();
    let (lost, dups) = watcher.finish(0..plan.count(), Duration::from_secs(180));
    let recovery = watcher.recovery(fault, plan.rate, i64::MAX);
    w.stop_all();
    // Duplicates the generator itself wrote (its producer retrying across the restart).
    let input = crate::audit(
        &bootstrap(),
        &t[0],
        0,
        plan.count(),
        Duration::from_secs(60),
    )
    .map(|r| r.duplicates)
    .unwrap_or(0);
    Outcome {
        name: "2. broker restart".into(),
        faults: 1,
        records: plan.count(),
        lost,
        duplicates: dups,
        max_duplicates_per_fault: dups,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!(
            "broker away {:.1} s (stop + start), session timeout 30 s; {input} duplicates already in the input",
            down_for.as_secs_f64()
        ),
    }
}

fn pg_exec(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            tokio::spawn(conn);
            client
                .simple_query(sql)
                .await
                .expect(sql)
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
}

/// 3. PostgreSQL unreachable for 30 s (10 s short) behind a proxy that drops everything.
pub fn database_outage(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let outage = if len == Length::Full { 30 } else { 10 };
    let t = topics("pg", 1, 4);
    let url = postgres_url();
    let table = unique("chaos_pg").replace('-', "_");
    pg_exec(
        &url,
        &format!(
            "CREATE TABLE {table} (seq bigint PRIMARY KEY, device text, temp_c double precision)"
        ),
    );
    let host_port = url
        .rsplit('@')
        .next()
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let proxy = TcpProxy::start(&host_port);
    let proxied = url.replace(&host_port, &proxy.addr);
    let gen_started = Instant::now();
    let gen = generate(&t[0], plan.count(), plan.rate);
    let body = format!(
        "sinks: [{{postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device, field: deviceId}}, {{name: temp_c, field: tempC}}]}}}}]\nretry: {{maxBackoff: 2s, maxElapsed: 10m}}"
    );
    let mut w = Workers::new(
        bin,
        &t[0],
        &unique("chaos-pg-g"),
        &body,
        &[("SLUICE_POSTGRES_URL", &proxied)],
    );
    w.start();
    pace(&mut w, Duration::from_secs(plan.seconds / 3));
    proxy.cut();
    pace(&mut w, Duration::from_secs(outage));
    proxy.restore();
    let back = Instant::now();
    // Watch the table while the generator still runs: recovery is measured from here.
    let n = plan.count() as i64;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut recovery = None;
    let count = |sql: &str| -> i64 {
        pg_exec(&url, sql)[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0)
    };
    loop {
        w.sample_rss();
        let rows = count(&format!("SELECT count(*) FROM {table}"));
        if recovery.is_none() && rows > 0 {
            // caught up with the offered load: the table holds what was produced by now
            let produced_by_now = (gen_started.elapsed().as_secs_f64() * plan.rate) as i64;
            if rows >= produced_by_now.min(n) * 9 / 10 {
                recovery = Some(back.elapsed().as_secs_f64());
            }
        }
        if rows >= n || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    gen.join().expect("generator");
    let total = count(&format!("SELECT count(*) FROM {table}"));
    let distinct = count(&format!("SELECT count(DISTINCT seq) FROM {table}"));
    let peak = w.peak_mib();
    w.stop_all();
    Outcome {
        name: format!("3. PostgreSQL unreachable {outage} s"),
        faults: 1,
        records: n as u64,
        lost: (n - distinct).max(0) as u64,
        duplicates: (total - distinct).max(0) as u64,
        max_duplicates_per_fault: (total - distinct).max(0) as u64,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: "redelivered rows absorbed by ON CONFLICT DO NOTHING".into(),
    }
}

/// Scenario 3, first half: the Kafka output unreachable for 30 s (10 s short) while the
/// input is not. The sink talks to the broker through its proxied listener
/// (`scripts/kafka.sh`: port + 6, advertised as port + 7) and the proxy on the advertised
/// port is cut.
pub fn kafka_output_outage(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let outage = if len == Length::Full { 30 } else { 10 };
    let Some((listener, advertised)) = crate::proxied_listener() else {
        return Outcome {
            name: "3. Kafka output unreachable".into(),
            note: "skipped: needs the local broker's proxied listener".into(),
            ..Default::default()
        };
    };
    let proxy = TcpProxy::start_on(&advertised, &listener);
    let t = topics("kout", 2, 4);
    let mut watcher = Watcher::start(&[&t[1]]);
    let gen = generate(&t[0], plan.count(), plan.rate);
    let body = format!(
        "sinks: [{{kafka: {{topic: {}, bootstrapServers: \"{advertised}\"}}}}]",
        t[1]
    );
    let mut w = Workers::new(bin, &t[0], &unique("chaos-kout-g"), &body, &[]);
    w.start();
    pace(&mut w, Duration::from_secs(plan.seconds / 3));
    let fault = now_ms();
    proxy.cut();
    let consumed = |w: &Workers| w.metric_sum("sluice_messages_consumed_total");
    let at_cut = consumed(&w);
    pace(&mut w, Duration::from_secs(outage));
    let at_restore = consumed(&w);
    let held = w.metric_sum("sluice_in_flight_bytes");
    proxy.restore();
    let back = now_ms();
    gen.join().expect("generator");
    let peak = w.peak_mib();
    let (lost, dups) = watcher.finish(0..plan.count(), Duration::from_secs(180));
    let recovery = watcher.recovery(back, plan.rate, i64::MAX);
    let retried = w.metric_sum("sluice_sink_retries_total");
    w.stop_all();
    drop(proxy);
    Outcome {
        name: format!("3. Kafka output unreachable {outage} s"),
        faults: 1,
        records: plan.count(),
        lost,
        duplicates: dups,
        max_duplicates_per_fault: watcher.duplicates_between(fault, i64::MAX),
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!(
            "input readable throughout; {:.0} records consumed during the outage ({:.0} s of input), {:.0} MiB of the 256 MiB in-flight budget held at the restore; {retried:.0} sends retried; recovery counted from the restore",
            at_restore - at_cut,
            (at_restore - at_cut) / plan.rate,
            held / f64::from(1 << 20),
        ),
    }
}

/// 4. 1% malformed records and 1% on which the jq program fails.
pub fn poison(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let t = topics("poison", 3, 4);
    let n = plan.count();
    let mut watcher = Watcher::start(&[&t[1], &t[2]]);
    let input = t[0].clone();
    let gen = std::thread::spawn(move || {
        let records = (0..n).map(|i| TestRecord {
            tombstone: false,
            partition: None,
            key: Some(key(i)),
            value: match i % 100 {
                13 => format!("garbage \"seq\":{i} {{").into_bytes(),
                57 => format!(r#"{{"seq":{i},"deviceId":"dev-x","tempC":"hot"}}"#).into_bytes(),
                _ => payload(i, 100),
            },
        });
        crate::produce_records_at(&input, records, Some(plan.rate));
    });
    let body = format!(
        "processor: {{jq: {{program: '{{seq, device: .deviceId, tempF: ((.tempC | tonumber) * 9 / 5 + 32)}}'}}}}\n{}\ndeadLetter: {{topic: {}}}",
        kafka_sink(&t[1]),
        t[2]
    );
    let mut w = Workers::new(bin, &t[0], &unique("chaos-poison-g"), &body, &[]);
    w.start();
    gen.join().expect("generator");
    pace(&mut w, Duration::from_secs(2));
    let peak = w.peak_mib();
    let (lost, dups) = watcher.finish(0..n, Duration::from_secs(120));
    w.stop_all();
    Outcome {
        name: "4. poison input (1% not JSON, 1% jq errors)".into(),
        faults: (n / 50) as u32,
        records: n,
        lost,
        duplicates: dups,
        max_duplicates_per_fault: 0,
        recovery_s: None,
        peak_rss_mib: peak,
        note: format!(
            "{} dead-lettered with their headers, the rest delivered",
            n / 50
        ),
    }
}

/// 5. Workers 1 -> 4 -> 1 under load; each scale-down is a SIGTERM drain.
pub fn rebalance_storm(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let cycles = if len == Length::Full { 3 } else { 1 };
    let (_, watcher, gen, mut w) = relay_scenario(bin, "storm", 8, &plan);
    let step = Duration::from_secs(plan.seconds) / (cycles * 6 + 1);
    let mut faults = Vec::new();
    for _ in 0..cycles {
        for _ in 0..3 {
            pace(&mut w, step);
            faults.push(now_ms());
            w.start();
        }
        for _ in 0..3 {
            pace(&mut w, step);
            faults.push(now_ms());
            w.term_one();
        }
    }
    repeated_faults(
        "5. rebalance storm 1->4->1",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        format!("{cycles} cycle(s); scale-downs drain on SIGTERM"),
    )
}

/// 6. A slow processor: lag grows while memory stays flat, then it drains.
pub fn slow_sink(bin: &str, len: Length) -> Outcome {
    let t = topics("slow", 2, 4);
    // Offered at 5000/s, processed at about 2000/s (a 1 ms sleep per record on the
    // runtime's two threads): the lag grows while the generator runs, then drains.
    let n: u64 = if len == Length::Full { 60_000 } else { 15_000 };
    let mut watcher = Watcher::start(&[&t[1]]);
    let gen = generate_sized(&t[0], n, 5_000.0, 1000);
    // ~4 workers x 4 partitions x 1 record/ms = about 16k records/s at most
    let body = format!(
        "processor: {{delay: {{perRecord: 1ms}}}}\n{}\nworkers: {{perPartition: 4, queueCapacity: 512}}\nmemory: {{inFlightBytes: 4MiB, fetchBuffer: 1MiB}}",
        kafka_sink(&t[1])
    );
    let mut w = Workers::new(bin, &t[0], &unique("chaos-slow-g"), &body, &[]);
    w.start();
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while watcher.total() < n && Instant::now() < deadline {
        w.sample_rss();
        samples.push(w.running[0].rss_bytes());
        std::thread::sleep(Duration::from_millis(500));
    }
    gen.join().expect("generator");
    let peak = w.peak_mib();
    let (lost, dups) = watcher.finish(0..n, Duration::from_secs(60));
    w.stop_all();
    let mid = &samples[samples.len() / 4..];
    let (lo, hi) = (
        mid.iter().min().copied().unwrap_or(0) as f64 / (1 << 20) as f64,
        mid.iter().max().copied().unwrap_or(0) as f64 / (1 << 20) as f64,
    );
    Outcome {
        name: "6. slow processing, 1 KB records".into(),
        faults: 1,
        records: n,
        lost,
        duplicates: dups,
        max_duplicates_per_fault: 0,
        recovery_s: None,
        peak_rss_mib: peak,
        note: format!(
            "{:.0} MB offered 2.5x faster than processed; RSS {lo:.0}-{hi:.0} MiB over the run ({} samples)",
            n as f64 * 1000.0 / 1e6,
            samples.len()
        ),
    }
}

/// 7. SIGTERM mid-stream, restart: not one duplicate.
pub fn clean_sigterm(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let stops = if len == Length::Full { 5 } else { 2 };
    let (_, watcher, gen, mut w) = relay_scenario(bin, "term", 4, &plan);
    let every = Duration::from_secs(plan.seconds) / (stops + 1);
    let mut faults = Vec::new();
    for _ in 0..stops {
        pace(&mut w, every);
        faults.push(now_ms());
        w.term_one();
        w.start();
    }
    repeated_faults(
        "7. clean SIGTERM, restarted",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        "drain, flush, commit, leave the group".into(),
    )
}

fn skipped(name: &str, why: &str) -> Outcome {
    Outcome {
        name: name.into(),
        note: format!("skipped: {why}"),
        ..Default::default()
    }
}

/// After a fault that may leave a worker wedged: probe /healthz like a kubelet (every
/// 2 s, restart after 15 failures in a row, i.e. 30 s; the operator's probe allows 60 s)
/// until every record arrived or `deadline`.
/// Returns (lost, duplicates, liveness restarts, seconds from the fault to the first
/// failed probe of a restarted worker, seconds until the last record arrived).
fn supervise_until_done(
    w: &mut Workers,
    watcher: &mut Watcher,
    count: u64,
    fault_ms: i64,
    deadline: Duration,
) -> (u64, u64, usize, Option<f64>, f64) {
    let end = Instant::now() + deadline;
    let mut failures = Vec::new();
    let mut restarts = Vec::new();
    while watcher.missing(0..count) > 0 && Instant::now() < end {
        w.sample_rss();
        restarts.extend(w.probe(&mut failures, PROBE_FAILURES));
        std::thread::sleep(PROBE_PERIOD);
    }
    let done_s = (now_ms() - fault_ms) as f64 / 1000.0;
    if watcher.missing(0..count) > 0 {
        for p in &w.running {
            let m = p.metrics();
            let wanted = [
                "sluice_partition_paused",
                "sluice_messages_consumed_total",
                "sluice_assigned_partitions",
                "sluice_fetch_stalled_partitions",
                "sluice_healthy",
                "sluice_rebalances_total",
            ];
            let lines: Vec<&str> = m
                .lines()
                .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
                .collect();
            eprintln!(
                "[chaos] worker {} still missing records; its metrics:\n{}\n/healthz: {:?}",
                p.pid(),
                lines.join("\n"),
                crate::http_get(&p.metrics_addr, "/healthz")
            );
        }
    }
    let (lost, dups) = watcher.finish(0..count, Duration::from_secs(5));
    let detect = restarts
        .first()
        .map(|&t| (t - fault_ms).max(0) as f64 / 1000.0);
    (lost, dups, restarts.len(), detect, done_s)
}

/// The harness's kubelet: probe period and failures in a row before a restart.
const PROBE_PERIOD: Duration = Duration::from_secs(2);
const PROBE_FAILURES: u32 = 15;

fn wedge_note(restarts: usize, detect: Option<f64>, done_s: f64) -> String {
    match detect {
        None if std::env::var_os("SLUICE_CHAOS_NO_RESTART").is_some() => {
            format!("no liveness restarts (disabled); {done_s:.0} s after the fault began")
        }
        None => format!("rejoined on its own; every record delivered {done_s:.0} s after the fault began"),
        Some(d) => format!(
            "{restarts} liveness restart(s), first failed probe {d:.0} s after the fault began; every record delivered {done_s:.0} s after it"
        ),
    }
}

/// Scenario 8: the worker frozen (SIGSTOP) for the session timeout + 5 s, then thawed
/// (SIGCONT): its group session expires while it cannot answer, so it comes back to a
/// lost assignment. It must rejoin and deliver everything, or fail /healthz so that a
/// restart does.
pub fn sigstop(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let (_, mut watcher, gen, mut w) = relay_scenario(bin, "freeze", 4, &plan);
    pace(&mut w, Duration::from_secs(plan.seconds / 4));
    let fault = now_ms();
    let frozen = Duration::from_secs(10 + 5);
    w.running[0].signal("STOP");
    std::thread::sleep(frozen);
    w.running[0].signal("CONT");
    gen.join().expect("generator");
    let (lost, duplicates, restarts, detect, done_s) = supervise_until_done(
        &mut w,
        &mut watcher,
        plan.count(),
        fault,
        Duration::from_secs(120),
    );
    let recovery = watcher.recovery(fault + frozen.as_millis() as i64, plan.rate, i64::MAX);
    let peak = w.peak_mib();
    w.stop_all();
    Outcome {
        name: "8. worker frozen (SIGSTOP) past its session".into(),
        faults: 1,
        records: plan.count(),
        lost,
        duplicates,
        max_duplicates_per_fault: duplicates,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!(
            "frozen {} s with a 10 s session timeout, recovery counted from SIGCONT; {}",
            frozen.as_secs(),
            wedge_note(restarts, detect, done_s)
        ),
    }
}

/// Scenario 9: the broker stopped for twice the session timeout, then started: the
/// consumer's session expires while its commits fail. It must rejoin and deliver everything, or fail
/// /healthz so that a restart does.
pub fn broker_away(bin: &str, len: Length) -> Outcome {
    const NAME: &str = "9. broker away for 2x the session timeout";
    let plan = Plan::of(len);
    let (_, mut watcher, gen, mut w) = relay_scenario(bin, "away", 4, &plan);
    pace(&mut w, Duration::from_secs(plan.seconds / 4));
    let fault = now_ms();
    let at = Instant::now();
    if !crate::local_broker("stop") {
        w.stop_all();
        gen.join().ok();
        return skipped(NAME, "needs the local broker (scripts/kafka.sh)");
    }
    // SLUICE_CHAOS_AWAY_S overrides the 20 s the broker stays stopped (to explore).
    let stopped = std::env::var("SLUICE_CHAOS_AWAY_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 * 10);
    pace(&mut w, Duration::from_secs(stopped));
    assert!(crate::local_broker("start"), "the broker must come back");
    let away = at.elapsed();
    let back = now_ms();
    gen.join().expect("generator");
    let (lost, duplicates, restarts, detect, done_s) = supervise_until_done(
        &mut w,
        &mut watcher,
        plan.count(),
        fault,
        Duration::from_secs(150),
    );
    let recovery = watcher.recovery(back, plan.rate, i64::MAX);
    let peak = w.peak_mib();
    w.stop_all();
    Outcome {
        name: NAME.into(),
        faults: 1,
        records: plan.count(),
        lost,
        duplicates,
        max_duplicates_per_fault: duplicates,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!(
            "broker away {:.1} s (stop, {stopped} s, start) with a 10 s session timeout, recovery counted from the start; {}",
            away.as_secs_f64(),
            wedge_note(restarts, detect, done_s)
        ),
    }
}

/// Scenario 10: the same partitions revoked from a worker and assigned back to it under
/// load, over and over (a second worker joins, takes half, and leaves with a SIGTERM drain): every
/// new incarnation of a partition must consume (W1: an old incarnation's queue handle or
/// a late pause must not silence the new one).
pub fn reassign(bin: &str, len: Length) -> Outcome {
    let cycles: u32 = if len == Length::Full { 50 } else { 3 };
    let plan = Plan {
        rate: 2_000.0,
        seconds: u64::from(cycles) * 9 + 10,
    };
    let partitions = 8;
    let (t, watcher, gen, mut w) = relay_scenario(bin, "reassign", partitions, &plan);
    let consumed = |w: &Workers, p: i32| {
        w.running[0].metric(
            "sluice_messages_consumed_total",
            &format!("partition=\"{p}\""),
        )
    };
    let assigned = |w: &Workers, i: usize| w.running[i].metric("sluice_assigned_partitions", "");
    wait_for(
        "the first worker's assignment",
        Duration::from_secs(30),
        || assigned(&w, 0) == f64::from(partitions),
    );
    let mut faults = Vec::new();
    let (mut reassigned, mut silent) = (0u32, Vec::new());
    for cycle in 0..cycles {
        w.start();
        wait_for(
            "the second worker to take partitions",
            Duration::from_secs(30),
            || assigned(&w, 1) > 0.0,
        );
        pace(&mut w, Duration::from_secs(2));
        let before: Vec<f64> = (0..partitions).map(|p| consumed(&w, p)).collect();
        faults.push(now_ms());
        w.term_one();
        wait_for(
            "the partitions to come back",
            Duration::from_secs(30),
            || assigned(&w, 0) == f64::from(partitions),
        );
        // Every partition the first worker owns again must consume (the input has
        // records for all of them every few milliseconds).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut pending: Vec<i32> = (0..partitions).collect();
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&p| consumed(&w, p) <= before[p as usize]);
            std::thread::sleep(Duration::from_millis(200));
        }
        reassigned += partitions as u32;
        for p in pending {
            eprintln!("[chaos] cycle {cycle}: partition {p} consumed nothing after it came back");
            silent.push((cycle, p));
        }
    }
    let _ = t;
    let mut o = repeated_faults(
        "10. same partitions revoked and assigned back",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        String::new(),
    );
    o.note = format!(
        "{cycles} cycles of a second worker joining and leaving (SIGTERM) under load, 8 partitions; {reassigned} partition incarnations checked, {} consumed nothing within 15 s{}",
        silent.len(),
        o.note
    );
    o.faults = cycles;
    assert!(
        silent.is_empty(),
        "incarnations that never consumed: {silent:?}"
    );
    o
}

/// The process's own share of the worker's stated memory bound (README, "Bounded memory").
pub const FIXED_OVERHEAD_MIB: f64 = 64.0;

/// The largest record batch a fetch can bring whole: the broker's default
/// `message.max.bytes` (1 MiB), which the scenarios' topics keep. Kafka returns a partition's
/// next record batch whole however small the fetch limits are, so librdkafka can hold one
/// such batch per owned partition beyond that partition's share of `fetchBuffer` (a
/// librdkafka producer, like the test's generator, writes batches of up to 1 MB).
pub const MAX_BATCH_MIB: f64 = 1.0;

/// The worker's stated memory bound (README, "Bounded memory"), in MiB: the in-flight budget,
/// plus each Kafka producer's queue (a quarter of the budget each), plus librdkafka's prefetch
/// (twice `fetchBuffer`: the partition queues and one fetch response; plus one record batch
/// of at most [`MAX_BATCH_MIB`] per owned partition, and one in the response), plus
/// [`FIXED_OVERHEAD_MIB`] for the process itself.
pub fn stated_memory_bound_mib(
    budget_mib: f64,
    producers: u32,
    fetch_mib: f64,
    partitions: u32,
) -> f64 {
    budget_mib * (1.0 + 0.25 * f64::from(producers))
        + 2.0 * fetch_mib
        + f64::from(partitions + 1) * MAX_BATCH_MIB
        + FIXED_OVERHEAD_MIB
}

/// Scenario 11: memory with 64 partitions and a stalled sink: the input holds far more than the
/// budget, the Kafka output is unreachable from the start (every output waits in the
/// producer), and peak RSS must stay within the stated bound. Then the output comes back
/// and everything is delivered.
pub fn memory_bound(bin: &str, len: Length) -> Outcome {
    const NAME: &str = "11. 64 partitions, stalled sink: memory";
    let Some((listener, advertised)) = crate::proxied_listener() else {
        return skipped(NAME, "needs the local broker's proxied listener");
    };
    let proxy = TcpProxy::start_on(&advertised, &listener);
    proxy.cut();
    let partitions = 64;
    let t = topics("mem", 2, partitions);
    let (mib_per_partition, budget_mib, watch_s) = match len {
        Length::Full => (4u64, 64u64, 40u64),
        Length::Short => (1, 16, 15),
    };
    let fetch_mib = 8u64;
    let n = u64::from(partitions as u32) * mib_per_partition * 1024;
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: t[0].clone(),
        from: 0,
        count: n,
        rate: None,
        size: 1000,
        linger_ms: 20,
    };
    produce(&spec, &AtomicU64::new(0)).expect("fill the input");
    let mut watcher = Watcher::start(&[&t[1]]);
    let body = format!(
        "sinks: [{{kafka: {{topic: {}, bootstrapServers: \"{advertised}\"}}}}]\nmemory: {{inFlightBytes: {budget_mib}MiB, fetchBuffer: {fetch_mib}MiB}}",
        t[1]
    );
    let mut w = Workers::new(bin, &t[0], &unique("chaos-mem-g"), &body, &[]);
    w.start();
    pace(&mut w, Duration::from_secs(watch_s));
    let held = w.metric_sum("sluice_in_flight_bytes") / f64::from(1 << 20);
    let consumed = w.metric_sum("sluice_messages_consumed_total");
    let peak = w.peak_mib();
    proxy.restore();
    let (lost, duplicates) = watcher.finish(0..n, Duration::from_secs(180));
    w.stop_all();
    let bound = stated_memory_bound_mib(budget_mib as f64, 1, fetch_mib as f64, partitions as u32);
    Outcome {
        name: NAME.into(),
        faults: 1,
        records: n,
        lost,
        duplicates,
        max_duplicates_per_fault: duplicates,
        recovery_s: None,
        peak_rss_mib: peak,
        note: format!(
            "{} MiB of 1 KB records over {partitions} partitions, output unreachable for {watch_s} s; {consumed:.0} records consumed, {held:.0} of the {budget_mib} MiB in-flight budget held; stated bound {bound:.0} MiB (budget x 1.25 + 2 x {fetch_mib} MiB fetchBuffer + {} x {MAX_BATCH_MIB} MiB record batches + {FIXED_OVERHEAD_MIB:.0} MiB)",
            n / 1024,
            partitions + 1,
        ),
    }
}

/// Scenario 12: produce answers from the output broker delayed past the producer's
/// request and message timeouts (`request.timeout.ms` 2 s, `message.timeout.ms` 4 s, answers held
/// 6 s for 10 s), with a dead-letter topic. Counts the copies in the output topic alone:
/// an application re-send after a timeout writes a second copy of an output the broker
/// had written (D1); librdkafka's idempotent retries never do.
pub fn slow_acks(bin: &str, len: Length) -> Outcome {
    const NAME: &str = "12. output answers delayed past the producer timeouts";
    let Some((listener, advertised)) = crate::proxied_listener() else {
        return skipped(NAME, "needs the local broker's proxied listener");
    };
    let proxy = TcpProxy::start_on(&advertised, &listener);
    let plan = Plan {
        rate: 2_000.0,
        seconds: if len == Length::Full { 60 } else { 25 },
    };
    let t = topics("acks", 3, 4);
    let mut outputs = Watcher::start(&[&t[1]]);
    let mut everywhere = Watcher::start(&[&t[1], &t[2]]);
    let gen = generate(&t[0], plan.count(), plan.rate);
    let body = format!(
        "sinks: [{{kafka: {{topic: {}, bootstrapServers: \"{advertised}\", producerProperties: {{request.timeout.ms: \"2000\", message.timeout.ms: \"4000\"}}}}}}]\ndeadLetter: {{topic: {}}}",
        t[1], t[2]
    );
    let mut w = Workers::new(bin, &t[0], &unique("chaos-acks-g"), &body, &[]);
    w.start();
    pace(&mut w, Duration::from_secs(plan.seconds / 4));
    let fault = now_ms();
    proxy.delay_responses(Duration::from_secs(6));
    pace(&mut w, Duration::from_secs(10));
    proxy.delay_responses(Duration::ZERO);
    gen.join().expect("generator");
    let (lost, _) = everywhere.finish(0..plan.count(), Duration::from_secs(180));
    let (_, out_dups) = outputs.finish(0..plan.count(), Duration::from_secs(5));
    let letters = w.metric_sum("sluice_dead_letters_total");
    let retried = w.metric_sum("sluice_sink_retries_total");
    let peak = w.peak_mib();
    w.stop_all();
    Outcome {
        name: NAME.into(),
        faults: 1,
        records: plan.count(),
        lost,
        duplicates: out_dups,
        max_duplicates_per_fault: outputs.duplicates_between(fault, i64::MAX),
        recovery_s: None,
        peak_rss_mib: peak,
        note: format!(
            "duplicates counted in the output topic alone; {retried:.0} outputs re-sent by the sink, {letters:.0} dead-lettered (timed out: possibly written as well)"
        ),
    }
}

/// One scenario: the worker binary and the length, to what it measured.
pub type Scenario = fn(&str, Length) -> Outcome;

/// Every scenario in order, with the short name `sluice-chaos` selects it by.
pub const SCENARIOS: [(&str, Scenario); 16] = [
    ("sigkill", sigkill),
    ("broker", broker_restart),
    ("kafka-output", kafka_output_outage),
    ("postgres", database_outage),
    ("poison", poison),
    ("storm", rebalance_storm),
    ("slow", slow_sink),
    ("sigterm", clean_sigterm),
    ("sigstop", sigstop),
    ("broker-away", broker_away),
    ("reassign", reassign),
    ("memory", memory_bound),
    ("slow-acks", slow_acks),
    ("eos-sigkill", eos_sigkill),
    ("eos-broker", eos_broker_restart),
    ("eos-storm", eos_rebalance_storm),
];

/// Throughput and latency over one span of a run (see [`Watcher::window`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    /// Length of the span.
    pub seconds: f64,
    /// Records produced in the span that were delivered (the latency sample).
    pub records: u64,
    /// First deliveries per second in the span.
    pub rate: f64,
    /// First deliveries in the span's slowest whole second.
    pub slowest_second: u64,
    /// First deliveries in the span's fastest whole second (catch-up speed).
    pub fastest_second: u64,
    /// End-to-end latency percentiles (ms), produce to first delivery.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
}

/// One fault benchmark: the same run's steady span next to its span with faults.
#[derive(Clone, Debug)]
pub struct FaultBench {
    /// What the faults were.
    pub name: String,
    /// Records per second offered throughout.
    pub offered: f64,
    /// Before the first fault: after a 5 s warm-up, up to 2 s before the fault (records
    /// produced just before it wait for its recovery).
    pub steady: Window,
    /// From the first fault until the generator stops.
    pub faults: Window,
    /// Records lost (must be 0) and duplicated over the whole run.
    pub lost: u64,
    /// See `lost`.
    pub duplicates: u64,
}

impl FaultBench {
    /// Two Markdown table rows (steady, faults) matching [`FAULT_BENCH_HEADER`].
    pub fn rows(&self) -> String {
        let row = |span: &str, w: &Window| {
            format!(
                "| {} | {span} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} |",
                self.name,
                w.seconds,
                self.offered,
                w.rate,
                w.slowest_second,
                w.fastest_second,
                w.p50_ms,
                w.p99_ms,
                w.max_ms
            )
        };
        format!(
            "{}\n{}",
            row("steady", &self.steady),
            row("faults", &self.faults)
        )
    }
}

/// The table header matching [`FaultBench::rows`].
pub const FAULT_BENCH_HEADER: &str = "| faults | span | seconds | offered/s | delivered/s | slowest second | fastest second | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|---|---|";

/// The common shape of a fault benchmark: 100-byte records at `rate` for `steady` seconds
/// (the first 5 a warm-up), then `fault_phase` runs the faults, then 10 s more.
fn fault_bench(
    bin: &str,
    name: &str,
    rate: f64,
    steady: u64,
    fault_span: Duration,
    fault_phase: impl FnOnce(&mut Workers),
) -> FaultBench {
    let seconds = steady + fault_span.as_secs() + 10;
    let count = (rate * seconds as f64) as u64;
    let t = topics("bench", 2, 8);
    let mut watcher = Watcher::start_with_input(&[&t[1]], Some(&t[0]));
    let mut w = Workers::new(
        bin,
        &t[0],
        &unique("chaos-bench-g"),
        &kafka_sink(&t[1]),
        &[],
    );
    w.start();
    let start = now_ms();
    let gen = generate(&t[0], count, rate);
    pace(&mut w, Duration::from_secs(steady));
    let first_fault = now_ms();
    fault_phase(&mut w);
    gen.join().expect("generator");
    let end = now_ms();
    let (lost, duplicates) = watcher.finish(0..count, Duration::from_secs(180));
    w.stop_all();
    FaultBench {
        name: name.into(),
        offered: rate,
        steady: watcher.window(start + 5_000, first_fault - 2_000),
        faults: watcher.window(first_fault, end),
        lost,
        duplicates,
    }
}

/// Benchmark under scenario 1: a SIGKILL every 15 s (restarted at once), 4 of them.
pub fn bench_sigkill(bin: &str, rate: f64) -> FaultBench {
    fault_bench(
        bin,
        "SIGKILL every 15 s (x4)",
        rate,
        20,
        Duration::from_secs(60),
        |w| {
            for _ in 0..4 {
                w.kill_one();
                w.start();
                pace(w, Duration::from_secs(15));
            }
        },
    )
}

/// Benchmark under scenario 5: workers 1 -> 4 -> 1 twice, a step every 5 s, each
/// scale-down a SIGTERM drain.
pub fn bench_storm(bin: &str, rate: f64) -> FaultBench {
    fault_bench(
        bin,
        "rebalance storm 1->4->1 (x2)",
        rate,
        20,
        Duration::from_secs(60),
        |w| {
            for _ in 0..2 {
                for _ in 0..3 {
                    w.start();
                    pace(w, Duration::from_secs(5));
                }
                for _ in 0..3 {
                    w.term_one();
                    pace(w, Duration::from_secs(5));
                }
            }
        },
    )
}

/// Sleep `d` like [`pace`], restarting workers that exited by themselves.
fn pace_supervised(w: &mut Workers, d: Duration, restarts: &mut usize) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        *restarts += w.restart_exited();
        pace(
            w,
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        );
    }
}

/// The transaction window of the exactly-once scenarios.
pub const EOS_WINDOW_MS: u64 = 100;

/// An exactly-once relay: input, output and dead-letter topics (`chaos-<name>-0/1/2`),
/// the auditor (`read_committed`, see [`crate::reader_assigned`]) on the output and the
/// dead-letter topic, the generator's load, and one worker.
fn eos_scenario(
    bin: &str,
    name: &str,
    partitions: i32,
    plan: &Plan,
) -> (Watcher, std::thread::JoinHandle<()>, Workers) {
    let t = topics(name, 3, partitions);
    let watcher = Watcher::start(&[&t[1], &t[2]]);
    let gen = generate(&t[0], plan.count(), plan.rate);
    let body = format!(
        "sinks: [{{kafka: {{topic: {}}}}}]\ndeadLetter: {{topic: {}}}\ndelivery: {{guarantee: exactly-once, transactionWindow: {EOS_WINDOW_MS}ms}}",
        t[1], t[2]
    );
    let mut w = Workers::new(bin, &t[0], &unique(&format!("chaos-{name}-g")), &body, &[]);
    w.start();
    (watcher, gen, w)
}

/// The end of an exactly-once scenario: wait for the load, keep restarting workers that
/// exit (as a Deployment would) until every record arrived, audit, make the row.
#[allow(clippy::too_many_arguments)]
fn eos_finish(
    name: &str,
    gen: std::thread::JoinHandle<()>,
    mut w: Workers,
    mut watcher: Watcher,
    plan: &Plan,
    faults: &[i64],
    mut restarts: usize,
    note: String,
) -> Outcome {
    gen.join().expect("generator");
    let n = plan.count();
    let end = Instant::now() + Duration::from_secs(180);
    while watcher.missing(0..n) > 0 && Instant::now() < end {
        pace_supervised(&mut w, Duration::from_millis(500), &mut restarts);
    }
    let peak = w.peak_mib();
    let (lost, duplicates) = watcher.finish(0..n, Duration::from_secs(5));
    let (max_dup, recovery, unrecovered) = per_fault(&watcher, faults, plan.rate);
    w.stop_all();
    Outcome {
        name: name.into(),
        faults: faults.len() as u32,
        records: n,
        lost,
        duplicates,
        max_duplicates_per_fault: max_dup,
        recovery_s: recovery,
        peak_rss_mib: peak,
        note: format!(
            "{note}; {restarts} worker exits after an aborted transaction{}",
            unrecovered_note(unrecovered, faults.len())
        ),
    }
}

/// E1. exactly-once: SIGKILL at random moments, restarted at once; a `read_committed`
/// auditor must see every record once.
pub fn eos_sigkill(bin: &str, len: Length) -> Outcome {
    let plan = match len {
        Length::Full => Plan {
            rate: 10_000.0,
            seconds: 315,
        },
        Length::Short => Plan::of(len),
    };
    let kills = if len == Length::Full { 20 } else { 3 };
    let (watcher, gen, mut w) = eos_scenario(bin, "eoskill", 4, &plan);
    let every = Duration::from_secs(plan.seconds) / (kills + 1);
    let mut faults = Vec::new();
    let mut restarts = 0;
    for _ in 0..kills {
        let jitter = rand_ms(every.as_millis() as u64 / 2);
        pace_supervised(
            &mut w,
            every / 2 + Duration::from_millis(jitter),
            &mut restarts,
        );
        faults.push(now_ms());
        w.kill_one();
        w.start();
    }
    eos_finish(
        "E1. exactly-once: SIGKILL, restarted at once",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        restarts,
        format!(
            "{} records/s offered, transaction window {EOS_WINDOW_MS} ms, session timeout 10 s",
            plan.rate
        ),
    )
}

/// E2. exactly-once: the broker stops and starts mid-stream (needs a broker of one's own:
/// see `local_broker`).
pub fn eos_broker_restart(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let (watcher, gen, mut w) = eos_scenario(bin, "eosbroker", 4, &plan);
    let mut restarts = 0;
    pace_supervised(&mut w, Duration::from_secs(plan.seconds / 3), &mut restarts);
    let at = Instant::now();
    let fault = now_ms();
    if !crate::local_broker("restart") {
        return skipped(
            "E2. exactly-once: broker restart",
            "needs the local broker (scripts/kafka.sh)",
        );
    }
    let down_for = at.elapsed();
    eos_finish(
        "E2. exactly-once: broker restart",
        gen,
        w,
        watcher,
        &plan,
        &[fault],
        restarts,
        format!(
            "broker away {:.1} s (stop + start), transaction window {EOS_WINDOW_MS} ms",
            down_for.as_secs_f64()
        ),
    )
}

/// E3. exactly-once: workers 1 -> 4 -> 1 under load; each scale-down a SIGTERM drain.
pub fn eos_rebalance_storm(bin: &str, len: Length) -> Outcome {
    let plan = Plan::of(len);
    let cycles = if len == Length::Full { 3 } else { 1 };
    let (watcher, gen, mut w) = eos_scenario(bin, "eosstorm", 8, &plan);
    let step = Duration::from_secs(plan.seconds) / (cycles * 6 + 1);
    let mut faults = Vec::new();
    let mut restarts = 0;
    for _ in 0..cycles {
        for _ in 0..3 {
            pace_supervised(&mut w, step, &mut restarts);
            faults.push(now_ms());
            w.start();
        }
        for _ in 0..3 {
            pace_supervised(&mut w, step, &mut restarts);
            faults.push(now_ms());
            w.term_one();
        }
    }
    eos_finish(
        "E3. exactly-once: rebalance storm 1->4->1",
        gen,
        w,
        watcher,
        &plan,
        &faults,
        restarts,
        format!("{cycles} cycle(s); scale-downs drain and commit their transaction on SIGTERM"),
    )
}

/// [`crate::reader_assigned`] on the cluster at `bootstrap`: every partition of `topics`
/// from the beginning, by assignment, `read_committed`.
fn reader_assigned_on(bootstrap: &str, topics: &[&str]) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("auditor"))
        .set("enable.auto.commit", "false")
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
