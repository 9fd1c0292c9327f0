//! The `StreamPipeline` custom resource (`sluice.dev/v1alpha1`), behind the `crd` feature.
//!
//! Its spec reuses the worker configuration's types (processor, sinks, workers, batching,
//! commit, memory), so [`StreamPipeline::worker_config`] renders exactly what the worker
//! parses. What differs is what only the cluster knows: secrets are Secret references
//! (never literals), and scaling, pausing, the image and resources drive the Deployment.

// The derive's repeated `printcolumn(type_ = ...)` arguments trip this lint.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::rules::{Bounds, TOPIC_NAME_LEN, TOPIC_NAME_PATTERN};
use crate::config::source::{TOPICS_MAX, TOPIC_PATTERN_LEN_MAX};
use crate::config::{
    BatchingConfig, CommitConfig, ConfigError, DeadLetterConfig, DeliveryConfig, MemoryConfig,
    OAuthConfig, ProcessorConfig, RetryConfig, SaslMechanism, SecurityConfig, SecurityProtocol,
    ServerConfig, SinkConfig, SourceConfig, StartFrom, WorkerConfig, WorkersConfig,
};
use crate::units::HumanDuration;

/// The rule a pipeline's name follows (CEL on `metadata.name`, and [`StreamPipeline::worker_config`]
/// for objects stored before the rule): a DNS-1035 label (lower-case letters, digits and
/// `-`, starting with a letter, ending with a letter or digit) of at most
/// [`MAX_NAME_LEN`] characters, so that `<name>-metrics` (a Service) and `<name>-config`
/// are valid names and `<name>` is a valid label value.
pub const NAME_RULE: &str =
    "self.metadata.name.size() <= 55 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// What the API server says when [`NAME_RULE`] refuses a name.
pub const NAME_RULE_MESSAGE: &str = "metadata.name must be a DNS-1035 label of at most 55 characters (lower-case letters, digits and '-', starting with a letter): the worker Service is <name>-metrics";
/// The longest pipeline name: 63 (a DNS label) less the 8 of `-metrics`.
pub const MAX_NAME_LEN: usize = 55;
/// Environment variables of the worker that sluice sets itself, or that must differ
/// between its pods (`spec.secretEnv` may not set them): `SLUICE_TRANSACTIONAL_ID` and
/// `HOSTNAME` make the exactly-once `transactional.id`, and one value in every replica
/// would have each fence the others.
pub const RESERVED_ENV: &[&str] = &[
    "SLUICE_CONFIG",
    "SLUICE_LOG",
    SASL_PASSWORD_ENV,
    SSL_KEY_PASSWORD_ENV,
    OAUTH_CLIENT_SECRET_ENV,
    "SLUICE_TRANSACTIONAL_ID",
    "HOSTNAME",
];

/// `spec.sinks`: how many.
pub const SINKS: Bounds<usize> = Bounds { min: 1, max: 16 };
/// `spec.secretEnv`: at most this many.
pub const SECRET_ENV_MAX: usize = 32;
/// `spec.secretFiles`: at most this many.
pub const SECRET_FILES_MAX: usize = 16;
/// `spec.replicas`.
pub const REPLICAS: Bounds<i32> = Bounds {
    min: 0,
    max: 10_000,
};
/// `scaling.minReplicas`.
pub const MIN_REPLICAS: Bounds<i32> = Bounds { min: 0, max: 1000 };
/// `scaling.maxReplicas`.
pub const MAX_REPLICAS: Bounds<i32> = Bounds { min: 1, max: 1000 };
/// The CEL rule on `spec.secretEnv[*]`: the twin of [`RESERVED_ENV`] and
/// [`crate::config::ENV_OVERRIDE_PREFIX`] (a test keeps them in step).
pub const SECRET_ENV_RULE: &str = "!(self.name in ['SLUICE_CONFIG', 'SLUICE_LOG', 'SLUICE_SASL_PASSWORD', 'SLUICE_SSL_KEY_PASSWORD', 'SLUICE_OAUTH_CLIENT_SECRET', 'SLUICE_TRANSACTIONAL_ID', 'HOSTNAME']) && !self.name.startsWith('SLUICE__')";

/// Where the worker's metrics and health server listens inside the pod.
pub const WORKER_PORT: u16 = 9095;
/// The environment variable the rendered config names for the SASL password.
pub const SASL_PASSWORD_ENV: &str = "SLUICE_SASL_PASSWORD";
/// The environment variable the rendered config names for the client key's password.
pub const SSL_KEY_PASSWORD_ENV: &str = "SLUICE_SSL_KEY_PASSWORD";
/// The environment variable the rendered config names for the OAuth client secret.
pub const OAUTH_CLIENT_SECRET_ENV: &str = "SLUICE_OAUTH_CLIENT_SECRET";

/// A Kafka stream pipeline: consume a topic, process, deliver to sinks, commit.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "StreamPipeline",
    namespaced,
    status = "StreamPipelineStatus",
    derive = "PartialEq",
    shortname = "sp",
    validation = kube::core::Rule::new(NAME_RULE).message(NAME_RULE_MESSAGE),
    category = "sluice",
    doc = "A Kafka stream pipeline run by sluice worker pods",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.partitions"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.processor) || !has(self.processor.custom) || has(self.image)",
     "message": "processor.custom needs spec.image: a worker image built with sluice_worker::run that registers the processor (the stock image has none)"}
]))]
pub struct StreamPipelineSpec {
    /// The input topic and its consumer group.
    pub source: PipelineSource,
    /// What happens to each record (default: passthrough).
    #[serde(default)]
    pub processor: ProcessorConfig,
    /// Where outputs go; every sink gets every output.
    #[schemars(length(min = SINKS.min, max = SINKS.max))]
    pub sinks: Vec<SinkConfig>,
    /// Retries of transient sink errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where records that failed for good go; without it such a record stalls its
    /// partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
    /// Environment variables of the worker filled from Secrets, e.g. the PostgreSQL
    /// connection string a `postgres` sink's `connectionEnv` names, or the token an `http`
    /// sink's header `valueEnv` names. Values never enter the rendered configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SECRET_ENV_MAX))]
    pub secret_env: Vec<SecretEnv>,
    /// Files of the worker filled from Secret keys (a CA certificate for Kafka's or
    /// PostgreSQL's TLS, say), mounted read-only at `/etc/sluice/secrets/<name>`: point
    /// `source.security.caFile` or a postgres or http sink's `caFile` there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SECRET_FILES_MAX))]
    pub secret_files: Vec<SecretFile>,
    /// Worker pool per partition.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// Sink batching.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Offset commits.
    #[serde(default)]
    pub commit: CommitConfig,
    /// Memory bounds per worker pod.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The delivery guarantee: `at-least-once` (default) or `exactly-once` (Kafka
    /// transactions, one per `transactionWindow`; every sink a Kafka topic on the source
    /// cluster, and a dead-letter topic there too).
    #[serde(default, skip_serializing_if = "DeliveryConfig::is_default")]
    pub delivery: DeliveryConfig,
    /// Lag-based autoscaling.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Scale the workers to zero; committed offsets stay as they are.
    #[serde(default)]
    pub paused: bool,
    /// Replicas for `scaling.mode: manual`, and what the scale subresource reads and writes
    /// (HPA, KEDA, `kubectl scale`). Ignored in `scaling.mode: lag`. Always capped at the
    /// partition count.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = REPLICAS.min, max = REPLICAS.max))]
    pub replicas: i32,
    /// Worker image; defaults to the controller's configured worker image. A custom image
    /// built with `sluice_worker::run` runs custom processors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Worker container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// What the worker pods carry besides what sluice sets: labels and annotations,
    /// placement (node selector, tolerations, affinity, topology spread, priority class),
    /// identity (service account, image pull secrets) and security context additions that
    /// keep sluice's defaults (non-root, RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodTemplate>,
    /// Worker log level (`SLUICE_LOG`): comma-separated `level` or `target=level`
    /// directives, level one of trace, debug, info, warn, error, off; e.g. `info` or
    /// `debug,librdkafka=warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(
            pattern = r"^(([A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*=)?(trace|debug|info|warn|error|off))(,([A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*=)?(trace|debug|info|warn|error|off))*$"
        )
    )]
    pub log_level: Option<String>,
}

/// `spec.template`: what is merged into the worker pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsNonRoot) || self.securityContext.runAsNonRoot",
     "message": "template.securityContext.runAsNonRoot: false would let the workers run as root; the template may add to the workers' security context, not weaken it"},
    {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsUser) || self.securityContext.runAsUser != 0",
     "message": "template.securityContext.runAsUser: 0 is root; the template may add to the workers' security context, not weaken it"},
    {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsGroup) || self.securityContext.runAsGroup != 0",
     "message": "template.securityContext.runAsGroup: 0 is root's group; the template may add to the workers' security context, not weaken it"},
    {"rule": "!has(self.securityContext) || !has(self.securityContext.seccompProfile) || self.securityContext.seccompProfile.type != 'Unconfined'",
     "message": "template.securityContext.seccompProfile: Unconfined turns the syscall filter off; the template may add to the workers' security context, not weaken it"},
    {"rule": "!has(self.securityContext) || !has(self.securityContext.appArmorProfile) || self.securityContext.appArmorProfile.type != 'Unconfined'",
     "message": "template.securityContext.appArmorProfile: Unconfined turns AppArmor off; the template may add to the workers' security context, not weaken it"},
    {"rule": "!has(self.securityContext) || !has(self.securityContext.windowsOptions) || !has(self.securityContext.windowsOptions.hostProcess) || !self.securityContext.windowsOptions.hostProcess",
     "message": "template.securityContext.windowsOptions.hostProcess: a host process is privileged; the template may add to the workers' security context, not weaken it"}
]))]
pub struct PodTemplate {
    /// Labels and annotations of the pods, added to sluice's (a key of sluice's is
    /// refused: `sluice.dev/*`, the `app.kubernetes.io/` labels that select the pods,
    /// `prometheus.io/port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    /// Pods run only on nodes with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate (a dedicated node pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod affinity and anti-affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the pods spread over zones or nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// The pods' PriorityClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The pods' ServiceAccount (workload identity: IRSA, GKE Workload Identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Mount the ServiceAccount's API token (default false: the workers never call the
    /// Kubernetes API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
    /// Secrets to pull the worker image from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Pod security context fields added to sluice's (`runAsNonRoot: true`, user and group
    /// 65532, seccomp `RuntimeDefault`): `fsGroup`, `supplementalGroups`, another non-zero
    /// `runAsUser`/`runAsGroup`, `seLinuxOptions`, a `Localhost` seccomp profile... A
    /// field that would weaken them (`runAsNonRoot: false`, user or group 0, a seccomp or
    /// AppArmor profile `Unconfined`, a Windows host process) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
}

/// Labels and annotations of the worker pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": TEMPLATE_LABELS_RULE,
     "message": "template.metadata.labels: sluice.dev/* and app.kubernetes.io/name, instance and managed-by are sluice's: they select the worker pods"},
    {"rule": TEMPLATE_ANNOTATIONS_RULE,
     "message": "template.metadata.annotations: sluice.dev/* and prometheus.io/port are sluice's: they roll the pods on a change and point the scraper at the metrics port"}
]))]
pub struct TemplateMetadata {
    /// Added to sluice's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = TEMPLATE_KEYS_MAX))]
    pub labels: BTreeMap<String, String>,
    /// Added to sluice's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = TEMPLATE_KEYS_MAX))]
    pub annotations: BTreeMap<String, String>,
}

/// The prefix of sluice's own label and annotation keys on the worker pods.
pub const SLUICE_KEY_PREFIX: &str = "sluice.dev/";
/// The labels, besides `sluice.dev/*`, that sluice puts on the worker pods and selects
/// them by: the template may not set them.
pub const RESERVED_POD_LABELS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
];
/// The annotations, besides `sluice.dev/*`, that sluice puts on the worker pods.
pub const RESERVED_POD_ANNOTATIONS: &[&str] = &["prometheus.io/port"];
/// `template.metadata.labels` and `.annotations`: at most this many each (a bound the API
/// server's CEL cost estimate needs).
pub const TEMPLATE_KEYS_MAX: usize = 64;
/// The CEL twin of [`SLUICE_KEY_PREFIX`] and [`RESERVED_POD_LABELS`] (a test keeps them in
/// step).
pub const TEMPLATE_LABELS_RULE: &str = "!has(self.labels) || self.labels.all(k, !k.startsWith('sluice.dev/') && !(k in ['app.kubernetes.io/name', 'app.kubernetes.io/instance', 'app.kubernetes.io/managed-by']))";
/// The CEL twin of [`SLUICE_KEY_PREFIX`] and [`RESERVED_POD_ANNOTATIONS`].
pub const TEMPLATE_ANNOTATIONS_RULE: &str = "!has(self.annotations) || self.annotations.all(k, !k.startsWith('sluice.dev/') && !(k in ['prometheus.io/port']))";

impl PodTemplate {
    /// The schema's rules, for objects stored before them: no key of sluice's, nothing
    /// that weakens its security context.
    pub fn check(&self) -> Result<(), ConfigError> {
        let refuse = |field: String, message: String| Err(ConfigError::Invalid { field, message });
        if let Some(m) = &self.metadata {
            for (what, map, reserved, why) in [
                (
                    "labels",
                    &m.labels,
                    RESERVED_POD_LABELS,
                    "they select the worker pods",
                ),
                (
                    "annotations",
                    &m.annotations,
                    RESERVED_POD_ANNOTATIONS,
                    "they roll the pods on a change and point the scraper at the metrics port",
                ),
            ] {
                if map.len() > TEMPLATE_KEYS_MAX {
                    return refuse(
                        format!("template.metadata.{what}"),
                        format!("at most {TEMPLATE_KEYS_MAX} entries, got {}", map.len()),
                    );
                }
                for k in map.keys() {
                    if k.starts_with(SLUICE_KEY_PREFIX) || reserved.contains(&k.as_str()) {
                        return refuse(
                            format!("template.metadata.{what}[{k:?}]"),
                            format!("`{k}` is sluice's: {why}"),
                        );
                    }
                }
            }
        }
        if let Some(sc) = &self.security_context {
            let unconfined = |t: Option<&str>| t == Some("Unconfined");
            let weaker = if sc.run_as_non_root == Some(false) {
                Some(("runAsNonRoot", "false would let the workers run as root"))
            } else if sc.run_as_user == Some(0) {
                Some(("runAsUser", "0 is root"))
            } else if sc.run_as_group == Some(0) {
                Some(("runAsGroup", "0 is root's group"))
            } else if unconfined(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str())) {
                Some(("seccompProfile", "Unconfined turns the syscall filter off"))
            } else if unconfined(sc.app_armor_profile.as_ref().map(|p| p.type_.as_str())) {
                Some(("appArmorProfile", "Unconfined turns AppArmor off"))
            } else if sc
                .windows_options
                .as_ref()
                .is_some_and(|w| w.host_process == Some(true))
            {
                Some(("windowsOptions.hostProcess", "a host process is privileged"))
            } else {
                None
            };
            if let Some((field, why)) = weaker {
                return refuse(
                    format!("template.securityContext.{field}"),
                    format!("{why}; the template may add to the workers' security context, not weaken it"),
                );
            }
        }
        Ok(())
    }
}

/// The input topics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.topic), has(self.topics) && size(self.topics) > 0, has(self.topicPattern)].filter(x, x).size() == 1",
     "message": "set one of topic, topics and topicPattern"}
]))]
pub struct PipelineSource {
    /// Comma-separated `host:port` list.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// The input topic (one of `topic`, `topics` and `topicPattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = TOPIC_NAME_LEN.min, max = TOPIC_NAME_LEN.max),
        regex(pattern = TOPIC_NAME_PATTERN)
    )]
    pub topic: Option<String>,
    /// The input topics (one of `topic`, `topics` and `topicPattern`); the partitions of
    /// them all are the pipeline's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = TOPICS_MAX), inner(length(min = TOPIC_NAME_LEN.min, max = TOPIC_NAME_LEN.max), regex(pattern = TOPIC_NAME_PATTERN)))]
    pub topics: Vec<String>,
    /// A regular expression (POSIX extended) that whole topic names match (one of `topic`,
    /// `topics` and `topicPattern`): every matching topic is read, including topics created
    /// after the group has started, from their first record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = TOPIC_PATTERN_LEN_MAX))]
    pub topic_pattern: Option<String>,
    /// Consumer group id.
    #[schemars(length(min = 1))]
    pub group_id: String,
    /// Where a group without a committed offset starts.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Group session timeout.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: HumanDuration,
    /// TLS and SASL, with the password in a Secret.
    #[serde(default)]
    pub security: PipelineSecurity,
    /// Extra librdkafka consumer properties.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer_properties: BTreeMap<String, String>,
    /// How record values are encoded (a schema registry's wire format); without it they
    /// reach the processor as they are. `credentialsEnv` must be one of `secretEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::config::SourceFormat>,
}

fn default_replicas() -> i32 {
    1
}

fn default_session_timeout() -> HumanDuration {
    HumanDuration::from_millis(30_000)
}

/// Kafka security; the password is read from a Secret and reaches pods only as an env var.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(self.protocol in ['SASL_PLAINTEXT', 'SASL_SSL']) || (has(self.saslMechanism) && (self.saslMechanism == 'OAUTHBEARER' ? has(self.oauth) : (has(self.username) && has(self.passwordSecretRef))))",
     "message": "SASL_PLAINTEXT and SASL_SSL need saslMechanism, and username and passwordSecretRef (PLAIN, SCRAM) or oauth (OAUTHBEARER)"},
    {"rule": "!has(self.oauth) || (has(self.saslMechanism) && self.saslMechanism == 'OAUTHBEARER')",
     "message": "oauth is set only with saslMechanism OAUTHBEARER"},
    {"rule": "!has(self.saslMechanism) || self.saslMechanism != 'OAUTHBEARER' || (!has(self.username) && !has(self.passwordSecretRef))",
     "message": "OAUTHBEARER takes no username or passwordSecretRef: the principal is the token's subject, the secret is oauth.clientSecretRef"},
    {"rule": "has(self.certFile) == has(self.keyFile)",
     "message": "certFile and keyFile go together: the client certificate and its private key"},
    {"rule": "!has(self.certFile) || self.protocol in ['SSL', 'SASL_SSL']",
     "message": "a client certificate (certFile) is presented only over TLS: protocol SSL or SASL_SSL"},
    {"rule": "!has(self.keyPasswordSecretRef) || has(self.keyFile)",
     "message": "keyPasswordSecretRef is the password of an encrypted keyFile"}
]))]
pub struct PipelineSecurity {
    /// Transport protocol.
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// SASL mechanism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The Secret key holding the SASL password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// PEM file of the CAs to trust (`SSL`, `SASL_SSL`), typically
    /// `/etc/sluice/secrets/<name>` from `spec.secretFiles`; without it the image's
    /// system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM file of the client certificate (`SSL`, `SASL_SSL`), for brokers that require
    /// one (a Strimzi `KafkaUser` with `authentication: tls`: its Secret's `user.crt`),
    /// typically `/etc/sluice/secrets/<name>` from `spec.secretFiles`; with `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM file of the client certificate's private key (Strimzi: `user.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// The Secret key holding the password of an encrypted `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password_secret_ref: Option<SecretKeyRef>,
    /// OAUTHBEARER with OpenID Connect client credentials (`saslMechanism: OAUTHBEARER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<PipelineOAuth>,
}

/// `source.security.oauth`: the workers (and the controller's lag reads) get a token from
/// the identity provider with the client credentials grant and refresh it before it expires
/// (librdkafka's built-in OIDC method).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineOAuth {
    /// The token endpoint, e.g.
    /// `https://keycloak.example.com/realms/kafka/protocol/openid-connect/token`.
    #[schemars(length(min = 1), regex(pattern = r"^https?://[^/@\s]+(/\S*)?$"))]
    pub token_endpoint_url: String,
    /// The OAuth client id.
    #[schemars(length(min = 1))]
    pub client_id: String,
    /// The Secret key holding the client secret.
    pub client_secret_ref: SecretKeyRef,
    /// The scope to ask for, when the provider or the brokers need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub scope: Option<String>,
    /// SASL extensions sent with the token (Confluent Cloud: `logicalCluster`,
    /// `identityPoolId`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
    /// PEM file of the CAs to trust for the token endpoint (without it, the image's
    /// system roots), typically `/etc/sluice/secrets/<name>` from `spec.secretFiles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Where `spec.secretFiles` are mounted in the worker: `/etc/sluice/secrets/<name>`.
pub const SECRET_FILES_DIR: &str = "/etc/sluice/secrets";

/// A file of the worker filled from a Secret key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretFile {
    /// The file's name under `/etc/sluice/secrets/`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub name: String,
    /// Where its content comes from.
    pub secret_key_ref: SecretKeyRef,
}

/// An environment variable of the worker filled from a Secret key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": SECRET_ENV_RULE,
     "message": "SLUICE_CONFIG, SLUICE_LOG, SLUICE_SASL_PASSWORD, SLUICE_SSL_KEY_PASSWORD and SLUICE_OAUTH_CLIENT_SECRET are set by sluice, SLUICE_TRANSACTIONAL_ID and HOSTNAME must differ between pods (the exactly-once transactional id), and SLUICE__* would override the rendered configuration"}
]))]
pub struct SecretEnv {
    /// The variable's name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Where its value comes from.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the pipeline's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Lag-based autoscaling: desired = clamp(ceil(lag / lagPerReplica), min, min(max, partitions)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.maxReplicas >= self.minReplicas", "message": "maxReplicas must be at least minReplicas"},
    {"rule": "self.minReplicas == 0 || (!has(self.idleAfter) && !has(self.activationLag))",
     "message": "idleAfter and activationLag apply only with minReplicas: 0 (scale to zero)"}
]))]
pub struct ScalingSpec {
    /// `lag`: the controller sizes the workers from consumer lag. `manual`: it runs
    /// `spec.replicas`, for HPA, KEDA or `kubectl scale` to drive.
    #[serde(default)]
    pub mode: ScalingMode,
    /// Fewest replicas while not paused. 0 scales an idle pipeline to zero (see `idleAfter`)
    /// and wakes it when records arrive (see `activationLag`); until it is idle, 0 scales
    /// like 1.
    #[serde(default = "default_min")]
    #[schemars(range(min = MIN_REPLICAS.min, max = MIN_REPLICAS.max))]
    pub min_replicas: i32,
    /// Most replicas (also capped at the partition count).
    #[serde(default = "default_max")]
    #[schemars(range(min = MAX_REPLICAS.min, max = MAX_REPLICAS.max))]
    pub max_replicas: i32,
    /// Records of lag one replica is expected to absorb.
    #[serde(default = "default_lag_per_replica")]
    #[schemars(range(min = 1))]
    pub lag_per_replica: i64,
    /// A lower desired count must hold this long before replicas are removed.
    #[serde(default = "default_stabilization")]
    pub scale_down_stabilization: HumanDuration,
    /// How often lag is read from Kafka.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// With `minReplicas: 0`: how long with no lag and no new records before the workers
    /// scale to zero (default 5m; at least `pollInterval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_after: Option<HumanDuration>,
    /// With `minReplicas: 0`: the lag (records) that wakes a pipeline scaled to zero
    /// (default 1: the first new record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub activation_lag: Option<i64>,
}

/// `idleAfter` when `minReplicas` is 0 and it is not set.
pub const DEFAULT_IDLE_AFTER: HumanDuration = HumanDuration::from_millis(300_000);

impl ScalingSpec {
    /// How long a pipeline must be idle before it scales to zero; `None` when it never
    /// does (`minReplicas` above 0).
    pub fn scale_to_zero_after(&self) -> Option<std::time::Duration> {
        (self.min_replicas == 0).then(|| self.idle_after.unwrap_or(DEFAULT_IDLE_AFTER).0)
    }

    /// The lag that wakes a pipeline scaled to zero.
    pub fn activation(&self) -> u64 {
        self.activation_lag.unwrap_or(1).max(1) as u64
    }

    /// The schema's rules (for objects stored before them), and an `idleAfter` the poll can
    /// see (at least one `pollInterval`: idleness is judged from one reading per poll).
    pub fn check(&self) -> Result<(), ConfigError> {
        let ScalingSpec {
            mode: _,
            min_replicas,
            max_replicas,
            lag_per_replica,
            scale_down_stabilization: _,
            poll_interval,
            idle_after,
            activation_lag,
        } = self;
        MIN_REPLICAS.check("scaling.minReplicas", *min_replicas)?;
        MAX_REPLICAS.check("scaling.maxReplicas", *max_replicas)?;
        if max_replicas < min_replicas {
            return Err(ConfigError::Invalid {
                field: "scaling.maxReplicas".into(),
                message: format!(
                    "maxReplicas must be at least minReplicas ({min_replicas}), got {max_replicas}"
                ),
            });
        }
        for (field, v) in [
            ("scaling.lagPerReplica", Some(*lag_per_replica)),
            ("scaling.activationLag", *activation_lag),
        ] {
            if v.is_some_and(|v| v < 1) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    message: format!("must be at least 1, got {}", v.unwrap_or_default()),
                });
            }
        }
        if *min_replicas != 0 && (idle_after.is_some() || activation_lag.is_some()) {
            return Err(ConfigError::Invalid {
                field: "scaling.idleAfter".into(),
                message:
                    "idleAfter and activationLag apply only with minReplicas: 0 (scale to zero)"
                        .into(),
            });
        }
        if let Some(after) = self.scale_to_zero_after() {
            if after < poll_interval.0 {
                return Err(ConfigError::Invalid {
                    field: "scaling.idleAfter".into(),
                    message: format!(
                        "idleAfter ({}) is shorter than pollInterval ({}): idleness is judged once per poll; make idleAfter at least pollInterval",
                        HumanDuration(after),
                        poll_interval
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Who decides the replica count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMode {
    /// The lag autoscaler.
    #[default]
    Lag,
    /// `spec.replicas` (the scale subresource).
    Manual,
}

fn default_min() -> i32 {
    1
}
fn default_max() -> i32 {
    10
}
fn default_lag_per_replica() -> i64 {
    10_000
}
fn default_stabilization() -> HumanDuration {
    HumanDuration::from_millis(300_000)
}
fn default_poll() -> HumanDuration {
    HumanDuration::from_millis(30_000)
}

impl Default for ScalingSpec {
    fn default() -> Self {
        ScalingSpec {
            mode: ScalingMode::default(),
            min_replicas: default_min(),
            max_replicas: default_max(),
            lag_per_replica: default_lag_per_replica(),
            scale_down_stabilization: default_stabilization(),
            poll_interval: default_poll(),
            idle_after: None,
            activation_lag: None,
        }
    }
}

/// What the controller observed and decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamPipelineStatus {
    /// The generation these fields describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Partitions of the input topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Worker replicas now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Worker replicas the autoscaler wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Total consumer lag in records, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// When replicas last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Label selector of the worker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Progressing, Degraded, PartitionStalled, ScalingLimited, Paused, Idle,
    /// OffsetsExpiring.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl StreamPipeline {
    /// The worker configuration this resource renders into its ConfigMap: the same types
    /// the worker parses, validated by the same code.
    pub fn worker_config(&self) -> Result<WorkerConfig, ConfigError> {
        // Every field, named: a new one must be handed to the worker or said not to be.
        let StreamPipelineSpec {
            source,
            processor,
            sinks,
            retry,
            dead_letter,
            secret_env,
            secret_files,
            workers,
            batching,
            commit,
            memory,
            delivery,
            scaling: _,
            paused: _,
            replicas: _,
            image,
            resources: _,
            template,
            log_level,
        } = &self.spec;
        let PipelineSource {
            bootstrap_servers,
            topic,
            topics,
            topic_pattern,
            group_id,
            start_from,
            session_timeout,
            security,
            consumer_properties,
            format,
        } = source;
        let PipelineSecurity {
            protocol,
            sasl_mechanism,
            username,
            password_secret_ref: _,
            ca_file,
            cert_file,
            key_file,
            key_password_secret_ref,
            oauth,
        } = security;
        let config = WorkerConfig {
            pipeline: self.metadata.name.clone().unwrap_or_default(),
            source: SourceConfig {
                bootstrap_servers: bootstrap_servers.clone(),
                topic: topic.clone(),
                topics: topics.clone(),
                topic_pattern: topic_pattern.clone(),
                group_id: group_id.clone(),
                start_from: *start_from,
                session_timeout: *session_timeout,
                group_instance_id: None,
                security: SecurityConfig {
                    protocol: *protocol,
                    sasl_mechanism: *sasl_mechanism,
                    username: username.clone(),
                    password_env: SASL_PASSWORD_ENV.into(),
                    ca_file: ca_file.clone(),
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                    key_password_env: key_password_secret_ref
                        .as_ref()
                        .map(|_| SSL_KEY_PASSWORD_ENV.into()),
                    oauth: oauth.as_ref().map(|o| {
                        let PipelineOAuth {
                            token_endpoint_url,
                            client_id,
                            client_secret_ref: _,
                            scope,
                            extensions,
                            ca_file,
                        } = o;
                        OAuthConfig {
                            token_endpoint_url: token_endpoint_url.clone(),
                            client_id: client_id.clone(),
                            client_secret_env: OAUTH_CLIENT_SECRET_ENV.into(),
                            scope: scope.clone(),
                            extensions: extensions.clone(),
                            ca_file: ca_file.clone(),
                        }
                    }),
                },
                consumer_properties: consumer_properties.clone(),
                format: format.clone(),
            },
            processor: processor.clone(),
            sinks: sinks.clone(),
            retry: retry.clone(),
            dead_letter: dead_letter.clone(),
            workers: workers.clone(),
            batching: batching.clone(),
            commit: commit.clone(),
            memory: memory.clone(),
            delivery: delivery.clone(),
            server: ServerConfig {
                listen: format!("0.0.0.0:{WORKER_PORT}"),
                ..ServerConfig::default()
            },
        };
        name_rule(&config.pipeline)?;
        config.validate()?;
        SINKS.check("sinks", sinks.len())?;
        if let Some(t) = template {
            t.check()?;
        }
        for (field, n, max) in [
            ("secretEnv", secret_env.len(), SECRET_ENV_MAX),
            ("secretFiles", secret_files.len(), SECRET_FILES_MAX),
        ] {
            if n > max {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    message: format!("at most {max} entries, got {n}"),
                });
            }
        }
        if let ProcessorConfig::Custom { name } = processor {
            if image.is_none() {
                return Err(ConfigError::Invalid {
                    field: "processor.custom".into(),
                    message: format!(
                        "processor `{name}` needs spec.image: a worker image built with sluice_worker::run that registers it (the stock image has no custom processors)"
                    ),
                });
            }
        }
        if let Some(level) = log_level {
            log_level_filter(level)?;
        }
        if let Some(env) = format
            .as_ref()
            .and_then(|f| f.schema_registry.credentials_env.as_ref())
        {
            if !secret_env.iter().any(|e| &e.name == env) {
                return Err(ConfigError::Invalid {
                    field: "source.format.schemaRegistry.credentialsEnv".into(),
                    message: format!(
                        "`{env}` must be filled from a Secret: add it to spec.secretEnv"
                    ),
                });
            }
        }
        for (i, sink) in sinks.iter().enumerate() {
            if let SinkConfig::Kafka(k) = sink {
                let env = k
                    .format
                    .as_ref()
                    .and_then(|f| f.schema_registry.credentials_env.as_ref());
                if let Some(env) = env {
                    if !secret_env.iter().any(|e| &e.name == env) {
                        return Err(ConfigError::Invalid {
                            field: format!("sinks[{i}].kafka.format.schemaRegistry.credentialsEnv"),
                            message: format!(
                                "`{env}` must be filled from a Secret: add it to spec.secretEnv"
                            ),
                        });
                    }
                }
            }
            if let SinkConfig::Http(h) = sink {
                for (j, header) in h.headers.iter().enumerate() {
                    let Some(env) = &header.value_env else {
                        continue;
                    };
                    if !secret_env.iter().any(|e| &e.name == env) {
                        return Err(ConfigError::Invalid {
                            field: format!("sinks[{i}].http.headers[{j}].valueEnv"),
                            message: format!(
                                "`{env}` must be filled from a Secret: add it to spec.secretEnv"
                            ),
                        });
                    }
                }
            }
            if let SinkConfig::Postgres(pg) = sink {
                if !secret_env.iter().any(|e| e.name == pg.connection_env) {
                    return Err(ConfigError::Invalid {
                        field: format!("sinks[{i}].postgres.connectionEnv"),
                        message: format!(
                            "`{}` must be filled from a Secret: add it to spec.secretEnv",
                            pg.connection_env
                        ),
                    });
                }
            }
        }
        for (i, f) in secret_files.iter().enumerate() {
            if secret_files[..i].iter().any(|o| o.name == f.name) {
                return Err(ConfigError::Invalid {
                    field: format!("secretFiles[{i}].name"),
                    message: format!("`{}` is given twice", f.name),
                });
            }
        }
        // A file under the secret files' directory must be one of them.
        let mut files: Vec<(String, &str)> = Vec::new();
        for (field, f) in [
            ("source.security.caFile", ca_file),
            ("source.security.certFile", cert_file),
            ("source.security.keyFile", key_file),
        ] {
            if let Some(f) = f {
                files.push((field.into(), f));
            }
        }
        if let Some(f) = oauth.as_ref().and_then(|o| o.ca_file.as_ref()) {
            files.push(("source.security.oauth.caFile".into(), f));
        }
        if let Some(f) = format
            .as_ref()
            .and_then(|f| f.schema_registry.ca_file.as_ref())
        {
            files.push(("source.format.schemaRegistry.caFile".into(), f));
        }
        for (i, sink) in sinks.iter().enumerate() {
            if let SinkConfig::Postgres(pg) = sink {
                if let Some(f) = &pg.ca_file {
                    files.push((format!("sinks[{i}].postgres.caFile"), f));
                }
            }
            if let SinkConfig::Http(h) = sink {
                if let Some(f) = &h.ca_file {
                    files.push((format!("sinks[{i}].http.caFile"), f));
                }
            }
            if let SinkConfig::Kafka(k) = sink {
                if let Some(f) = k
                    .format
                    .as_ref()
                    .and_then(|f| f.schema_registry.ca_file.as_ref())
                {
                    files.push((format!("sinks[{i}].kafka.format.schemaRegistry.caFile"), f));
                }
            }
        }
        for (field, path) in files {
            let Some(file) = path.strip_prefix(&format!("{SECRET_FILES_DIR}/")) else {
                continue;
            };
            if !secret_files.iter().any(|f| f.name == file) {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!(
                        "`{path}` is not mounted: add {{name: {file}, secretKeyRef: ...}} to spec.secretFiles"
                    ),
                });
            }
        }
        for (i, e) in secret_env.iter().enumerate() {
            if RESERVED_ENV.contains(&e.name.as_str())
                || e.name.starts_with(crate::config::ENV_OVERRIDE_PREFIX)
                || secret_env[..i].iter().any(|o| o.name == e.name)
            {
                return Err(ConfigError::Invalid {
                    field: format!("secretEnv[{i}].name"),
                    message: format!(
                        "`{}` is reserved or given twice (SLUICE_CONFIG and SLUICE_LOG are set by sluice, SLUICE_SASL_PASSWORD, SLUICE_SSL_KEY_PASSWORD and SLUICE_OAUTH_CLIENT_SECRET come from source.security, SLUICE_TRANSACTIONAL_ID and HOSTNAME must differ between pods, SLUICE__* would override the configuration)",
                        e.name
                    ),
                });
            }
        }
        Ok(config)
    }
}

/// How a Secret key reaches the worker pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretUse<'a> {
    /// As the environment variable of this name.
    Env(&'a str),
    /// As the file of this name under [`SECRET_FILES_DIR`].
    File(&'a str),
}

impl StreamPipelineSpec {
    /// Every Secret key the worker pod is filled from, and how, in one list: what the
    /// Deployment mounts, and what the controller reads to reach Kafka as the workers do.
    pub fn secret_inputs(&self) -> Vec<(SecretUse<'_>, &SecretKeyRef)> {
        let mut out = Vec::new();
        if let Some(r) = &self.source.security.password_secret_ref {
            out.push((SecretUse::Env(SASL_PASSWORD_ENV), r));
        }
        if let Some(r) = &self.source.security.key_password_secret_ref {
            out.push((SecretUse::Env(SSL_KEY_PASSWORD_ENV), r));
        }
        if let Some(o) = &self.source.security.oauth {
            out.push((
                SecretUse::Env(OAUTH_CLIENT_SECRET_ENV),
                &o.client_secret_ref,
            ));
        }
        for e in &self.secret_env {
            out.push((SecretUse::Env(e.name.as_str()), &e.secret_key_ref));
        }
        for f in &self.secret_files {
            out.push((SecretUse::File(f.name.as_str()), &f.secret_key_ref));
        }
        out
    }
}

/// [`NAME_RULE`], for objects the API server stored before the rule existed.
fn name_rule(name: &str) -> Result<(), ConfigError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "metadata.name".into(),
            message: format!(
                "`{name}` cannot name the worker's objects: it must be a DNS-1035 label of at most {MAX_NAME_LEN} characters (lower-case letters, digits and '-', starting with a letter, ending with a letter or digit), because the Service is <name>-metrics and <name> is a label value"
            ),
        })
    }
}

/// `spec.logLevel`: comma-separated `level` or `target=level`, the schema's pattern.
fn log_level_filter(v: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let ident = |t: &str| {
        t.split("::").all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let ok = v.len() <= 256
        && v.split(',').all(|d| match d.split_once('=') {
            Some((target, level)) => ident(target) && LEVELS.contains(&level),
            None => LEVELS.contains(&d),
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "logLevel".into(),
            message: format!(
                "`{v}` is not a log filter: write comma-separated `level` or `target=level` with a level of trace, debug, info, warn, error or off (e.g. `info` or `debug,librdkafka=warn`)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::PER_PARTITION;
    use kube::CustomResourceExt;

    fn example() -> StreamPipeline {
        // Through JSON values: externally tagged enums are maps, as the API server sends them.
        let v: serde_json::Value = serde_yaml::from_str(
            r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamPipeline
metadata: {name: iot-enrich, namespace: default}
spec:
  source: {bootstrapServers: "kafka:9092", topic: iot-events, groupId: iot-enrich}
  sinks: [{kafka: {topic: iot-enriched}}]
  workers: {perPartition: 5, queueCapacity: 1024, ordering: key}
  batching: {maxMessages: 5000, maxBytes: 1MiB, linger: 5ms}
  scaling: {minReplicas: 1, maxReplicas: 10, lagPerReplica: 10000}
"#,
        )
        .unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn rendered_config_round_trips_through_the_worker_parser() {
        let rendered = example().worker_config().unwrap();
        let parsed = WorkerConfig::from_yaml(&rendered.to_yaml()).unwrap();
        assert_eq!(parsed, rendered);
        assert_eq!(parsed.pipeline, "iot-enrich");
        assert_eq!(parsed.server.listen, "0.0.0.0:9095");
    }

    #[test]
    fn the_password_is_an_env_reference_never_a_literal() {
        let mut p = example();
        p.spec.source.security = PipelineSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            username: Some("app".into()),
            password_secret_ref: Some(SecretKeyRef {
                name: "kafka-creds".into(),
                key: "password".into(),
            }),
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password_secret_ref: None,
            oauth: None,
        };
        let yaml = p.worker_config().unwrap().to_yaml();
        assert!(yaml.contains(SASL_PASSWORD_ENV), "{yaml}");
        assert!(!yaml.contains("kafka-creds"), "{yaml}");
    }

    #[test]
    fn a_ca_file_under_the_secret_files_dir_must_be_a_declared_secret_file() {
        let mut p = example();
        p.spec.source.security.protocol = SecurityProtocol::Ssl;
        p.spec.source.security.ca_file = Some(format!("{SECRET_FILES_DIR}/kafka-ca.pem"));
        let err = p.worker_config().unwrap_err().to_string();
        assert!(
            err.contains("source.security.caFile") && err.contains("spec.secretFiles"),
            "{err}"
        );
        p.spec.secret_files = vec![SecretFile {
            name: "kafka-ca.pem".into(),
            secret_key_ref: SecretKeyRef {
                name: "kafka-tls".into(),
                key: "ca.crt".into(),
            },
        }];
        let yaml = p.worker_config().unwrap().to_yaml();
        assert!(yaml.contains("/etc/sluice/secrets/kafka-ca.pem"), "{yaml}");
        // Twice the same name is refused.
        p.spec.secret_files.push(p.spec.secret_files[0].clone());
        let err = p.worker_config().unwrap_err().to_string();
        assert!(err.contains("secretFiles[1].name"), "{err}");
        // A path elsewhere (baked into a custom image) is the user's business.
        p.spec.secret_files.clear();
        p.spec.source.security.ca_file = Some("/etc/ssl/custom/ca.pem".into());
        assert!(p.worker_config().is_ok());
    }

    /// N16: `secretEnv` may not set what makes the exactly-once transactional id (one
    /// value in every replica: each would fence the others), in the schema's CEL rule and
    /// for objects stored before it.
    #[test]
    fn secret_env_may_not_set_the_transactional_id_or_the_host_name() {
        for name in ["SLUICE_TRANSACTIONAL_ID", "HOSTNAME"] {
            let mut p = example();
            p.spec.secret_env = vec![SecretEnv {
                name: name.into(),
                secret_key_ref: SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                },
            }];
            let err = p.worker_config().unwrap_err().to_string();
            assert!(err.contains("secretEnv[0].name"), "{name}: {err}");
        }
        let crd = serde_json::to_string(&StreamPipeline::crd()).unwrap();
        for name in RESERVED_ENV {
            assert!(
                crd.contains(&format!("'{name}'")),
                "the CEL rule names {name}"
            );
        }
    }

    #[test]
    fn cel_rules_mirror_the_constants_the_checks_read() {
        for name in RESERVED_ENV {
            assert!(SECRET_ENV_RULE.contains(&format!("'{name}'")), "{name}");
        }
        assert_eq!(
            SECRET_ENV_RULE.matches('\'').count(),
            2 * (RESERVED_ENV.len() + 1),
            "the rule quotes the reserved names and the override prefix, nothing else"
        );
        assert!(SECRET_ENV_RULE.contains(&format!(
            "startsWith('{}')",
            crate::config::ENV_OVERRIDE_PREFIX
        )));
        assert!(NAME_RULE.contains(&format!("size() <= {MAX_NAME_LEN}")));
        assert!(NAME_RULE_MESSAGE.contains(&format!("at most {MAX_NAME_LEN}")));
        let crd = serde_json::to_string(&StreamPipeline::crd()).unwrap();
        let rule = serde_json::to_string(SECRET_ENV_RULE).unwrap();
        assert!(crd.contains(&rule), "the CRD carries SECRET_ENV_RULE");
        for (rule, reserved) in [
            (TEMPLATE_LABELS_RULE, RESERVED_POD_LABELS),
            (TEMPLATE_ANNOTATIONS_RULE, RESERVED_POD_ANNOTATIONS),
        ] {
            assert!(rule.contains(&format!("startsWith('{SLUICE_KEY_PREFIX}')")));
            assert_eq!(rule.matches("', '").count() + 1, reserved.len(), "{rule}");
            for key in reserved {
                assert!(rule.contains(&format!("'{key}'")), "{rule} lacks {key}");
            }
            let json = serde_json::to_string(rule).unwrap();
            assert!(crd.contains(&json), "the CRD carries {rule}");
        }
    }

    #[test]
    fn the_schema_carries_the_bounds_the_checks_read() {
        let crd = serde_json::to_value(StreamPipeline::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let workers = &spec["properties"]["workers"]["properties"]["perPartition"];
        let n = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        assert_eq!(n(&workers["minimum"]), PER_PARTITION.min as f64);
        assert_eq!(n(&workers["maximum"]), PER_PARTITION.max as f64);
        let topic = &spec["properties"]["source"]["properties"]["topic"];
        assert_eq!(n(&topic["maxLength"]), TOPIC_NAME_LEN.max as f64);
        assert_eq!(topic["pattern"], TOPIC_NAME_PATTERN);
        assert_eq!(
            n(&spec["properties"]["sinks"]["maxItems"]),
            SINKS.max as f64
        );
    }

    #[test]
    fn a_template_may_add_to_the_pods_but_not_take_sluices_keys_or_weaken_its_security() {
        let t = |v: serde_json::Value| -> PodTemplate { serde_json::from_value(v).unwrap() };
        let ok = t(serde_json::json!({
            "metadata": {"labels": {"team": "payments", "app.kubernetes.io/part-of": "billing"},
                         "annotations": {"prometheus.io/scrape": "true"}},
            "securityContext": {"fsGroup": 2000, "runAsUser": 1000, "runAsNonRoot": true,
                                "seccompProfile": {"type": "Localhost", "localhostProfile": "sluice.json"}}
        }));
        ok.check().unwrap();
        for (v, field) in [
            (
                serde_json::json!({"metadata": {"labels": {"sluice.dev/pipeline": "x"}}}),
                r#"template.metadata.labels["sluice.dev/pipeline"]"#,
            ),
            (
                serde_json::json!({"metadata": {"labels": {"app.kubernetes.io/instance": "x"}}}),
                r#"template.metadata.labels["app.kubernetes.io/instance"]"#,
            ),
            (
                serde_json::json!({"metadata": {"annotations": {"sluice.dev/config-hash": "0"}}}),
                r#"template.metadata.annotations["sluice.dev/config-hash"]"#,
            ),
            (
                serde_json::json!({"metadata": {"annotations": {"prometheus.io/port": "80"}}}),
                r#"template.metadata.annotations["prometheus.io/port"]"#,
            ),
            (
                serde_json::json!({"securityContext": {"runAsNonRoot": false}}),
                "template.securityContext.runAsNonRoot",
            ),
            (
                serde_json::json!({"securityContext": {"runAsUser": 0}}),
                "template.securityContext.runAsUser",
            ),
            (
                serde_json::json!({"securityContext": {"runAsGroup": 0}}),
                "template.securityContext.runAsGroup",
            ),
            (
                serde_json::json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}),
                "template.securityContext.seccompProfile",
            ),
            (
                serde_json::json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}),
                "template.securityContext.appArmorProfile",
            ),
            (
                serde_json::json!({"securityContext": {"windowsOptions": {"hostProcess": true}}}),
                "template.securityContext.windowsOptions.hostProcess",
            ),
        ] {
            match t(v.clone()).check() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
        let many: BTreeMap<String, String> = (0..=TEMPLATE_KEYS_MAX)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        let e = t(serde_json::json!({"metadata": {"labels": many}}))
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("template.metadata.labels") && e.contains("at most 64"),
            "{e}"
        );
    }

    #[test]
    fn the_template_schema_is_the_pod_specs() {
        let crd = serde_json::to_value(StreamPipeline::crd()).unwrap();
        let t = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["template"]["properties"];
        let spread = &t["topologySpreadConstraints"]["items"];
        let required: Vec<&str> = spread["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for f in ["maxSkew", "topologyKey", "whenUnsatisfiable"] {
            assert!(required.contains(&f), "{required:?}");
        }
        assert_eq!(
            t["tolerations"]["items"]["properties"]["tolerationSeconds"]["type"],
            "integer"
        );
        assert!(t["affinity"]["properties"]["nodeAffinity"].is_object());
        assert_eq!(
            t["securityContext"]["properties"]["fsGroup"]["type"],
            "integer"
        );
    }

    #[test]
    fn scaling_rules_hold_for_objects_stored_before_them() {
        let s = |v: serde_json::Value| -> ScalingSpec { serde_json::from_value(v).unwrap() };
        let e = s(serde_json::json!({"minReplicas": 5, "maxReplicas": 2}))
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("scaling.maxReplicas") && e.contains("at least minReplicas"),
            "{e}"
        );
        let e = s(serde_json::json!({"maxReplicas": 5000}))
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 1 and 1000"), "{e}");
        let e = s(serde_json::json!({"lagPerReplica": 0}))
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("scaling.lagPerReplica"), "{e}");
        assert!(ScalingSpec::default().check().is_ok());
    }

    #[test]
    fn crd_has_scale_status_printer_columns_and_cel_rules() {
        let crd = serde_json::to_string(&StreamPipeline::crd()).unwrap();
        for want in [
            "\"specReplicasPath\":\".spec.replicas\"",
            "\"labelSelectorPath\":\".status.selector\"",
            "\"status\":{}",
            "\"name\":\"Partitions\"",
            "\"name\":\"Lag\"",
            "\"shortNames\":[\"sp\"]",
            "self.maxReplicas >= self.minReplicas",
            "x-kubernetes-int-or-string",
        ] {
            assert!(crd.contains(want), "CRD lacks {want}");
        }
    }
}
