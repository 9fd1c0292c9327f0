//! Fault scenarios on a replicated cluster (three KRaft nodes, replication factor 3,
//! `min.insync.replicas=2`: [`crate::replicated`]), each under both delivery guarantees,
//! with the worker's default settings (session timeout 30 s) and a kubelet of the
//! harness's own: a worker that exits is started again, one whose `/healthz` fails 15
//! probes in a row (2 s apart) is killed and started again. Every such start is a *worker
//! restart*; the target for a broker fault is none. The independent auditor reads the
//! output and dead-letter topics with `read_committed`.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use super::{
    generate_on, now_ms, pace, per_fault, unrecovered_note, Length, Outcome, Plan, Watcher,
    Workers, PROBE_FAILURES, PROBE_PERIOD,
};

pub use self::Guarantee::{AtLeastOnce, ExactlyOnce};
use crate::replicated::{cluster, Cluster, NODES};
use crate::{key, payload, postgres_url, unique, TcpProxy};

/// What one replicated scenario measured: the common figures and the worker restarts
/// (exits, and kills after failed liveness probes).
#[derive(Clone, Debug)]
pub struct Measured {
    /// The common figures.
    pub outcome: Outcome,
    /// Worker restarts.
    pub restarts: u32,
    /// Records that went to the dead-letter topic.
    pub dead_lettered: u64,
}

impl Measured {
    /// One Markdown row of [`TABLE_HEADER`].
    pub fn row(&self) -> String {
        let o = &self.outcome;
        format!(
            "| {} | {} | {} | {} | {} (max {} per fault) | {} | {} | {} |",
            o.name,
            o.faults,
            o.records,
            o.lost,
            o.duplicates,
            o.max_duplicates_per_fault,
            self.restarts,
            o.recovery_s
                .map_or("n/a".to_string(), |r| format!("{r:.1} s")),
            o.note
        )
    }
}

/// The table header matching [`Measured::row`].
pub const TABLE_HEADER: &str = "| scenario | faults | records | lost | duplicates | worker restarts | recovery to 90% | notes |\n|---|---|---|---|---|---|---|---|";

/// The delivery guarantee of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarantee {
    /// `at-least-once`.
    AtLeastOnce,
    /// `exactly-once`.
    ExactlyOnce,
}

impl Guarantee {
    fn name(self) -> &'static str {
        match self {
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::ExactlyOnce => "exactly-once",
        }
    }
}

/// One scenario under way: its topics, load, workers and auditors.
struct Run {
    name: String,
    cluster: &'static Cluster,
    input: String,
    output: String,
    dlq: String,
    group: String,
    plan: Plan,
    watcher: Watcher,
    letters: Watcher,
    gen: Option<std::thread::JoinHandle<()>>,
    w: Workers,
    failures: Vec<u32>,
    restarts: usize,
    faults: Vec<i64>,
}

fn plan(len: Length) -> Plan {
    match len {
        Length::Short => Plan {
            rate: 2_000.0,
            seconds: 20,
        },
        Length::Full => Plan {
            rate: 5_000.0,
            seconds: 90,
        },
    }
}

impl Run {
    /// Topics (`partitions` each; the output `output_config`), the auditors, the load
    /// (unless `load` is false: the scenario makes its own) and one worker with `body`
    /// added to the delivery, sinks and dead-letter settings.
    #[allow(clippy::too_many_arguments)]
    fn start(
        bin: &str,
        name: &str,
        g: Guarantee,
        partitions: i32,
        plan: Plan,
        output_config: &[(&str, &str)],
        body: &str,
        server_extra: &str,
        load: bool,
    ) -> Run {
        let c = cluster();
        let short = name.split('.').next().unwrap_or(name).trim();
        let input = unique(&format!("rep{short}-in"));
        let output = unique(&format!("rep{short}-out"));
        let dlq = unique(&format!("rep{short}-dlq"));
        c.create_topic(&input, partitions, &[]);
        c.create_topic(&output, partitions, output_config);
        c.create_topic(&dlq, 1, &[]);
        let watcher = Watcher::start_on(c.bootstrap(), &[&output, &dlq], None);
        let letters = Watcher::start_on(c.bootstrap(), &[&dlq], None);
        let gen = load.then(|| generate_on(c.bootstrap(), &input, plan.count(), plan.rate, 100));
        let group = unique(&format!("rep{short}-g"));
        let config = format!(
            "sinks: [{{kafka: {{topic: {output}}}}}]\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: {}}}\n{body}",
            g.name()
        );
        let mut w = Workers::new_on(c.bootstrap(), bin, &input, &group, &config, &[]);
        // The defaults: a 30 s session, commits every second, a 10 s drain.
        w.config = w
            .config
            .replace("  sessionTimeout: 10s\n", "")
            .replace("commit: {interval: 500ms, drainTimeout: 8s}\n", "");
        w.server_extra = server_extra.to_string();
        w.start();
        Run {
            name: format!("{name} ({})", g.name()),
            cluster: c,
            input,
            output,
            dlq,
            group,
            plan,
            watcher,
            letters,
            gen,
            w,
            failures: Vec::new(),
            restarts: 0,
            faults: Vec::new(),
        }
    }

    /// Let `d` pass like a Deployment and a kubelet would: restart exited workers and
    /// workers whose liveness probe keeps failing, counting each.
    fn supervise(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.restarts += self.w.restart_exited();
            self.restarts += self.w.probe(&mut self.failures, PROBE_FAILURES).len();
            pace(
                &mut self.w,
                PROBE_PERIOD.min(end.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Supervise until the first output record arrives (the worker joined its group and
    /// delivers), or fail after 60 s: a fault must strike a pipeline under way, whatever
    /// the worker's start-up took on a busy machine, never one still joining.
    fn await_flowing(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.watcher.total() == 0 {
            assert!(
                Instant::now() < deadline,
                "{}: no output within 60 s of the worker's start",
                self.name
            );
            self.supervise(Duration::from_secs(1));
        }
    }

    /// A fault now.
    fn fault(&mut self) {
        self.faults.push(now_ms());
    }

    /// Wait for the load, then supervise until every record arrived (or 5 minutes),
    /// audit, and make the row.
    fn finish(mut self, count: u64, note: String) -> Measured {
        if let Some(g) = self.gen.take() {
            while !g.is_finished() {
                self.supervise(Duration::from_secs(1));
            }
            g.join().expect("generator");
        }
        let produced = now_ms();
        let end = Instant::now() + Duration::from_secs(300);
        while self.watcher.missing(0..count) > 0 && Instant::now() < end {
            self.supervise(Duration::from_secs(1));
        }
        let done = now_ms();
        let peak = self.w.peak_mib();
        let (lost, duplicates) = self.watcher.finish(0..count, Duration::from_secs(5));
        let letters = self.letters.total();
        self.letters.finish(0..0, Duration::ZERO);
        let (max_dup, recovery, unrecovered) =
            per_fault(&self.watcher, &self.faults, self.plan.rate);

        self.w.stop_all();
        Measured {
            outcome: Outcome {
                name: self.name,
                faults: self.faults.len() as u32,
                records: count,
                lost,
                duplicates,
                max_duplicates_per_fault: max_dup,
                recovery_s: recovery,
                peak_rss_mib: peak,
                note: format!(
                    "{note}; {letters} dead-lettered; drained {:.1} s after the last record was produced{}",
                    (done - produced).max(0) as f64 / 1000.0,
                    unrecovered_note(unrecovered, self.faults.len())
                ),
            },
            restarts: self.restarts as u32,
            dead_lettered: letters,
        }
    }
}

/// How long a killed node stays down: the cluster needs about 9 s to declare it dead
/// (`broker.session.timeout.ms`), so its partitions move to another leader first.
fn down_for(len: Length) -> Duration {
    match len {
        Length::Short => Duration::from_secs(10),
        Length::Full => Duration::from_secs(15),
    }
}

/// Bring node `n` back and wait until every replica is in sync again (the next fault
/// hits a healthy cluster).
fn restore(r: &mut Run, n: i32) {
    r.cluster.start_node(n);
    let (input, output, dlq) = (r.input.clone(), r.output.clone(), r.dlq.clone());
    let topics = [input.as_str(), output.as_str(), dlq.as_str()];
    let deadline = Instant::now() + Duration::from_secs(120);
    while r.cluster.ready(&topics).is_err() && Instant::now() < deadline {
        r.supervise(Duration::from_secs(1));
    }
    r.cluster.wait_ready(&topics, Duration::from_secs(1));
}

/// R1. A partition leader SIGKILLed, on a different node each time (1 kill short, 3 full),
/// each down 12-15 s, under load.
pub fn leader_kill(bin: &str, len: Length, g: Guarantee) -> Measured {
    let kills = if len == Length::Full { 3 } else { 1 };
    let mut r = Run::start(
        bin,
        "R1. partition leader SIGKILLed",
        g,
        4,
        plan(len),
        &[],
        "",
        "",
        true,
    );
    r.await_flowing();
    let gap = Duration::from_secs(r.plan.seconds) / (kills + 1) as u32;
    let mut killed = Vec::new();
    for i in 0..kills {
        r.supervise(
            gap.saturating_sub(down_for(len))
                .max(Duration::from_secs(5)),
        );
        let node = (0..4)
            .filter_map(|p| r.cluster.leader(&r.input, (p + i) % 4))
            .find(|n| !killed.contains(n))
            .or_else(|| r.cluster.leader(&r.input, 0))
            .expect("a leader");
        killed.push(node);
        r.fault();
        r.cluster.kill(node);
        r.supervise(down_for(len));
        restore(&mut r, node);
    }
    let n = r.plan.count();
    r.finish(
        n,
        format!(
            "{} records/s; killed node(s) {killed:?}, each down {} s",
            r_rate(len),
            down_for(len).as_secs()
        ),
    )
}

fn r_rate(len: Length) -> f64 {
    plan(len).rate
}

/// R2. The node coordinating the worker's consumer group SIGKILLed.
pub fn coordinator_kill(bin: &str, len: Length, g: Guarantee) -> Measured {
    let mut r = Run::start(
        bin,
        "R2. group coordinator SIGKILLed",
        g,
        4,
        plan(len),
        &[],
        "",
        "",
        true,
    );
    r.await_flowing();
    r.supervise(Duration::from_secs(r.plan.seconds / 3));
    let node = r
        .cluster
        .group_coordinator(&r.group)
        .expect("the group's coordinator");
    r.fault();
    r.cluster.kill(node);
    r.supervise(down_for(len));
    restore(&mut r, node);
    let n = r.plan.count();
    r.finish(
        n,
        format!(
            "killed node {node} (the group's coordinator), down {} s",
            down_for(len).as_secs()
        ),
    )
}

/// R3. Every node restarted cleanly, one after the other (a rolling upgrade).
pub fn rolling_restart(bin: &str, len: Length, g: Guarantee) -> Measured {
    let mut r = Run::start(
        bin,
        "R3. rolling restart",
        g,
        4,
        plan(len),
        &[],
        "",
        "",
        true,
    );
    r.await_flowing();
    r.supervise(Duration::from_secs(10));
    for n in NODES {
        r.fault();
        r.cluster.stop_node(n);
        restore(&mut r, n);
        r.supervise(Duration::from_secs(5));
    }
    let n = r.plan.count();
    r.finish(
        n,
        "each node stopped (SIGTERM) and started again in turn".into(),
    )
}

/// R4. Two of three nodes down for 20 s: below `min.insync.replicas`, outputs (and the
/// input's producer) wait; nothing may be dead-lettered.
pub fn two_down(bin: &str, len: Length, g: Guarantee) -> Measured {
    let mut r = Run::start(
        bin,
        "R4. two of three nodes down",
        g,
        4,
        plan(len),
        &[],
        "",
        "",
        true,
    );
    r.await_flowing();
    r.supervise(Duration::from_secs(r.plan.seconds / 3));
    r.fault();
    let (a, b) = (NODES[1], NODES[2]);
    r.cluster.kill(a);
    r.cluster.kill(b);
    r.supervise(Duration::from_secs(20));
    r.cluster.start_node(a);
    restore(&mut r, b);
    let n = r.plan.count();
    r.finish(n, format!("nodes {a} and {b} SIGKILLed for 20 s"))
}

/// R5. Partitions added to the input mid-stream (4 -> 8): picked up at the worker's next
/// metadata refresh (`topic.metadata.refresh.interval.ms`, 30 s by default) and read from
/// their first record.
pub fn added_partitions(bin: &str, len: Length, g: Guarantee) -> Measured {
    let plan = plan(len);
    let mut r = Run::start(
        bin,
        "R5. partitions added to the input",
        g,
        4,
        plan,
        &[],
        "",
        "",
        false,
    );
    let (b, input, count, rate) = (
        r.cluster.bootstrap().to_string(),
        r.input.clone(),
        r.plan.count(),
        r.plan.rate,
    );
    // The generator learns of new partitions within a second.
    r.gen = Some(std::thread::spawn(move || {
        generate_keyed(&b, &input, count, rate).expect("generator")
    }));
    r.await_flowing();
    r.supervise(Duration::from_secs(r.plan.seconds / 3));
    r.fault();
    r.cluster.add_partitions(&r.input, 8);
    r.supervise(Duration::from_secs(5));
    r.finish(count, "4 partitions grown to 8 under load".into())
}

/// A steady generator with the sequence-numbered records of `crate::produce`, keyed, whose
/// producer refreshes its metadata every second (so it writes to added partitions at once).
fn generate_keyed(bootstrap: &str, topic: &str, count: u64, rate: f64) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()?;
    let start = Instant::now();
    let sent = AtomicU64::new(0);
    for seq in 0..count {
        let due = start + Duration::from_secs_f64(seq as f64 / rate);
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
        let (k, v) = (key(seq), payload(seq, 100));
        let mut rec = BaseRecord::to(topic).key(&k).payload(&v);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    p.flush(Duration::from_secs(300))?;
    Ok(())
}

/// R6. The input is written in transactions of 100 records; one transaction stays open
/// for 40 s, past a `fetchStallTimeout` of 20 s (a `read_committed` worker has nothing
/// to fetch meanwhile: not a wedge), then commits.
pub fn transactional_upstream(bin: &str, len: Length, g: Guarantee) -> Measured {
    let plan = plan(len);
    let mut r = Run::start(
        bin,
        "R6. transactional upstream, one transaction open 40 s",
        g,
        4,
        plan,
        &[],
        "",
        ", fetchStallTimeout: 20s",
        false,
    );
    let (b, input, count, rate) = (
        r.cluster.bootstrap().to_string(),
        r.input.clone(),
        r.plan.count(),
        r.plan.rate,
    );
    let open_at = count / 3;
    r.gen = Some(std::thread::spawn(move || {
        generate_transactional(&b, &input, count, rate, open_at).expect("generator")
    }));
    r.faults
        .push(now_ms() + (open_at as f64 / rate * 1000.0) as i64);
    r.finish(
        count,
        format!(
            "transactions of 100; the one from record {open_at} open 40 s; fetchStallTimeout 20 s"
        ),
    )
}

fn generate_transactional(
    bootstrap: &str,
    topic: &str,
    count: u64,
    rate: f64,
    open_at: u64,
) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", unique("upstream"))
            .set("transaction.timeout.ms", "120000")
            .set("linger.ms", "5")
            .create()?;
    p.init_transactions(Duration::from_secs(60))?;
    let start = Instant::now();
    let mut seq = 0;
    while seq < count {
        p.begin_transaction()?;
        let first = seq;
        while seq < count && seq < first + 100 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
            let (k, v) = (key(seq), payload(seq, 100));
            let mut rec = BaseRecord::to(topic).key(&k).payload(&v);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            seq += 1;
        }
        if first <= open_at && open_at < seq {
            std::thread::sleep(Duration::from_secs(40));
        }
        p.commit_transaction(Duration::from_secs(120))?;
    }
    Ok(())
}

/// R7. PostgreSQL unreachable for 45 s, past a `fetchStallTimeout` of 20 s: the partitions
/// are held back by their sink, which is not a wedge (at-least-once: exactly-once takes
/// Kafka sinks only).
pub fn database_outage(bin: &str, len: Length, g: Guarantee) -> Measured {
    const NAME: &str = "R7. PostgreSQL unreachable 45 s";
    if g == Guarantee::ExactlyOnce {
        return skipped(NAME, g, "exactly-once takes Kafka sinks only");
    }
    let c = cluster();
    let plan = plan(len);
    let input = unique("reppg-in");
    c.create_topic(&input, 4, &[]);
    let url = postgres_url();
    let table = unique("rep_pg").replace('-', "_");
    super::pg_exec(
        &url,
        &format!("CREATE TABLE {table} (seq bigint PRIMARY KEY, device text)"),
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
    let gen = generate_on(c.bootstrap(), &input, plan.count(), plan.rate, 100);
    let body = format!(
        "sinks: [{{postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device, field: deviceId}}]}}}}]\nretry: {{maxBackoff: 2s, maxElapsed: 10m}}"
    );
    let mut w = Workers::new_on(
        c.bootstrap(),
        bin,
        &input,
        &unique("reppg-g"),
        &body,
        &[("SLUICE_POSTGRES_URL", &proxied)],
    );
    w.config = w.config.replace("  sessionTimeout: 10s\n", "");
    w.server_extra = ", fetchStallTimeout: 20s".into();
    w.start();
    let (mut failures, mut restarts) = (Vec::new(), 0);
    let mut supervise = |w: &mut Workers, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            restarts += w.restart_exited();
            restarts += w.probe(&mut failures, PROBE_FAILURES).len();
            pace(
                w,
                PROBE_PERIOD.min(end.saturating_duration_since(Instant::now())),
            );
        }
    };
    supervise(&mut w, Duration::from_secs(plan.seconds / 3));
    let fault = now_ms();
    proxy.cut();
    supervise(&mut w, Duration::from_secs(45));
    proxy.restore();
    let n = plan.count() as i64;
    let count = |sql: &str| -> i64 {
        super::pg_exec(&url, sql)[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0)
    };
    let end = Instant::now() + Duration::from_secs(300);
    while !gen.is_finished()
        || (count(&format!("SELECT count(*) FROM {table}")) < n && Instant::now() < end)
    {
        supervise(&mut w, Duration::from_secs(1));
    }
    gen.join().expect("generator");
    let distinct = count(&format!("SELECT count(DISTINCT seq) FROM {table}"));
    let peak = w.peak_mib();
    w.stop_all();
    Measured {
        outcome: Outcome {
            name: format!("{NAME} ({})", g.name()),
            faults: 1,
            records: n as u64,
            lost: (n - distinct).max(0) as u64,
            duplicates: 0,
            max_duplicates_per_fault: 0,
            recovery_s: None,
            peak_rss_mib: peak,
            note: format!(
                "fetchStallTimeout 20 s; rows written once each (primary key); all rows {:.0} s after the outage began",
                (now_ms() - fault) as f64 / 1000.0
            ),
        },
        restarts: restarts as u32,
        dead_lettered: 0,
    }
}

/// R8. Outputs the broker refuses for good: 1 record in 1,000 is larger than the output
/// topic's `max.message.bytes`. Each must reach the dead-letter topic once, the rest the
/// output, with no worker restart.
pub fn refused_outputs(bin: &str, len: Length, g: Guarantee) -> Measured {
    let plan = plan(len);
    let mut r = Run::start(
        bin,
        "R8. outputs over the topic's max.message.bytes",
        g,
        4,
        plan,
        &[("max.message.bytes", "100000")],
        "",
        "",
        false,
    );
    let (b, input, count, rate) = (
        r.cluster.bootstrap().to_string(),
        r.input.clone(),
        r.plan.count(),
        r.plan.rate,
    );
    r.gen = Some(std::thread::spawn(move || {
        use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
        let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set("message.max.bytes", "1000000")
                .create()
                .expect("producer");
        let start = Instant::now();
        for seq in 0..count {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
            let size = if seq % 1000 == 500 { 200_000 } else { 100 };
            let (k, v) = (key(seq), payload(seq, size));
            let mut rec = BaseRecord::to(&input).key(&k).payload(&v);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(300)).expect("flush");
    }));
    r.fault();
    let refused = count / 1000;
    r.finish(
        count,
        format!("{refused} records of 200 KB against max.message.bytes 100000"),
    )
}

/// R9. A record on which the processor panics, 1 in 10,000 (a custom processor: the
/// `panic-worker` example next to the worker binary). Each goes to the dead-letter topic
/// (class `panic`), the lane lives on.
pub fn panicking_records(bin: &str, len: Length, g: Guarantee) -> Measured {
    let name = "R9. processor panics on 1 record in 10,000";
    let Some(panicky) = std::path::Path::new(bin)
        .parent()
        .map(|d| d.join("examples/panic-worker"))
        .filter(|p| p.is_file())
    else {
        return skipped(
            name,
            g,
            "needs the panic-worker example next to the worker (cargo build --examples -p sluice-worker)",
        );
    };
    let r = Run::start(
        &panicky.to_string_lossy(),
        name,
        g,
        4,
        plan(len),
        &[],
        "processor: {custom: {name: panic-on-seq}}",
        "",
        true,
    );
    let n = r.plan.count();
    r.finish(n, format!("{} panics", n / 10_000))
}

/// One replicated scenario: the worker binary, the length and the guarantee, to what it
/// measured.
pub type Scenario = fn(&str, Length, Guarantee) -> Measured;

/// Every replicated scenario, run with each guarantee, with the short name `sluice-chaos`
/// selects it by.
pub const SCENARIOS: [(&str, Scenario); 9] = [
    ("leader-kill", leader_kill),
    ("coordinator-kill", coordinator_kill),
    ("rolling-restart", rolling_restart),
    ("two-down", two_down),
    ("added-partitions", added_partitions),
    ("txn-upstream", transactional_upstream),
    ("db-outage", database_outage),
    ("refused-outputs", refused_outputs),
    ("panic", panicking_records),
];

fn skipped(name: &str, g: Guarantee, why: &str) -> Measured {
    Measured {
        outcome: Outcome {
            name: format!("{name} ({})", g.name()),
            note: format!("skipped: {why}"),
            ..Default::default()
        },
        restarts: 0,
        dead_lettered: 0,
    }
}
