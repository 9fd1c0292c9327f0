//! The Secret keys a worker pod is filled from, read by the controller, so that its own Kafka
//! client (partition counts, lag) connects as the workers do: the same security settings,
//! built by the same code ([`SecurityConfig::librdkafka`]), with the SASL password from its
//! Secret, the key's password from its Secret, and the CA, client certificate and key
//! from the Secrets `spec.secretFiles` mounts them from, passed by content (`ssl.ca.pem`,
//! `ssl.certificate.pem`, `ssl.key.pem`), since the controller has no such files.
//!
//! It also reads every other Secret key the pods read (`secretEnv`, `secretFiles`), for a
//! digest of them on the pod template ([`secrets_digest`]): a rotated password, CA or
//! client certificate changes the template, and the Deployment rolls the pods one at a
//! time, each drained on SIGTERM. Secrets are watched (`controller.rs`), so the roll follows
//! the change rather than the next poll.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};
use sluice_api::config::security::{Credentials, FileRead, MissingCredential};
use sluice_api::config::SecurityConfig;
use sluice_api::crd::{SecretKeyRef, SecretUse, StreamPipelineSpec, SECRET_FILES_DIR};

use crate::api::Verb;
use crate::context::Context;
use crate::error::Error;

/// The values of the Secret keys a pod gets, by how it gets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSecrets {
    /// Environment variables.
    vars: BTreeMap<String, String>,
    /// Files under [`SECRET_FILES_DIR`], by name.
    files: BTreeMap<String, String>,
    /// The digest of every Secret key the pod reads ([`secrets_digest`]).
    digest: String,
}

impl PodSecrets {
    /// Read every Secret key of `spec` (each Secret once): the values the Kafka settings
    /// of `security` need (the password, files it names under [`SECRET_FILES_DIR`]), and
    /// the digest of them all. A missing Secret or key the Kafka settings need is
    /// [`Error::Secret`]; any other missing one only counts in the digest (the pods wait
    /// for it; when it comes, they roll).
    pub async fn load(
        ctx: &Context,
        ns: &str,
        spec: &StreamPipelineSpec,
        security: &SecurityConfig,
    ) -> Result<Self, Error> {
        let needed = needed_files(security);
        let mut out = PodSecrets::default();
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let mut read: BTreeMap<String, Option<Secret>> = BTreeMap::new();
        let inputs = spec.secret_inputs();
        let mut values = Vec::with_capacity(inputs.len());
        for (used, r) in inputs {
            if !read.contains_key(&r.name) {
                ctx.api.take(Verb::Get).await;
                read.insert(r.name.clone(), secrets.get_opt(&r.name).await?);
            }
            let secret = read[&r.name].as_ref();
            values.push((used, r, secret.and_then(|s| bytes(s, r))));
            let wanted = match used {
                SecretUse::Env(var) => {
                    (var == security.password_env && security.sasl_mechanism.is_some())
                        || security.key_password_env.as_deref() == Some(var)
                }
                SecretUse::File(file) => needed.contains(&file.to_string()),
            };
            if !wanted {
                continue;
            }
            let secret = secret.ok_or_else(|| Error::Secret(r.name.clone(), "not found".into()))?;
            let value = key(secret, r)?;
            match used {
                SecretUse::Env(var) => out.vars.insert(var.to_string(), value),
                SecretUse::File(file) => out.files.insert(file.to_string(), value),
            };
        }
        out.digest = secrets_digest(&values);
        Ok(out)
    }

    /// The digest of every Secret key the pod reads (empty when it reads none).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The librdkafka client settings for `bootstrap` with `security`.
    pub fn client_config(
        &self,
        bootstrap: &str,
        security: &SecurityConfig,
    ) -> Result<ClientConfig, MissingCredential> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap);
        for (k, v) in security.librdkafka(self)? {
            c.set(k, v);
        }
        Ok(c)
    }
}

impl Credentials for PodSecrets {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }
    fn file(&self, path: &str) -> FileRead {
        path.strip_prefix(SECRET_FILES_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .and_then(|name| self.files.get(name))
            .map_or(FileRead::Unavailable, |pem| FileRead::Pem(pem.clone()))
    }
}

/// The names of the files under [`SECRET_FILES_DIR`] that `security` reads.
fn needed_files(security: &SecurityConfig) -> Vec<String> {
    [
        security.ca_file.as_deref(),
        security.cert_file.as_deref(),
        security.key_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| p.strip_prefix(&format!("{SECRET_FILES_DIR}/")))
    .map(str::to_string)
    .collect()
}

/// A digest of the Secret keys a pod reads, as it reads them: for each, the variable or
/// file, the Secret and key, and the value (or that there is none yet). It changes when one
/// of them does, and only then: another key of the same Secret, or the Secret's labels,
/// leave it alone. Empty when the pod reads no Secret. 16 hex characters of a SHA-256, like
/// the config's hash (a digest, never a value: the values stay in their Secrets).
pub fn secrets_digest(inputs: &[(SecretUse<'_>, &SecretKeyRef, Option<Vec<u8>>)]) -> String {
    if inputs.is_empty() {
        return String::new();
    }
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for (used, r, value) in inputs {
        let (how, name) = match used {
            SecretUse::Env(n) => ("env", *n),
            SecretUse::File(n) => ("file", *n),
        };
        for p in [how, name, r.name.as_str(), r.key.as_str()] {
            part(p.as_bytes());
        }
        match value {
            Some(v) => {
                part(b"=");
                part(v);
            }
            None => part(b"missing"),
        }
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The bytes of `r`'s key in `s`, if it has it.
fn bytes(s: &Secret, r: &SecretKeyRef) -> Option<Vec<u8>> {
    s.data.as_ref()?.get(&r.key).map(|v| v.0.clone())
}

/// The value of `r`'s key in `s`.
fn key(s: &Secret, r: &SecretKeyRef) -> Result<String, Error> {
    s.data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|v| String::from_utf8_lossy(&v.0).to_string())
        .ok_or_else(|| Error::Secret(r.name.clone(), format!("has no key `{}`", r.key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::config::{SaslMechanism, SecurityProtocol};

    #[test]
    fn the_controller_reaches_kafka_with_the_ca_and_password_the_workers_get() {
        let secrets = PodSecrets {
            vars: BTreeMap::from([("SLUICE_SASL_PASSWORD".into(), "pw".into())]),
            files: BTreeMap::from([("ca.pem".into(), "-----BEGIN CERTIFICATE-----".into())]),
            digest: String::new(),
        };
        let security = SecurityConfig {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha256),
            username: Some("app".into()),
            password_env: "SLUICE_SASL_PASSWORD".into(),
            ca_file: Some(format!("{SECRET_FILES_DIR}/ca.pem")),
            cert_file: None,
            key_file: None,
            key_password_env: None,
        };
        let c = secrets.client_config("k:9093", &security).unwrap();
        assert_eq!(c.get("ssl.ca.pem"), Some("-----BEGIN CERTIFICATE-----"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("ssl.ca.location"), None);
        assert_eq!(needed_files(&security), ["ca.pem"]);
    }

    #[test]
    fn the_digest_changes_with_a_value_the_pod_reads_and_only_then() {
        let pw = SecretKeyRef {
            name: "kafka".into(),
            key: "password".into(),
        };
        let ca = SecretKeyRef {
            name: "kafka-tls".into(),
            key: "ca.crt".into(),
        };
        let d = |pw_value: Option<&str>, ca_value: &str, file: &str| {
            secrets_digest(&[
                (
                    SecretUse::Env("SLUICE_SASL_PASSWORD"),
                    &pw,
                    pw_value.map(|v| v.as_bytes().to_vec()),
                ),
                (
                    SecretUse::File(file),
                    &ca,
                    Some(ca_value.as_bytes().to_vec()),
                ),
            ])
        };
        let base = d(Some("one"), "CA1", "ca.pem");
        assert_eq!(base.len(), 16);
        assert_eq!(base, d(Some("one"), "CA1", "ca.pem"), "deterministic");
        assert_ne!(base, d(Some("two"), "CA1", "ca.pem"), "a rotated password");
        assert_ne!(base, d(Some("one"), "CA2", "ca.pem"), "a rotated CA");
        assert_ne!(base, d(Some("one"), "CA1", "other.pem"), "another file");
        assert_ne!(
            d(None, "CA1", "ca.pem"),
            d(Some(""), "CA1", "ca.pem"),
            "missing is not empty"
        );
        // Values cannot slide into each other.
        assert_ne!(d(Some("oneC"), "A1", "ca.pem"), base);
        assert!(!base.contains("one") && !base.contains("CA1"));
        assert_eq!(secrets_digest(&[]), "", "no Secret, no digest");
    }
}
