//! A replicated Kafka cluster for the fault scenarios that kill brokers: three KRaft nodes
//! on loopback (`scripts/kafka-cluster.sh`: each node broker and controller, replication
//! factor 3, `min.insync.replicas=2`), started here on first use the way [`crate::bootstrap`]
//! starts the single broker, and polled until all three nodes serve. Unlike the shared
//! single broker, a cluster a process started is stopped when that process exits.
//!
//! Its ports and directory come from `SLUICE_KAFKA_CLUSTER_PORT` (node N listens on
//! port + 10 × (N − 1); default 9300) and `SLUICE_KAFKA_CLUSTER_DIR`; two engineers on one
//! machine give it different ones, since the scenarios kill its nodes.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::{repo_root, run_ok};

/// The node ids of the cluster.
pub const NODES: [i32; 3] = [1, 2, 3];

/// The partitions of the consumer offsets topic (`scripts/kafka-cluster.sh`): a group's
/// coordinator is the leader of one of them.
const OFFSETS_PARTITIONS: i32 = 8;

/// The three-node cluster under test.
#[derive(Debug)]
pub struct Cluster {
    bootstrap: String,
}

/// The cluster, started (and waited for) on first use in this process. A cluster this
/// process started is stopped when the process exits (however it ends: a watcher process
/// waits for it, see [`stop_when_this_process_exits`]); one that was already up is left as
/// it was.
pub fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        let was_up = Command::new("bash")
            .arg(repo_root().join("scripts/kafka-cluster.sh"))
            .arg("status")
            .status()
            .is_ok_and(|s| s.success());
        script(&["start"]);
        if !was_up {
            stop_when_this_process_exits();
        }
        let c = Cluster {
            bootstrap: script(&["bootstrap"]).trim().to_string(),
        };
        c.wait_ready(&[], Duration::from_secs(180));
        eprintln!(
            "[testkit] replicated cluster: 3 KRaft nodes at {} (replication factor 3, min.insync.replicas=2)",
            c.bootstrap
        );
        c
    })
}

/// Start a watcher that runs `scripts/kafka-cluster.sh stop` (with this process's
/// `SLUICE_KAFKA_CLUSTER_*`) once this process has exited, however it exits: a test binary
/// has no hook after its last test, and a panic or a kill must not leave three JVMs behind.
/// The watcher is in a process group of its own, so the Ctrl-C that stops the tests does
/// not stop it first.
// Never waited for, by design: it outlives this process (and is reaped by whoever adopts it).
#[allow(clippy::zombie_processes)]
fn stop_when_this_process_exits() {
    use std::os::unix::process::CommandExt;
    let watcher = Command::new("bash")
        .arg("-c")
        .arg(r#"tail --pid="$1" -f /dev/null; exec bash "$2" stop"#)
        .arg("sluice-cluster-stopper")
        .arg(std::process::id().to_string())
        .arg(repo_root().join("scripts/kafka-cluster.sh"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match watcher {
        Ok(_) => eprintln!(
            "[testkit] the replicated cluster stops when this process (pid {}) exits",
            std::process::id()
        ),
        Err(e) => eprintln!(
            "[testkit] cannot watch this process to stop the replicated cluster after it ({e}): stop it with scripts/kafka-cluster.sh stop"
        ),
    }
}

/// Run `scripts/kafka-cluster.sh <args>` (with this process's `SLUICE_KAFKA_CLUSTER_*`).
fn script(args: &[&str]) -> String {
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts/kafka-cluster.sh"))
            .args(args)
            .stderr(Stdio::inherit()),
    )
}

/// Java's `String.hashCode` (over UTF-16 code units), as Kafka hashes a group id.
fn java_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

impl Cluster {
    /// Its bootstrap servers (all three nodes).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("metadata client")
    }

    /// Wait until every node is in the metadata and every partition of `topics` (and of
    /// the consumer offsets and transaction logs, once they exist) has a leader and all
    /// three replicas in sync: a fault that follows hits a healthy cluster.
    pub fn wait_ready(&self, topics: &[&str], timeout: Duration) {
        let c = self.consumer();
        let deadline = Instant::now() + timeout;
        loop {
            let why = match self.health(&c, topics) {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the replicated cluster was not ready within {timeout:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `Ok` when every node serves and every partition of `topics` (and of the internal
    /// topics) has all three replicas in sync; otherwise what is not yet.
    pub fn ready(&self, topics: &[&str]) -> Result<(), String> {
        self.health(&self.consumer(), topics)
    }

    fn health(&self, c: &BaseConsumer, topics: &[&str]) -> Result<(), String> {
        let md = c
            .fetch_metadata(None, Duration::from_secs(5))
            .map_err(|e| format!("metadata: {e}"))?;
        if md.brokers().len() != NODES.len() {
            return Err(format!(
                "{} of {} nodes serve",
                md.brokers().len(),
                NODES.len()
            ));
        }
        for t in md.topics() {
            let wanted = topics.contains(&t.name())
                || t.name() == "__consumer_offsets"
                || t.name() == "__transaction_state";
            if !wanted {
                continue;
            }
            if t.partitions().is_empty() {
                return Err(format!("{}: no partitions yet", t.name()));
            }
            for p in t.partitions() {
                if p.leader() < 0 || p.isr().len() < NODES.len() {
                    return Err(format!(
                        "{}/{}: leader {}, in sync {:?}",
                        t.name(),
                        p.id(),
                        p.leader(),
                        p.isr()
                    ));
                }
            }
        }
        for want in topics {
            if !md.topics().iter().any(|t| t.name() == *want) {
                return Err(format!("{want}: not in the metadata"));
            }
        }
        Ok(())
    }

    /// The node leading `topic`/`partition` now, if one does.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        let md = self
            .consumer()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let t = md.topics().first()?;
        t.partitions()
            .iter()
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .filter(|&l| l >= 0)
    }

    /// The node coordinating consumer group `group` now: the leader of its partition of
    /// the consumer offsets topic.
    pub fn group_coordinator(&self, group: &str) -> Option<i32> {
        let p = (java_hash(group) & 0x7fff_ffff) % OFFSETS_PARTITIONS;
        self.leader("__consumer_offsets", p)
    }

    /// SIGKILL node `n` (a crash: no controlled shutdown).
    pub fn kill(&self, n: i32) {
        script(&["kill", &n.to_string()]);
    }

    /// Stop node `n` cleanly (SIGTERM: it hands its leaderships over first).
    pub fn stop_node(&self, n: i32) {
        script(&["stop-node", &n.to_string()]);
    }

    /// Start node `n` again; returns once it accepts connections (it may still be
    /// catching up: see [`Cluster::wait_ready`]).
    pub fn start_node(&self, n: i32) {
        // A node that exits during start-up (seen once on the shared test machine, with no
        // word in its log) is started again, up to three times.
        for attempt in 1..=3 {
            let out = Command::new("bash")
                .arg(repo_root().join("scripts/kafka-cluster.sh"))
                .args(["start-node", &n.to_string()])
                .output()
                .expect("run kafka-cluster.sh");
            if out.status.success() {
                return;
            }
            eprintln!(
                "[testkit] node {n} did not start (attempt {attempt}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        script(&["start-node", &n.to_string()]);
    }

    /// Create `topic` with `partitions` partitions, replication factor 3, and wait until
    /// every partition has a leader; `config` adds topic settings.
    pub fn create_topic(&self, topic: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin = self.admin();
        let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(3));
        for (k, v) in config {
            t = t.set(k, v);
        }
        let res = block_on(admin.create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .expect("create topics");
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => panic!("cannot create topic {t}: {e}"),
            }
        }
        self.wait_ready(&[topic], Duration::from_secs(60));
    }

    /// Grow `topic` to `total` partitions.
    pub fn add_partitions(&self, topic: &str, total: usize) {
        let admin = self.admin();
        let res = block_on(admin.create_partitions(
            [&NewPartitions::new(topic, total)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .expect("create partitions");
        for r in res {
            if let Err((t, e)) = r {
                panic!("cannot add partitions to {t}: {e}");
            }
        }
    }

    fn admin(&self) -> AdminClient<DefaultClientContext> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client")
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_hash_like_java() {
        // "".hashCode() == 0, "a" == 97, "hello" == 99162322, "polygenelubricants" == MIN
        assert_eq!(java_hash(""), 0);
        assert_eq!(java_hash("a"), 97);
        assert_eq!(java_hash("hello"), 99_162_322);
        assert_eq!(java_hash("polygenelubricants"), i32::MIN);
    }
}
