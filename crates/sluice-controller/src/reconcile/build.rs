//! The children of a StreamPipeline, built as pure functions of a [`Validated`] pipeline:
//! a ConfigMap with the rendered worker config, a Deployment of workers, a metrics Service
//! and a PodDisruptionBudget. No client, no I/O: everything here is table-testable.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretKeySelector, SecretProjection, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};
use sluice_api::config::WorkerConfig;
use sluice_api::crd::{SecretUse, StreamPipeline, SECRET_FILES_DIR, WORKER_PORT};

/// Annotation on the pod template carrying the config hash: a new config rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "sluice.dev/config-hash";
/// Annotation on the pod template carrying the digest of every Secret key the pods read: a
/// rotated Secret rolls the pods.
pub const SECRETS_HASH_ANNOTATION: &str = "sluice.dev/secrets-hash";
/// Key of the worker config in its ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the worker config is mounted.
pub const CONFIG_DIR: &str = "/etc/sluice";
/// Annotation on every child: a digest of what sluice applied (the child without this
/// annotation). A child that still shows the digest of what sluice would apply now, and
/// that nobody changed since, is not applied again.
pub const APPLIED_HASH: &str = "sluice.dev/applied-hash";
/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";
/// The worker container's name.
pub const CONTAINER: &str = "worker";

/// The names of a pipeline's children, in one place: build, dereference and apply use them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildNames {
    /// The worker Deployment (the pipeline's own name).
    pub deployment: String,
    /// The ConfigMap with the rendered worker config.
    pub config_map: String,
    /// The metrics Service.
    pub service: String,
    /// The PodDisruptionBudget.
    pub pdb: String,
    /// The ServiceMonitor.
    pub service_monitor: String,
}

impl ChildNames {
    /// The children of the pipeline `name`.
    pub fn of(name: &str) -> Self {
        ChildNames {
            deployment: name.to_string(),
            config_map: format!("{name}-config"),
            service: format!("{name}-metrics"),
            pdb: name.to_string(),
            service_monitor: name.to_string(),
        }
    }
}

/// A pipeline that passed validation, with what the controller learned about it.
#[derive(Clone, Debug)]
pub struct Validated {
    /// The resource.
    pub pipeline: StreamPipeline,
    /// Its rendered worker config.
    pub config: WorkerConfig,
    /// The input topic's partition count.
    pub partitions: u32,
    /// The worker image to run.
    pub image: String,
    /// The digest of every Secret key the pods read (empty: they read none).
    pub secrets_digest: String,
}

impl Validated {
    fn name(&self) -> String {
        self.pipeline.metadata.name.clone().unwrap_or_default()
    }

    fn namespace(&self) -> Option<String> {
        self.pipeline.metadata.namespace.clone()
    }

    fn owner(&self) -> Vec<OwnerReference> {
        self.pipeline
            .controller_owner_ref(&())
            .into_iter()
            .collect()
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: self.namespace(),
            labels: Some(labels(&self.name())),
            owner_references: Some(self.owner()),
            ..Default::default()
        }
    }
}

/// The digest of `obj` as it serializes.
fn digest<T: serde::Serialize>(obj: &T) -> String {
    let json = serde_json::to_vec(obj).expect("a child serializes");
    Sha256::digest(&json)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `obj` with its [`APPLIED_HASH`] annotation, and that digest.
fn signed<T: serde::Serialize + Resource>(mut obj: T) -> (T, String) {
    let hash = digest(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH.to_string(), hash.clone());
    (obj, hash)
}

/// The digests of the children, as their [`APPLIED_HASH`] annotations carry them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hashes {
    /// The ConfigMap's.
    pub config_map: String,
    /// The Service's.
    pub service: String,
    /// The PodDisruptionBudget's.
    pub pdb: String,
    /// The Deployment's.
    pub deployment: String,
    /// The ServiceMonitor's, when there is one.
    pub service_monitor: Option<String>,
}

/// Every child of a pipeline, built, in the order they are applied.
#[derive(Clone, Debug)]
pub struct Children {
    /// Their names.
    pub names: ChildNames,
    /// The rendered worker config.
    pub config_map: ConfigMap,
    /// The metrics Service.
    pub service: Service,
    /// One worker down at a time.
    pub pdb: PodDisruptionBudget,
    /// The workers.
    pub deployment: Deployment,
    /// The ServiceMonitor, when the Prometheus Operator's CRD exists.
    pub service_monitor: Option<serde_json::Value>,
    /// Their digests.
    pub hashes: Hashes,
    /// The Deployment's replicas.
    pub replicas: i32,
}

impl Children {
    /// The children of `v` with `replicas` workers; a ServiceMonitor when `monitors`.
    pub fn build(v: &Validated, replicas: u32, monitors: bool) -> Self {
        let (config_map, cm) = signed(build_configmap(v));
        let (service, svc) = signed(build_service(v));
        let (pdb, p) = signed(build_pdb(v));
        let (deployment, d) = signed(build_deployment(v, replicas));
        let replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        let (service_monitor, sm) = match monitors.then(|| build_service_monitor(v)) {
            Some(mut sm) => {
                let hash = digest(&sm);
                sm["metadata"]["annotations"] = serde_json::json!({ APPLIED_HASH: hash });
                (Some(sm), Some(hash))
            }
            None => (None, None),
        };
        Children {
            names: ChildNames::of(&v.name()),
            config_map,
            service,
            pdb,
            deployment,
            service_monitor,
            hashes: Hashes {
                config_map: cm,
                service: svc,
                pdb: p,
                deployment: d,
                service_monitor: sm,
            },
            replicas,
        }
    }
}

/// The label naming a worker pod's pipeline (beside the recommended `app.kubernetes.io/*`).
pub const PIPELINE_LABEL: &str = "sluice.dev/pipeline";

/// Labels of every child, and the worker pods' selector.
pub fn labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sluice-worker".into()),
        ("app.kubernetes.io/instance".into(), pipeline.into()),
        ("app.kubernetes.io/managed-by".into(), "sluice".into()),
        (PIPELINE_LABEL.into(), pipeline.into()),
    ])
}

/// The selector of a pipeline's worker pods, as a label selector string (scale subresource).
pub fn selector_string(pipeline: &str) -> String {
    labels(pipeline)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rendered worker config (YAML) and its hash.
pub fn rendered_config(config: &WorkerConfig) -> (String, String) {
    let yaml = config.to_yaml();
    let digest = Sha256::digest(yaml.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    (yaml, hash)
}

/// The ConfigMap `<name>-config` holding `config.yaml`. It never holds a secret: the SASL
/// password is named by an environment variable filled from a Secret reference.
pub fn build_configmap(v: &Validated) -> ConfigMap {
    let (yaml, _) = rendered_config(&v.config);
    ConfigMap {
        metadata: v.meta(ChildNames::of(&v.name()).config_map),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The worker Deployment with `replicas` pods, never more than the partition count.
pub fn build_deployment(v: &Validated, replicas: u32) -> Deployment {
    let name = v.name();
    let replicas = replicas.min(v.partitions) as i32;
    let (_, hash) = rendered_config(&v.config);
    let spec = &v.pipeline.spec;
    let mut env = vec![
        EnvVar {
            name: "SLUICE_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/{CONFIG_KEY}")),
            ..Default::default()
        },
        EnvVar {
            name: "SLUICE_LOG".into(),
            value: Some(spec.log_level.clone().unwrap_or_else(|| "info".into())),
            ..Default::default()
        },
    ];
    let from_secret = |name: &str, secret: &sluice_api::crd::SecretKeyRef| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let inputs = spec.secret_inputs();
    for (used, secret) in &inputs {
        if let SecretUse::Env(name) = used {
            env.push(from_secret(name, secret));
        }
    }
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: ChildNames::of(&name).config_map,
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut volume_mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    // spec.secretFiles: one projected volume, each Secret key a file under SECRET_FILES_DIR.
    let sources: Vec<VolumeProjection> = inputs
        .iter()
        .filter_map(|(used, secret)| match used {
            SecretUse::File(file) => Some(VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: secret.key.clone(),
                        path: file.to_string(),
                        mode: None,
                    }]),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            SecretUse::Env(_) => None,
        })
        .collect();
    if !sources.is_empty() {
        volumes.push(Volume {
            name: "secret-files".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                default_mode: Some(0o444),
            }),
            ..Default::default()
        });
        volume_mounts.push(VolumeMount {
            name: "secret-files".into(),
            mount_path: SECRET_FILES_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    // SIGTERM drains in-flight work (bounded by drainTimeout), then flushes the sinks (bounded
    // by drainTimeout again) and commits: give it both and some room.
    let grace = 2 * v.config.commit.drain_timeout.0.as_secs() as i64 + 15;
    let container = Container {
        name: CONTAINER.into(),
        image: Some(v.image.clone()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: WORKER_PORT as i32,
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: spec.resources.clone(),
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let template = spec.template.clone().unwrap_or_default();
    let extra = template.metadata.clone().unwrap_or_default();
    // The template's labels and annotations first, sluice's over them (validation refuses
    // a template key of sluice's anyway).
    let mut pod_labels = extra.labels;
    pod_labels.extend(labels(&name));
    let mut pod_annotations = extra.annotations;
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.to_string(), hash);
    if !v.secrets_digest.is_empty() {
        pod_annotations.insert(
            SECRETS_HASH_ANNOTATION.to_string(),
            v.secrets_digest.clone(),
        );
    }
    pod_annotations.insert("prometheus.io/port".into(), WORKER_PORT.to_string());
    Deployment {
        metadata: v.meta(name.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels(&name)),
                ..Default::default()
            },
            // One pod at a time: every change is a rebalance, so keep them few and drained.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(grace),
                    automount_service_account_token: Some(
                        template.automount_service_account_token.unwrap_or(false),
                    ),
                    security_context: Some(pod_security_context(
                        template.security_context.as_ref(),
                    )),
                    volumes: Some(volumes),
                    node_selector: template.node_selector,
                    tolerations: template.tolerations,
                    affinity: template.affinity,
                    topology_spread_constraints: template.topology_spread_constraints,
                    priority_class_name: template.priority_class_name,
                    service_account_name: template.service_account_name,
                    image_pull_secrets: template.image_pull_secrets,
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// sluice's pod security context (non-root, user and group 65532, seccomp RuntimeDefault)
/// with the template's fields added: a field the template sets replaces sluice's (validation
/// refused those that would weaken it), `runAsNonRoot` stays true.
pub fn pod_security_context(extra: Option<&PodSecurityContext>) -> PodSecurityContext {
    let base = PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let Some(extra) = extra else { return base };
    let mut merged = serde_json::to_value(&base).expect("a security context serializes");
    if let (Some(m), serde_json::Value::Object(e)) = (
        merged.as_object_mut(),
        serde_json::to_value(extra).expect("a security context serializes"),
    ) {
        for (k, v) in e {
            if !v.is_null() {
                m.insert(k, v);
            }
        }
    }
    let mut out: PodSecurityContext =
        serde_json::from_value(merged).expect("a merged security context parses");
    out.run_as_non_root = Some(true);
    out
}

/// The metrics Service `<name>-metrics` (port `metrics`), scraped by a ServiceMonitor.
/// Headless: Prometheus scrapes each pod through the Service's endpoints, never through a
/// virtual IP, so the Service takes no address from the cluster's service range (with
/// thousands of pipelines a ClusterIP each would exhaust it).
pub fn build_service(v: &Validated) -> Service {
    let name = v.name();
    Service {
        metadata: v.meta(ChildNames::of(&name).service),
        spec: Some(ServiceSpec {
            cluster_ip: Some(HEADLESS.into()),
            selector: Some(labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: WORKER_PORT as i32,
                target_port: Some(IntOrString::String("metrics".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A PodDisruptionBudget allowing one worker down at a time (each departure is a rebalance).
pub fn build_pdb(v: &Validated) -> PodDisruptionBudget {
    let name = v.name();
    PodDisruptionBudget {
        metadata: v.meta(name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Prometheus Operator ServiceMonitor for the workers' metrics Service (applied only when
/// the `servicemonitors.monitoring.coreos.com` CRD exists).
pub fn build_service_monitor(v: &Validated) -> serde_json::Value {
    let name = v.name();
    serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": name,
            "namespace": v.namespace(),
            "labels": labels(&name),
            "ownerReferences": v.owner(),
        },
        "spec": {
            "selector": {"matchLabels": labels(&name)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::config::{SaslMechanism, SecurityProtocol};
    use sluice_api::crd::{PipelineSecurity, PodTemplate, SecretKeyRef, SASL_PASSWORD_ENV};

    fn pipeline(extra: &str) -> StreamPipeline {
        let v: serde_json::Value = serde_yaml::from_str(&format!(
            r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamPipeline
metadata: {{name: iot-enrich, namespace: prod, uid: 1234-abcd}}
spec:
  source: {{bootstrapServers: "kafka:9092", topic: iot-events, groupId: iot-enrich}}
  sinks: [{{kafka: {{topic: iot-enriched}}}}]
{extra}
"#
        ))
        .unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn validated(p: StreamPipeline, partitions: u32) -> Validated {
        let config = p.worker_config().unwrap();
        Validated {
            pipeline: p,
            config,
            partitions,
            image: "sluice/worker:test".into(),
            secrets_digest: String::new(),
        }
    }

    #[test]
    fn the_metrics_service_is_headless_and_selects_the_workers() {
        let v = validated(pipeline(""), 8);
        let spec = build_service(&v).spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector, Some(labels("iot-enrich")));
        assert_eq!(spec.ports.unwrap()[0].name.as_deref(), Some("metrics"));
    }

    #[test]
    fn every_child_is_owned_by_the_pipeline_and_labelled() {
        let v = validated(pipeline(""), 8);
        let metas = [
            build_configmap(&v).metadata,
            build_deployment(&v, 2).metadata,
            build_service(&v).metadata,
            build_pdb(&v).metadata,
        ];
        for m in metas {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("StreamPipeline", "iot-enrich", Some(true))
            );
            assert_eq!(m.namespace.as_deref(), Some("prod"));
            assert_eq!(
                m.labels.as_ref().unwrap()["sluice.dev/pipeline"],
                "iot-enrich"
            );
        }
    }

    #[test]
    fn replicas_never_exceed_the_partition_count() {
        let v = validated(pipeline(""), 3);
        for (asked, want) in [(0, 0), (1, 1), (3, 3), (4, 3), (100, 3)] {
            assert_eq!(
                build_deployment(&v, asked).spec.unwrap().replicas,
                Some(want),
                "asked {asked}"
            );
        }
    }

    #[test]
    fn the_configmap_round_trips_through_the_worker_parser() {
        let v = validated(
            pipeline("  workers: {perPartition: 3, ordering: unordered}"),
            8,
        );
        let cm = build_configmap(&v);
        let yaml = &cm.data.unwrap()[CONFIG_KEY];
        assert_eq!(WorkerConfig::from_yaml(yaml).unwrap(), v.config);
    }

    #[test]
    fn a_config_change_changes_the_pod_template_hash() {
        let hash = |v: &Validated| {
            build_deployment(v, 1)
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        let a = validated(pipeline(""), 8);
        let b = validated(pipeline("  batching: {linger: 1ms}"), 8);
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(
            hash(&a),
            hash(&validated(pipeline(""), 8)),
            "the hash is deterministic"
        );
    }

    #[test]
    fn a_rotated_secret_changes_the_pod_template_and_no_secret_adds_nothing() {
        let annotations = |digest: &str| {
            let mut v = validated(pipeline(""), 8);
            v.secrets_digest = digest.into();
            build_deployment(&v, 1)
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()
        };
        let (a, b, none) = (annotations("0a"), annotations("0b"), annotations(""));
        assert_eq!(a[SECRETS_HASH_ANNOTATION], "0a");
        assert_ne!(
            a, b,
            "another digest is another pod template: the pods roll"
        );
        assert_eq!(a[CONFIG_HASH_ANNOTATION], b[CONFIG_HASH_ANNOTATION]);
        assert!(
            !none.contains_key(SECRETS_HASH_ANNOTATION),
            "a pipeline that reads no Secret keeps its pod template"
        );
    }

    #[test]
    fn secrets_reach_pods_only_through_env_references() {
        let mut p = pipeline("");
        p.spec.source.security = PipelineSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::Plain),
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
        let v = validated(p, 8);
        let d = build_deployment(&v, 1);
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let env = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == SASL_PASSWORD_ENV)
            .unwrap();
        assert!(env.value.is_none());
        let sel = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (sel.name.as_str(), sel.key.as_str()),
            ("kafka-creds", "password")
        );
        let cm = serde_json::to_string(&build_configmap(&v)).unwrap();
        assert!(
            !cm.contains("kafka-creds") && !cm.contains("password\""),
            "{cm}"
        );
    }

    #[test]
    fn secret_files_are_one_read_only_projected_volume_and_never_in_the_configmap() {
        let p = pipeline(
            "  secretFiles:\n    - {name: kafka-ca.pem, secretKeyRef: {name: kafka-tls, key: ca.crt}}\n    - {name: pg-ca.pem, secretKeyRef: {name: db-tls, key: ca.crt}}",
        );
        let v = validated(p, 8);
        let d = build_deployment(&v, 1);
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let vol = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "secret-files")
            .expect("the secret files volume");
        let sources = vol.projected.as_ref().unwrap().sources.as_ref().unwrap();
        let files: Vec<(&str, &str, &str)> = sources
            .iter()
            .map(|s| {
                let s = s.secret.as_ref().unwrap();
                let item = &s.items.as_ref().unwrap()[0];
                (s.name.as_str(), item.key.as_str(), item.path.as_str())
            })
            .collect();
        assert_eq!(
            files,
            [
                ("kafka-tls", "ca.crt", "kafka-ca.pem"),
                ("db-tls", "ca.crt", "pg-ca.pem")
            ]
        );
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "secret-files")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (SECRET_FILES_DIR, Some(true))
        );
        let cm = serde_json::to_string(&build_configmap(&v)).unwrap();
        assert!(!cm.contains("kafka-tls") && !cm.contains("db-tls"), "{cm}");
        // Without secret files, no such volume.
        let plain = build_deployment(&validated(pipeline(""), 8), 1);
        let vols = plain.spec.unwrap().template.spec.unwrap().volumes.unwrap();
        assert_eq!(vols.len(), 1);
    }

    #[test]
    fn a_client_certificate_is_mounted_and_its_key_password_is_an_env_reference() {
        let p = pipeline(
            "  secretFiles:\n    - {name: user.crt, secretKeyRef: {name: iot, key: user.crt}}\n    - {name: user.key, secretKeyRef: {name: iot, key: user.key}}",
        );
        let mut p = p;
        let sec = &mut p.spec.source.security;
        sec.protocol = SecurityProtocol::Ssl;
        sec.cert_file = Some(format!("{SECRET_FILES_DIR}/user.crt"));
        sec.key_file = Some(format!("{SECRET_FILES_DIR}/user.key"));
        sec.key_password_secret_ref = Some(SecretKeyRef {
            name: "iot".into(),
            key: "user.password".into(),
        });
        let v = validated(p, 8);
        let pod = build_deployment(&v, 1).spec.unwrap().template.spec.unwrap();
        let env = pod.containers[0].env.clone().unwrap();
        let e = env
            .iter()
            .find(|e| e.name == sluice_api::crd::SSL_KEY_PASSWORD_ENV)
            .expect("the key password variable");
        let sel = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (sel.name.as_str(), sel.key.as_str()),
            ("iot", "user.password")
        );
        let cm = build_configmap(&v).data.unwrap()[CONFIG_KEY].clone();
        assert!(
            cm.contains("certFile: /etc/sluice/secrets/user.crt"),
            "{cm}"
        );
        assert!(
            cm.contains("keyPasswordEnv: SLUICE_SSL_KEY_PASSWORD"),
            "{cm}"
        );
        assert!(!cm.contains("user.password"), "{cm}");
    }

    #[test]
    fn the_pod_template_is_merged_into_the_workers_and_keeps_the_selector_and_the_defaults() {
        let v = validated(
            pipeline(
                r#"  template:
    metadata:
      labels: {team: payments}
      annotations: {iam.example/role: kafka-reader}
    nodeSelector: {pool: streaming}
    tolerations: [{key: dedicated, operator: Equal, value: streaming, effect: NoSchedule}]
    affinity:
      podAntiAffinity:
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {sluice.dev/pipeline: iot-enrich}}}
    topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}]
    priorityClassName: streaming-high
    serviceAccountName: iot-enrich
    automountServiceAccountToken: true
    imagePullSecrets: [{name: registry}]
    securityContext: {fsGroup: 2000, supplementalGroups: [3000]}"#,
            ),
            8,
        );
        let d = build_deployment(&v, 2);
        let spec = d.spec.unwrap();
        assert_eq!(spec.selector.match_labels, Some(labels("iot-enrich")));
        let meta = spec.template.metadata.unwrap();
        let l = meta.labels.unwrap();
        assert_eq!(l["team"], "payments");
        assert_eq!(l["sluice.dev/pipeline"], "iot-enrich");
        let a = meta.annotations.unwrap();
        assert_eq!(a["iam.example/role"], "kafka-reader");
        assert!(a.contains_key(CONFIG_HASH_ANNOTATION));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["pool"], "streaming");
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(pod.topology_spread_constraints.unwrap()[0].max_skew, 1);
        assert_eq!(pod.priority_class_name.as_deref(), Some("streaming-high"));
        assert_eq!(pod.service_account_name.as_deref(), Some("iot-enrich"));
        assert_eq!(pod.automount_service_account_token, Some(true));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        let sc = pod.security_context.unwrap();
        assert_eq!(
            (sc.fs_group, sc.supplemental_groups),
            (Some(2000), Some(vec![3000]))
        );
        // sluice's defaults stay.
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        // Without a template: no token, sluice's context only.
        let plain = build_deployment(&validated(pipeline(""), 8), 1);
        let pod = plain.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.security_context, Some(pod_security_context(None)));
        assert!(pod.tolerations.is_none() && pod.node_selector.is_none());
    }

    #[test]
    fn every_label_and_annotation_sluice_puts_on_the_pods_is_refused_in_the_template() {
        let d = build_deployment(&validated(pipeline(""), 8), 1);
        let meta = d.spec.unwrap().template.metadata.unwrap();
        for (what, keys) in [
            ("labels", meta.labels.unwrap()),
            ("annotations", meta.annotations.unwrap()),
        ] {
            for k in keys.keys() {
                let t: PodTemplate = serde_json::from_value(
                    serde_json::json!({"metadata": {what: {k.as_str(): "x"}}}),
                )
                .unwrap();
                assert!(
                    t.check().is_err(),
                    "the template may set the {what} key {k}"
                );
            }
        }
    }

    #[test]
    fn a_jq_program_that_does_not_compile_is_an_invalid_spec_naming_the_position() {
        let p = pipeline("  processor: {jq: {program: '{a: .b | nope}'}}");
        let err = p.worker_config().unwrap_err().to_string();
        assert!(
            err.contains("processor.jq.program")
                && err.contains("undefined filter `nope`")
                && err.contains("line 1, column 10"),
            "{err}"
        );
    }

    #[test]
    fn a_postgres_connection_string_comes_from_a_secret_env_and_must_be_declared() {
        let mut p = pipeline("");
        p.spec.sinks = vec![serde_json::from_value(serde_json::json!(
            {"postgres": {"table": "readings", "connectionEnv": "PG_URL"}}
        ))
        .unwrap()];
        let err = p.worker_config().unwrap_err().to_string();
        assert!(
            err.contains("sinks[0].postgres.connectionEnv") && err.contains("secretEnv"),
            "{err}"
        );
        p.spec.secret_env = vec![sluice_api::crd::SecretEnv {
            name: "PG_URL".into(),
            secret_key_ref: SecretKeyRef {
                name: "pg-creds".into(),
                key: "url".into(),
            },
        }];
        let v = validated(p, 8);
        let d = build_deployment(&v, 1);
        let env = d.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let e = env.iter().find(|e| e.name == "PG_URL").unwrap();
        assert!(e.value.is_none());
        let sel = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("pg-creds", "url"));
        let cm = serde_json::to_string(&build_configmap(&v)).unwrap();
        assert!(!cm.contains("pg-creds"), "{cm}");
    }

    #[test]
    fn pods_are_locked_down_and_probed_on_the_health_endpoints() {
        let d = build_deployment(&validated(pipeline(""), 8), 1);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert!(
            pod.termination_grace_period_seconds.unwrap() > 10,
            "longer than the drain timeout"
        );
    }

    #[test]
    fn the_service_monitor_scrapes_the_metrics_port_of_the_workers() {
        let sm = build_service_monitor(&validated(pipeline(""), 8));
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["sluice.dev/pipeline"],
            "iot-enrich"
        );
        assert_eq!(
            sm["metadata"]["ownerReferences"][0]["kind"],
            "StreamPipeline"
        );
    }

    #[test]
    fn service_and_pdb_select_the_workers() {
        let v = validated(pipeline(""), 8);
        let svc = build_service(&v).spec.unwrap();
        assert_eq!(svc.selector.unwrap(), labels("iot-enrich"));
        assert_eq!(svc.ports.unwrap()[0].port, 9095);
        let pdb = build_pdb(&v).spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(selector_string("p"), "app.kubernetes.io/instance=p,app.kubernetes.io/managed-by=sluice,app.kubernetes.io/name=sluice-worker,sluice.dev/pipeline=p");
    }
}
