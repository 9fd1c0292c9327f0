//! The Secret keys a worker pod is filled from, read by the controller, so that its own Kafka
//! client (partition counts, lag) connects as the workers do: the same security settings,
//! built by the same code ([`SecurityConfig::librdkafka`]), with the SASL password from its
//! Secret, the key's password from its Secret, and the CA, client certificate and key
//! from the Secrets `spec.secretFiles` mounts them from, passed by content (`ssl.ca.pem`,
//! `ssl.certificate.pem`, `ssl.key.pem`), since the controller has no such files.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rdkafka::ClientConfig;
use sluice_api::config::security::{Credentials, FileRead, MissingCredential};
use sluice_api::config::SecurityConfig;
use sluice_api::crd::{SecretKeyRef, SecretUse, StreamPipelineSpec, SECRET_FILES_DIR};

use crate::error::Error;

/// The values of the Secret keys a pod gets, by how it gets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSecrets {
    /// Environment variables.
    vars: BTreeMap<String, String>,
    /// Files under [`SECRET_FILES_DIR`], by name.
    files: BTreeMap<String, String>,
}

impl PodSecrets {
    /// Read the Secret keys of `spec` that the Kafka settings of `security` need (the
    /// password, files it names under [`SECRET_FILES_DIR`]). A missing Secret or key is
    /// [`Error::Secret`].
    pub async fn load(
        client: &Client,
        ns: &str,
        spec: &StreamPipelineSpec,
        security: &SecurityConfig,
    ) -> Result<Self, Error> {
        let needed = needed_files(security);
        let mut out = PodSecrets::default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let mut read: BTreeMap<String, Secret> = BTreeMap::new();
        for (used, r) in spec.secret_inputs() {
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
            if !read.contains_key(&r.name) {
                let s = secrets
                    .get_opt(&r.name)
                    .await?
                    .ok_or_else(|| Error::Secret(r.name.clone(), "not found".into()))?;
                read.insert(r.name.clone(), s);
            }
            let value = key(&read[&r.name], r)?;
            match used {
                SecretUse::Env(var) => out.vars.insert(var.to_string(), value),
                SecretUse::File(file) => out.files.insert(file.to_string(), value),
            };
        }
        Ok(out)
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
}
