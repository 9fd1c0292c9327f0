//! What the reconciler shares between reconciles: the clients, the metrics, and one
//! [`PipelineMemory`] per pipeline, forgotten (with the pipeline's metric series) when the
//! pipeline is deleted.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use sluice_api::config::WorkerConfig;

use crate::api::{ApiBudget, ApiLimits};
use crate::autoscale::policy::Autoscaler;
use crate::autoscale::stall::StallDetector;
use crate::cache::Cache;
use crate::kafka::reads::Reads;
use crate::kafka::{ConnectionKey, KafkaInspector};
use crate::metrics::ControllerMetrics;
use crate::reconcile::scale::Scale;
use crate::reconcile::secrets::PodSecrets;

/// The field manager of every server-side apply.
pub const MANAGER: &str = "sluice-controller";

/// Kafka's default `offsets.retention.minutes` (7 days, since Kafka 2.0): how long the
/// committed offsets of a group without members are kept.
pub const DEFAULT_OFFSETS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A pipeline's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PipelineKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl PipelineKey {
    /// The pipeline `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PipelineKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PipelineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The scaling decision reused until the next poll (reconciles caused by status updates
/// and child events do not decide again).
#[derive(Clone, Debug)]
pub(crate) struct Paced {
    /// When it was decided.
    pub at: Instant,
    /// For which generation of the spec.
    pub generation: Option<i64>,
    /// For which partition count.
    pub partitions: u32,
    /// The decision.
    pub scale: Scale,
}

/// Everything the controller remembers about one pipeline between reconciles.
#[derive(Debug, Default)]
pub(crate) struct PipelineMemory {
    /// The object this memory belongs to: a pipeline deleted and created again under the
    /// same name starts afresh.
    pub uid: String,
    /// Recommendations inside the scale-down window, and the idle clock.
    pub autoscaler: Autoscaler,
    /// When each partition's commit last moved.
    pub stalls: StallDetector,
    /// The last decision, reused within the poll interval.
    pub paced: Option<Paced>,
    /// Consecutive failed reconciles (the backoff).
    pub failures: u32,
    /// The Kafka connection the pipeline reads through.
    pub connection: Option<ConnectionKey>,
    /// What this controller applied of the children (or found applied, after a start).
    pub applied: Applied,
    /// When this controller first looks at the pipeline (its slot, after a start).
    pub start_at: Option<Instant>,
    /// The worker configuration validated for a generation of the spec.
    pub validated: Option<(i64, WorkerConfig)>,
    /// The Secrets the pods read as last read, with the versions the watch showed of them
    /// then (reconcile/secrets.rs): read again only when one of them changed.
    pub secrets: Option<(String, Arc<PodSecrets>)>,
    /// Since when the pipeline has been asked for zero workers, as first seen (the status's
    /// `lastScaleTime` then): the clock of the offsets-expiry warning. Kept here so a later
    /// re-stamp of `lastScaleTime` (a stale view of the Deployment) does not restart it.
    pub zero_since: Option<k8s_openapi::jiff::Timestamp>,
}

/// One child as sluice applied it: the digest of what was applied, and the stamp
/// (generation or resourceVersion) the object had right after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Version {
    pub hash: String,
    pub stamp: Option<String>,
}

/// The children as sluice last applied them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Applied {
    pub config_map: Option<Version>,
    pub service: Option<Version>,
    pub pdb: Option<Version>,
    pub deployment: Option<Version>,
    /// The ServiceMonitor's digest (it is not watched: applied once per controller start).
    pub service_monitor: Option<String>,
}

/// Shared state of the reconciler.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Kafka access.
    pub kafka: Arc<dyn KafkaInspector>,
    /// Image for pipelines that do not name one.
    pub default_image: String,
    /// Metrics.
    pub metrics: ControllerMetrics,
    pub(crate) recorder: Recorder,
    pub(crate) service_monitor_crd: Mutex<Option<(Instant, bool)>>,
    /// Kafka reads, batched per connection.
    pub(crate) reads: Reads,
    /// Requests to the API server, paced and counted.
    pub(crate) api: ApiBudget,
    /// The children as the watches show them (set by the controller's run; reconciles
    /// called directly read the API server instead).
    pub(crate) cache: OnceLock<Cache>,
    /// The namespace the controller runs in: where the key of the Secret digests is kept
    /// (reconcile/secrets.rs).
    pub(crate) home_namespace: String,
    /// That key, read (or made) the first time a pipeline reads a Secret.
    pub(crate) digest_key: tokio::sync::OnceCell<Arc<[u8]>>,
    /// The clusters' `offsets.retention.minutes`, in seconds ([`Context::set_offsets_retention`]).
    offsets_retention: AtomicU64,
    pipelines: Mutex<HashMap<PipelineKey, PipelineMemory>>,
    /// Pipelines forgotten since memory was last handed back.
    forgotten: AtomicUsize,
}

impl Context {
    /// A context for `client`, with the default limits on API requests, at home in the
    /// `default` namespace (tests and embedding; the controller's binary says where it
    /// runs: [`Context::with_limits`]).
    pub fn new(client: Client, kafka: Arc<dyn KafkaInspector>, default_image: String) -> Arc<Self> {
        Self::with_limits(
            client,
            kafka,
            default_image,
            ApiLimits::default(),
            "default",
        )
    }

    /// A context for `client` whose API requests keep within `limits`, running in
    /// `home_namespace` (where it keeps the key of the Secret digests).
    pub fn with_limits(
        client: Client,
        kafka: Arc<dyn KafkaInspector>,
        default_image: String,
        limits: ApiLimits,
        home_namespace: impl Into<String>,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let metrics = ControllerMetrics::default();
        Arc::new(Context {
            api: ApiBudget::new(limits, &metrics.registry),
            cache: OnceLock::new(),
            home_namespace: home_namespace.into(),
            digest_key: tokio::sync::OnceCell::new(),
            client,
            reads: Reads::new(kafka.clone(), metrics.kafka.clone()),
            kafka,
            default_image,
            metrics,
            recorder,
            service_monitor_crd: Mutex::new(None),
            pipelines: Mutex::new(HashMap::new()),
            forgotten: AtomicUsize::new(0),
            offsets_retention: AtomicU64::new(DEFAULT_OFFSETS_RETENTION.as_secs()),
        })
    }

    /// How long Kafka keeps the committed offsets of a group without members
    /// (`offsets.retention.minutes` of the pipelines' clusters; default
    /// [`DEFAULT_OFFSETS_RETENTION`]). A pipeline at zero workers for most of it is warned
    /// about (`OffsetsExpiring`). Set once, at start (the binary's `--offsets-retention`).
    pub fn set_offsets_retention(&self, retention: Duration) {
        self.offsets_retention
            .store(retention.as_secs().max(1), Ordering::Relaxed);
    }

    /// See [`Context::set_offsets_retention`].
    pub fn offsets_retention(&self) -> Duration {
        Duration::from_secs(self.offsets_retention.load(Ordering::Relaxed))
    }

    /// Run `f` on the memory of the pipeline `key` with `uid`: created on first use, and
    /// started afresh when the uid differs (the name now belongs to another object).
    pub(crate) fn memory<T>(
        &self,
        key: &PipelineKey,
        uid: &str,
        f: impl FnOnce(&mut PipelineMemory) -> T,
    ) -> T {
        let mut all = self.pipelines.lock().expect("pipelines lock");
        let m = all.entry(key.clone()).or_default();
        if m.uid != uid {
            *m = PipelineMemory {
                uid: uid.to_string(),
                ..Default::default()
            };
        }
        f(m)
    }

    /// Forget the pipeline `key`: its memory and its metric series.
    pub fn forget(&self, key: &PipelineKey) {
        {
            let mut all = self.pipelines.lock().expect("pipelines lock");
            if all.remove(key).is_some() {
                self.forgotten.fetch_add(1, Ordering::Relaxed);
            }
            // A map keeps its capacity when entries go: after thousands of pipelines are
            // deleted it would hold their slots (a `PipelineMemory` is about a kilobyte;
            // 3.3 MB after 1,000, measured with heaptrack). Halve it once it is a quarter
            // full, so the cost is amortised over the removals.
            if all.len() * 4 < all.capacity() && all.capacity() > 64 {
                let keep = (all.len() * 2).max(64);
                all.shrink_to(keep);
            }
        }
        self.metrics.forget(&key.namespace, &key.name);
    }

    /// Forget every pipeline for which `exists` says no (deleted ones).
    pub fn forget_missing(&self, exists: impl Fn(&PipelineKey) -> bool) {
        let gone: Vec<PipelineKey> = self
            .pipelines
            .lock()
            .expect("pipelines lock")
            .keys()
            .filter(|k| !exists(k))
            .cloned()
            .collect();
        for key in gone {
            tracing::debug!(pipeline = %key, "forgetting a deleted pipeline");
            self.forget(&key);
        }
        // Kafka connections no pipeline reads through any more go too.
        let in_use: std::collections::HashSet<ConnectionKey> = self
            .pipelines
            .lock()
            .expect("pipelines lock")
            .values()
            .filter_map(|m| m.connection.clone())
            .collect();
        self.reads.retain(|k| in_use.contains(k));
        // What the forgotten pipelines held goes back to the system, once per sweep.
        if self.forgotten.swap(0, Ordering::Relaxed) > 0 {
            crate::trim::release_freed_memory();
        }
    }

    /// Requests of `verb` made to the API server so far (watches aside).
    pub fn api_requests(&self, verb: crate::api::Verb) -> u64 {
        self.api.count(verb)
    }

    /// Kafka connections open now (one client each).
    pub fn kafka_connections(&self) -> usize {
        self.reads.connections()
    }

    /// Whether the controller holds memory of the pipeline `namespace/name`.
    pub fn remembers(&self, namespace: &str, name: &str) -> bool {
        self.pipelines
            .lock()
            .expect("pipelines lock")
            .contains_key(&PipelineKey::new(namespace, name))
    }

    /// How many pipelines the controller holds memory of.
    pub fn remembered(&self) -> usize {
        self.pipelines.lock().expect("pipelines lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forgetting pipelines gives back the map's room, not only its entries: after 1,000
    /// pipelines come and go, the map holds a few slots, not a thousand (heaptrack found
    /// 3.3 MB of empty slots after deleting 1,000).
    #[tokio::test]
    async fn forgetting_pipelines_gives_back_the_maps_room() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let ctx = Context::new(
            client,
            Arc::new(crate::kafka::RdKafka),
            "sluice/worker:test".into(),
        );
        let keys: Vec<PipelineKey> = (0..1_000)
            .map(|i| PipelineKey::new("ns", format!("p{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            ctx.memory(k, &format!("uid-{i}"), |_| ());
        }
        let full = ctx.pipelines.lock().unwrap().capacity();
        assert!(full >= 1_000);
        for k in &keys[..999] {
            ctx.forget(k);
        }
        let map = ctx.pipelines.lock().unwrap();
        assert_eq!(map.len(), 1);
        assert!(
            map.capacity() <= 128,
            "{} slots kept for 1 pipeline (from {full})",
            map.capacity()
        );
    }
}
