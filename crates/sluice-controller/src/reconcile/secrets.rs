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

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::Api;
use kube::ResourceExt;
use rdkafka::ClientConfig;
use sha2::Sha256;
use sluice_api::config::security::{Credentials, FileRead, MissingCredential};
use sluice_api::config::SecurityConfig;
use sluice_api::crd::{SecretKeyRef, SecretUse, StreamPipeline, SECRET_FILES_DIR};

use crate::api::Verb;
use crate::cache::Cache;
use crate::context::{Context, PipelineKey};
use crate::error::Error;

/// The Secret, in the controller's own namespace, whose key `key` keys every pipeline's
/// digest of its Secrets ([`secrets_digest`]). The controller makes it, with
/// [`DIGEST_KEY_LEN`] random bytes, the first time a pipeline reads a Secret.
pub const DIGEST_KEY_SECRET: &str = "sluice-digest-key";
/// The key's length, in bytes (HMAC-SHA256's block is 64; its output 32).
pub const DIGEST_KEY_LEN: usize = 32;

/// The values of the Secret keys a pod gets, by how it gets them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PodSecrets {
    /// Environment variables.
    vars: BTreeMap<String, String>,
    /// Files under [`SECRET_FILES_DIR`], by name.
    files: BTreeMap<String, String>,
    /// The digest of every Secret key the pod reads ([`secrets_digest`]).
    digest: String,
}

/// The names of what it holds, never a value.
impl std::fmt::Debug for PodSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodSecrets")
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("digest", &self.digest)
            .finish()
    }
}

impl PodSecrets {
    /// Every Secret key the pods of `sp` read: the values the Kafka settings of
    /// `security` need (the password, files it names under [`SECRET_FILES_DIR`]), and the
    /// digest of them all. A missing Secret or key the Kafka settings need is
    /// [`Error::Secret`]; any other missing one only counts in the digest (the pods wait
    /// for it; when it comes, they roll).
    ///
    /// With the controller's watches, the Secrets are read (one GET each) only when one of
    /// them changed since the last reading: the watch shows their versions, and a reading
    /// is remembered with the versions it was made at. A steady pipeline reads none; a
    /// Secret the watch shows absent is not asked for.
    pub async fn load(
        ctx: &Context,
        sp: &StreamPipeline,
        security: &SecurityConfig,
    ) -> Result<Arc<Self>, Error> {
        let inputs = sp.spec.secret_inputs();
        if inputs.is_empty() {
            return Ok(Arc::default());
        }
        let ns = sp.namespace().unwrap_or_default();
        let (key, uid) = (
            PipelineKey::new(&ns, sp.name_any()),
            sp.metadata.uid.clone().unwrap_or_default(),
        );
        let cache = ctx.cache.get().filter(|c| c.ready());
        let seen = cache.map(|c| versions(c, &ns, &inputs, security));
        if let Some(seen) = &seen {
            let last = ctx.memory(&key, &uid, |m| {
                m.secrets
                    .as_ref()
                    .filter(|(at, _)| at == seen)
                    .map(|(_, s)| s.clone())
            });
            if let Some(last) = last {
                return Ok(last);
            }
        }
        let read = Arc::new(Self::read(ctx, &ns, &inputs, security, cache).await?);
        if let Some(seen) = seen {
            ctx.memory(&key, &uid, |m| m.secrets = Some((seen, read.clone())));
        }
        Ok(read)
    }

    /// Read `inputs` (each Secret once; none the watch in `cache` shows absent).
    async fn read(
        ctx: &Context,
        ns: &str,
        inputs: &[(SecretUse<'_>, &SecretKeyRef)],
        security: &SecurityConfig,
        cache: Option<&Cache>,
    ) -> Result<Self, Error> {
        let needed = needed_files(security);
        let mut out = PodSecrets::default();
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let mut read: BTreeMap<String, Option<Secret>> = BTreeMap::new();
        let mut values = Vec::with_capacity(inputs.len());
        for &(used, r) in inputs {
            if !read.contains_key(&r.name) {
                let absent = cache.is_some_and(|c| c.secret_version(ns, &r.name).is_none());
                let got = if absent {
                    None
                } else {
                    ctx.api.take(Verb::Get).await;
                    secrets.get_opt(&r.name).await?
                };
                read.insert(r.name.clone(), got);
            }
            let secret = read[&r.name].as_ref();
            values.push((used, r, secret.and_then(|s| bytes(s, r))));
            let wanted = match used {
                SecretUse::Env(var) => {
                    (var == security.password_env
                        && security.sasl_mechanism.is_some_and(|m| m.uses_password()))
                        || security.key_password_env.as_deref() == Some(var)
                        || security
                            .oauth
                            .as_ref()
                            .is_some_and(|o| o.client_secret_env == var)
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
        out.digest = secrets_digest(&digest_key(ctx).await?, &values);
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

/// What a reading of `inputs` depends on besides the values: which Secret keys are read
/// and how, the security settings (which of them Kafka needs), and the version of each
/// Secret as the watch shows it (`-`: absent). Names and versions only, never a value.
fn versions(
    cache: &Cache,
    ns: &str,
    inputs: &[(SecretUse<'_>, &SecretKeyRef)],
    security: &SecurityConfig,
) -> String {
    let mut out = format!("{security:?}\n");
    for (used, r) in inputs {
        let version = cache.secret_version(ns, &r.name);
        out.push_str(&format!(
            "{used:?}\0{}\0{}\0{}\n",
            r.name,
            r.key,
            version.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// The names of the files under [`SECRET_FILES_DIR`] that `security` reads.
fn needed_files(security: &SecurityConfig) -> Vec<String> {
    [
        security.ca_file.as_deref(),
        security.cert_file.as_deref(),
        security.key_file.as_deref(),
        security.oauth.as_ref().and_then(|o| o.ca_file.as_deref()),
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
/// leave it alone. Empty when the pod reads no Secret. 16 hex characters of an
/// HMAC-SHA256 under `key`, the controller's [`DIGEST_KEY_SECRET`]: the digest sits on the
/// pod template, which anyone who may read Deployments reads, and a plain hash of a
/// low-entropy value (a password) could be tested against guesses offline; without the
/// key it cannot.
pub fn secrets_digest(
    key: &[u8],
    inputs: &[(SecretUse<'_>, &SecretKeyRef, Option<Vec<u8>>)],
) -> String {
    if inputs.is_empty() {
        return String::new();
    }
    let mut h = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    let mut part = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
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
        .into_bytes()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key of the digests: the [`DIGEST_KEY_SECRET`] in the controller's namespace, read
/// once per process; made when absent (two controllers that both make it: the second's
/// create fails as a conflict, and it reads the first's). A lost key Secret is made
/// anew at the next start: every pipeline that reads a Secret then rolls its workers once.
pub(crate) async fn digest_key(ctx: &Context) -> Result<Arc<[u8]>, Error> {
    ctx.digest_key
        .get_or_try_init(|| async {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.home_namespace);
            for _ in 0..3 {
                ctx.api.take(Verb::Get).await;
                if let Some(s) = api.get_opt(DIGEST_KEY_SECRET).await? {
                    return key_of(&s);
                }
                let key: [u8; DIGEST_KEY_LEN] = rand::random();
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(DIGEST_KEY_SECRET.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            crate::context::MANAGER.to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "key".to_string(),
                        ByteString(key.to_vec()),
                    )])),
                    type_: Some("Opaque".into()),
                    ..Default::default()
                };
                ctx.api.take(Verb::Create).await;
                match api.create(&PostParams::default(), &s).await {
                    Ok(_) => return Ok(Arc::from(key.as_slice())),
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(Error::DigestKey(format!(
                "Secret {DIGEST_KEY_SECRET:?} in namespace {:?} could neither be read nor made",
                ctx.home_namespace
            )))
        })
        .await
        .cloned()
}

/// The key in the key Secret `s`.
fn key_of(s: &Secret) -> Result<Arc<[u8]>, Error> {
    match s.data.as_ref().and_then(|d| d.get("key")) {
        Some(k) if k.0.len() >= DIGEST_KEY_LEN => Ok(Arc::from(k.0.as_slice())),
        _ => Err(Error::DigestKey(format!(
            "Secret {DIGEST_KEY_SECRET:?} in namespace {:?} has no key `key` of at least {DIGEST_KEY_LEN} bytes: delete it, and the controller makes a new one",
            s.metadata.namespace.as_deref().unwrap_or_default()
        ))),
    }
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
            oauth: None,
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
        let key = [7u8; DIGEST_KEY_LEN];
        let d = |pw_value: Option<&str>, ca_value: &str, file: &str| {
            secrets_digest(
                &key,
                &[
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
                ],
            )
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
        assert_eq!(secrets_digest(&key, &[]), "", "no Secret, no digest");
    }

    /// The digest on the pod template is no guessing oracle: it is keyed, so it is neither
    /// the plain SHA-256 of what it covers (which a reader of the Deployment could test a
    /// guessed password against) nor the same under another controller's key.
    #[test]
    fn the_digest_is_keyed_not_a_plain_hash_of_the_values() {
        use sha2::{Digest, Sha256};
        let pw = SecretKeyRef {
            name: "kafka".into(),
            key: "password".into(),
        };
        let inputs = [(
            SecretUse::Env("SLUICE_SASL_PASSWORD"),
            &pw,
            Some(b"hunter2".to_vec()),
        )];
        // The same framing, unkeyed: what the digest was before it had a key.
        let mut h = Sha256::new();
        for p in [
            &b"env"[..],
            b"SLUICE_SASL_PASSWORD",
            b"kafka",
            b"password",
            b"=",
            b"hunter2",
        ] {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        let plain: String = h
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let one = secrets_digest(&[1u8; DIGEST_KEY_LEN], &inputs);
        let two = secrets_digest(&[2u8; DIGEST_KEY_LEN], &inputs);
        assert_eq!(one.len(), 16);
        assert_ne!(one, plain, "keyed");
        assert_ne!(one, two, "another key, another digest");
        // An empty key would be HMAC with a public key: equal for everyone.
        assert_ne!(one, secrets_digest(&[], &inputs));
    }

    #[test]
    fn a_key_secret_without_a_long_enough_key_is_refused() {
        let s = |v: &[u8]| -> Secret {
            Secret {
                data: Some(BTreeMap::from([("key".into(), ByteString(v.to_vec()))])),
                ..Default::default()
            }
        };
        assert!(key_of(&s(&[0; DIGEST_KEY_LEN])).is_ok());
        let e = key_of(&s(&[0; 8])).unwrap_err().to_string();
        assert!(
            e.contains(DIGEST_KEY_SECRET) && e.contains("delete it"),
            "{e}"
        );
        assert!(key_of(&Secret::default()).is_err());
    }
}
