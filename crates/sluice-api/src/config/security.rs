//! `source.security`: how every Kafka client of a pipeline connects (the consumer, the Kafka
//! sinks and the dead-letter producer in the worker; the lag reads in the controller).
//!
//! [`SecurityConfig::librdkafka`] is the one place that turns it into librdkafka settings,
//! for both binaries, as plain key/value pairs (this crate has no rdkafka dependency).
//! Secrets never live in the configuration: what the settings need besides it (a password,
//! a certificate file) comes from [`Credentials`], which each binary answers from where it
//! runs. The worker reads its environment and names files by their path; the controller
//! reads the Secrets the worker pod is filled from and passes files by their content.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Connection security for Kafka. Passwords come from the environment, never from here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityConfig {
    /// Transport protocol.
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// SASL mechanism, required for the sasl protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Name of the environment variable that holds the SASL password.
    #[serde(default = "default_password_env")]
    pub password_env: String,
    /// PEM file with the CA certificates to trust (TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM file with the client's certificate (and its chain), for brokers that require a
    /// client certificate (`SSL`, `SASL_SSL`); with `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM file with the private key of `certFile` (PKCS#8 or PKCS#1; encrypted with
    /// `keyPasswordEnv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Name of the environment variable holding the password of an encrypted `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password_env: Option<String>,
    /// OAUTHBEARER with OIDC client credentials: required with `saslMechanism: OAUTHBEARER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthConfig>,
}

/// `saslMechanism: OAUTHBEARER` with OpenID Connect client credentials: librdkafka's
/// built-in OIDC method asks `tokenEndpointUrl` for a token with the client id and secret,
/// presents it to the brokers, and fetches a new one before it expires (on its own
/// background thread, so a busy or paused consumer never lets it lapse).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OAuthConfig {
    /// The identity provider's token endpoint (`https://...`; `http://` only on loopback
    /// or inside a trusted network): the client secret travels to it.
    pub token_endpoint_url: String,
    /// The OAuth client id.
    pub client_id: String,
    /// Name of the environment variable holding the client secret.
    #[serde(default = "default_client_secret_env")]
    pub client_secret_env: String,
    /// The scope to ask for (space-separated), when the provider or the brokers need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// SASL extensions sent with the token (Confluent Cloud: `logicalCluster` and
    /// `identityPoolId`): names of letters only, values without `,` or `=`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
    /// PEM file with the CA certificates to trust for the token endpoint's HTTPS (without
    /// it, the system's); the brokers' CA is `caFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// `oauth.clientSecretEnv` when it is not set: what the operator fills from
/// `oauth.clientSecretRef`.
pub fn default_client_secret_env() -> String {
    "SLUICE_OAUTH_CLIENT_SECRET".into()
}

/// `passwordEnv` when it is not set: what the operator fills from `passwordSecretRef`.
pub fn default_password_env() -> String {
    "SLUICE_SASL_PASSWORD".into()
}

/// Kafka `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// SASL_PLAINTEXT or SASL_SSL.
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    /// SSL or SASL_SSL.
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// Kafka `sasl.mechanism`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// PLAIN.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// OAUTHBEARER, with a token from an OpenID Connect provider (`oauth`).
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SaslMechanism {
    /// The librdkafka spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// PLAIN and SCRAM: a user name and a password.
    pub fn uses_password(self) -> bool {
        !matches!(self, SaslMechanism::OAuthBearer)
    }
}

/// How a client reads a file the configuration names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileRead {
    /// By its path: the file is there (the worker, where `spec.secretFiles` are mounted).
    Path,
    /// By its content, PEM text (the controller, from the Secret the pod mounts it from).
    Pem(String),
    /// Not readable where the client runs (the controller, for a file that only a custom
    /// worker image carries): the setting is left out.
    Unavailable,
}

/// What security settings need from where the client runs.
pub trait Credentials {
    /// The value the worker's environment variable `name` has.
    fn var(&self, name: &str) -> Option<String>;
    /// How the client reads the file at `path`.
    fn file(&self, path: &str) -> FileRead;
}

/// The worker's view: its own environment, and files at their paths.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnvironment;

impl Credentials for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn file(&self, _path: &str) -> FileRead {
        FileRead::Path
    }
}

/// A secret the settings need is not there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} is configured but the environment variable `{var}` ({field}) is not set")]
pub struct MissingCredential {
    /// What needs it (`SASL`).
    pub what: &'static str,
    /// The environment variable.
    pub var: String,
    /// The configuration field that names it.
    pub field: &'static str,
}

impl SecurityConfig {
    /// The checks of a security section at `at` (`source.security`).
    pub(super) fn check(&self, at: &str) -> Result<(), ConfigError> {
        if self.protocol.uses_sasl() {
            let Some(mechanism) = self.sasl_mechanism else {
                return Err(ConfigError::invalid(
                    format!("{at}.saslMechanism"),
                    "required with a SASL protocol: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
                ));
            };
            if mechanism.uses_password() {
                if self.username.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(
                        format!("{at}.username"),
                        "required with a SASL protocol",
                    ));
                }
            } else if self.username.is_some() {
                return Err(ConfigError::invalid(
                    format!("{at}.username"),
                    "not used with OAUTHBEARER: the principal is the token's subject (set oauth.clientId)",
                ));
            }
            match (&self.oauth, mechanism) {
                (None, SaslMechanism::OAuthBearer) => {
                    return Err(ConfigError::invalid(
                        format!("{at}.oauth"),
                        "required with saslMechanism OAUTHBEARER: the token endpoint, client id and client secret",
                    ))
                }
                (Some(_), m) if m != SaslMechanism::OAuthBearer => {
                    return Err(ConfigError::invalid(
                        format!("{at}.oauth"),
                        "set only with saslMechanism OAUTHBEARER",
                    ))
                }
                (Some(oauth), _) => oauth.check(&format!("{at}.oauth"))?,
                (None, _) => {}
            }
        } else if self.oauth.is_some() {
            return Err(ConfigError::invalid(
                format!("{at}.oauth"),
                "set only with protocol SASL_PLAINTEXT or SASL_SSL and saslMechanism OAUTHBEARER",
            ));
        } else if self.sasl_mechanism.is_some() {
            return Err(ConfigError::invalid(
                format!("{at}.saslMechanism"),
                "set only with protocol SASL_PLAINTEXT or SASL_SSL",
            ));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    format!("{at}.keyFile"),
                    "required with certFile: the client certificate's private key",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{at}.certFile"),
                    "required with keyFile: the client certificate the key belongs to",
                ))
            }
            (Some(_), Some(_)) if !self.protocol.uses_tls() => {
                return Err(ConfigError::invalid(
                    format!("{at}.certFile"),
                    "a client certificate is presented only over TLS: set protocol SSL or SASL_SSL",
                ))
            }
            _ => {}
        }
        for (field, v) in [
            ("caFile", &self.ca_file),
            ("certFile", &self.cert_file),
            ("keyFile", &self.key_file),
            ("keyPasswordEnv", &self.key_password_env),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    format!("{at}.{field}"),
                    "must not be empty when set",
                ));
            }
        }
        if self.key_password_env.is_some() && self.key_file.is_none() {
            return Err(ConfigError::invalid(
                format!("{at}.keyPasswordEnv"),
                "set only with keyFile (the password of an encrypted client key)",
            ));
        }
        Ok(())
    }

    /// The librdkafka settings (`security.protocol`, `sasl.*`, `ssl.*`) of a client with
    /// this configuration, the secrets filled in from `creds`. Every Kafka client of a
    /// pipeline, in the worker and in the controller, is configured through here.
    pub fn librdkafka(
        &self,
        creds: &dyn Credentials,
    ) -> Result<Vec<(&'static str, String)>, MissingCredential> {
        let SecurityConfig {
            protocol,
            sasl_mechanism,
            username,
            password_env,
            ca_file,
            cert_file,
            key_file,
            key_password_env,
            oauth,
        } = self;
        let mut out = vec![("security.protocol", protocol.as_librdkafka().to_string())];
        match (sasl_mechanism, oauth) {
            (Some(m), _) if m.uses_password() => {
                let password = creds.var(password_env).ok_or_else(|| MissingCredential {
                    what: "SASL",
                    var: password_env.clone(),
                    field: "source.security.passwordEnv",
                })?;
                out.push(("sasl.mechanism", m.as_librdkafka().to_string()));
                out.push(("sasl.username", username.clone().unwrap_or_default()));
                out.push(("sasl.password", password));
            }
            (Some(m), Some(oauth)) => {
                out.push(("sasl.mechanism", m.as_librdkafka().to_string()));
                out.extend(oauth.librdkafka(creds)?);
            }
            // OAUTHBEARER without `oauth` is refused by `check`; without a mechanism
            // there is no SASL.
            _ => {}
        }
        if let Some(path) = ca_file {
            if let Some(s) = file_setting(creds, path, "ssl.ca.location", "ssl.ca.pem") {
                out.push(s);
            }
        }
        if let (Some(cert), Some(key)) = (cert_file, key_file) {
            // Both or neither: a key without its certificate is no use to the broker.
            let cert = file_setting(
                creds,
                cert,
                "ssl.certificate.location",
                "ssl.certificate.pem",
            );
            let key = file_setting(creds, key, "ssl.key.location", "ssl.key.pem");
            if let (Some(cert), Some(key)) = (cert, key) {
                out.push(cert);
                out.push(key);
                if let Some(var) = key_password_env {
                    let password = creds.var(var).ok_or_else(|| MissingCredential {
                        what: "an encrypted client key",
                        var: var.clone(),
                        field: "source.security.keyPasswordEnv",
                    })?;
                    out.push(("ssl.key.password", password));
                }
            }
        }
        Ok(out)
    }
}

impl OAuthConfig {
    /// The checks of `oauth` at `at` (`source.security.oauth`).
    fn check(&self, at: &str) -> Result<(), ConfigError> {
        let url = self.token_endpoint_url.trim();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/'))
            || url.contains(char::is_whitespace)
        {
            return Err(ConfigError::invalid(
                format!("{at}.tokenEndpointUrl"),
                format!("{url:?} is not an http(s) URL: the identity provider's token endpoint, e.g. https://login.example.com/realms/kafka/protocol/openid-connect/token"),
            ));
        }
        let authority = rest
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default();
        if authority.contains('@') {
            return Err(ConfigError::invalid(
                format!("{at}.tokenEndpointUrl"),
                "credentials do not go in the URL (they would be in the ConfigMap and in librdkafka's errors): the client secret comes from clientSecretRef",
            ));
        }
        for (field, v) in [
            ("clientId", Some(&self.client_id)),
            ("clientSecretEnv", Some(&self.client_secret_env)),
            ("scope", self.scope.as_ref()),
            ("caFile", self.ca_file.as_ref()),
        ] {
            if v.is_some_and(|v| v.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    format!("{at}.{field}"),
                    "must not be empty",
                ));
            }
        }
        for (name, value) in &self.extensions {
            // librdkafka's rule for extension names, and the list's own separators.
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) || name == "auth" {
                return Err(ConfigError::invalid(
                    format!("{at}.extensions[{name:?}]"),
                    "an extension name is letters only, and not `auth`",
                ));
            }
            if value.is_empty()
                || value.contains([',', '='])
                || !value.bytes().all(|b| (0x20..0x7f).contains(&b))
            {
                return Err(ConfigError::invalid(
                    format!("{at}.extensions[{name:?}]"),
                    "an extension value is printable ASCII without `,` or `=`",
                ));
            }
        }
        Ok(())
    }

    /// librdkafka's OIDC settings (`sasl.oauthbearer.*`, `https.ca.*`).
    fn librdkafka(
        &self,
        creds: &dyn Credentials,
    ) -> Result<Vec<(&'static str, String)>, MissingCredential> {
        let OAuthConfig {
            token_endpoint_url,
            client_id,
            client_secret_env,
            scope,
            extensions,
            ca_file,
        } = self;
        let secret = creds
            .var(client_secret_env)
            .ok_or_else(|| MissingCredential {
                what: "OAUTHBEARER",
                var: client_secret_env.clone(),
                field: "source.security.oauth.clientSecretEnv",
            })?;
        let mut out = vec![
            ("sasl.oauthbearer.method", "oidc".to_string()),
            (
                "sasl.oauthbearer.token.endpoint.url",
                token_endpoint_url.trim().to_string(),
            ),
            ("sasl.oauthbearer.client.id", client_id.clone()),
            ("sasl.oauthbearer.client.secret", secret),
        ];
        if let Some(scope) = scope {
            out.push(("sasl.oauthbearer.scope", scope.clone()));
        }
        if !extensions.is_empty() {
            let list: Vec<String> = extensions.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push(("sasl.oauthbearer.extensions", list.join(",")));
        }
        if let Some(path) = ca_file {
            if let Some(s) = file_setting(creds, path, "https.ca.location", "https.ca.pem") {
                out.push(s);
            }
        }
        Ok(out)
    }
}

/// A file by its path (`location`) or by its content (`pem`), or not at all.
fn file_setting(
    creds: &dyn Credentials,
    path: &str,
    location: &'static str,
    pem: &'static str,
) -> Option<(&'static str, String)> {
    match creds.file(path) {
        FileRead::Path => Some((location, path.to_string())),
        FileRead::Pem(text) => Some((pem, text)),
        FileRead::Unavailable => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Credentials from maps: a variable or a file is there or not.
    struct Fixed {
        vars: BTreeMap<&'static str, &'static str>,
        files: BTreeMap<&'static str, &'static str>,
    }

    impl Credentials for Fixed {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).map(|v| v.to_string())
        }
        fn file(&self, path: &str) -> FileRead {
            match self.files.get(path) {
                Some(pem) => FileRead::Pem(pem.to_string()),
                None => FileRead::Unavailable,
            }
        }
    }

    fn sasl_ssl() -> SecurityConfig {
        SecurityConfig {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            username: Some("app".into()),
            password_env: default_password_env(),
            ca_file: Some("/etc/sluice/secrets/ca.pem".into()),
            cert_file: None,
            key_file: None,
            key_password_env: None,
            oauth: None,
        }
    }

    fn mtls() -> SecurityConfig {
        SecurityConfig {
            protocol: SecurityProtocol::Ssl,
            sasl_mechanism: None,
            username: None,
            cert_file: Some("/etc/sluice/secrets/user.crt".into()),
            key_file: Some("/etc/sluice/secrets/user.key".into()),
            key_password_env: Some("SLUICE_SSL_KEY_PASSWORD".into()),
            ..sasl_ssl()
        }
    }

    fn oauth() -> SecurityConfig {
        SecurityConfig {
            sasl_mechanism: Some(SaslMechanism::OAuthBearer),
            username: None,
            ca_file: None,
            oauth: Some(OAuthConfig {
                token_endpoint_url:
                    "https://idp.example.com/realms/kafka/protocol/openid-connect/token".into(),
                client_id: "orders".into(),
                client_secret_env: default_client_secret_env(),
                scope: Some("kafka".into()),
                extensions: BTreeMap::from([
                    ("logicalCluster".into(), "lkc-1".into()),
                    ("identityPoolId".into(), "pool-2".into()),
                ]),
                ca_file: Some("/etc/sluice/secrets/idp-ca.crt".into()),
            }),
            ..sasl_ssl()
        }
    }

    #[test]
    fn oauth_is_librdkafkas_oidc_method_with_the_client_secret_from_the_environment() {
        let creds = Fixed {
            vars: BTreeMap::from([("SLUICE_OAUTH_CLIENT_SECRET", "cs")]),
            files: BTreeMap::from([("/etc/sluice/secrets/idp-ca.crt", "IDP CA")]),
        };
        assert_eq!(
            oauth().librdkafka(&creds).unwrap(),
            [
                ("security.protocol", "sasl_ssl".to_string()),
                ("sasl.mechanism", "OAUTHBEARER".to_string()),
                ("sasl.oauthbearer.method", "oidc".to_string()),
                (
                    "sasl.oauthbearer.token.endpoint.url",
                    "https://idp.example.com/realms/kafka/protocol/openid-connect/token"
                        .to_string()
                ),
                ("sasl.oauthbearer.client.id", "orders".to_string()),
                ("sasl.oauthbearer.client.secret", "cs".to_string()),
                ("sasl.oauthbearer.scope", "kafka".to_string()),
                (
                    "sasl.oauthbearer.extensions",
                    "identityPoolId=pool-2,logicalCluster=lkc-1".to_string()
                ),
                ("https.ca.pem", "IDP CA".to_string()),
            ]
        );
        // No user name or password goes with it, whatever the environment holds.
        let e = oauth()
            .librdkafka(&Fixed {
                vars: BTreeMap::from([("SLUICE_SASL_PASSWORD", "pw")]),
                files: BTreeMap::new(),
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SLUICE_OAUTH_CLIENT_SECRET") && e.contains("oauth.clientSecretEnv"),
            "{e}"
        );
    }

    #[test]
    fn oauth_goes_with_oauthbearer_only_and_needs_a_token_endpoint_url() {
        let at = "source.security";
        let refused = |s: SecurityConfig, field: &str, why: &str| {
            let e = s.check(at).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{field}: {e}");
        };
        assert!(oauth().check(at).is_ok());
        refused(
            SecurityConfig {
                oauth: None,
                ..oauth()
            },
            "source.security.oauth",
            "required with saslMechanism OAUTHBEARER",
        );
        refused(
            SecurityConfig {
                sasl_mechanism: Some(SaslMechanism::ScramSha256),
                username: Some("u".into()),
                ..oauth()
            },
            "source.security.oauth",
            "only with saslMechanism OAUTHBEARER",
        );
        refused(
            SecurityConfig {
                protocol: SecurityProtocol::Ssl,
                sasl_mechanism: None,
                ..oauth()
            },
            "source.security.oauth",
            "only with protocol SASL",
        );
        refused(
            SecurityConfig {
                username: Some("u".into()),
                ..oauth()
            },
            "source.security.username",
            "token's subject",
        );
        let with = |f: &dyn Fn(&mut OAuthConfig)| {
            let mut s = oauth();
            f(s.oauth.as_mut().unwrap());
            s
        };
        for url in [
            "idp:8443/token",
            "https://",
            "https:///token",
            "ftp://idp/token",
            "https://idp/a b",
        ] {
            refused(
                with(&|o| o.token_endpoint_url = url.into()),
                "source.security.oauth.tokenEndpointUrl",
                "not an http(s) URL",
            );
        }
        refused(
            with(&|o| o.token_endpoint_url = "https://orders:s3cret@idp/token".into()),
            "source.security.oauth.tokenEndpointUrl",
            "credentials do not go in the URL",
        );
        assert!(
            with(&|o| o.token_endpoint_url = "http://127.0.0.1:9180/token".into())
                .check(at)
                .is_ok()
        );
        refused(
            with(&|o| o.client_id = " ".into()),
            "source.security.oauth.clientId",
            "must not be empty",
        );
        refused(
            with(&|o| o.scope = Some(String::new())),
            "source.security.oauth.scope",
            "must not be empty",
        );
        for (name, value, why) in [
            ("logical-cluster", "x", "letters only"),
            ("auth", "x", "letters only"),
            ("logicalCluster", "a,b", "without `,`"),
            ("logicalCluster", "a=b", "without `,`"),
            ("logicalCluster", "", "without `,`"),
            ("logicalCluster", "caf\u{e9}", "without `,`"),
        ] {
            refused(
                with(&|o| {
                    o.extensions = BTreeMap::from([(name.to_string(), value.to_string())]);
                }),
                &format!("source.security.oauth.extensions[{name:?}]"),
                why,
            );
        }
    }

    #[test]
    fn a_client_certificate_is_its_file_and_key_with_the_key_password_from_the_environment() {
        let creds = Fixed {
            vars: BTreeMap::from([("SLUICE_SSL_KEY_PASSWORD", "kp")]),
            files: BTreeMap::from([
                ("/etc/sluice/secrets/ca.pem", "CA"),
                ("/etc/sluice/secrets/user.crt", "CERT"),
                ("/etc/sluice/secrets/user.key", "KEY"),
            ]),
        };
        let got = mtls().librdkafka(&creds).unwrap();
        assert_eq!(
            got,
            [
                ("security.protocol", "ssl".to_string()),
                ("ssl.ca.pem", "CA".to_string()),
                ("ssl.certificate.pem", "CERT".to_string()),
                ("ssl.key.pem", "KEY".to_string()),
                ("ssl.key.password", "kp".to_string()),
            ]
        );
        let e = mtls()
            .librdkafka(&Fixed {
                vars: BTreeMap::new(),
                files: creds.files.clone(),
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SLUICE_SSL_KEY_PASSWORD") && e.contains("keyPasswordEnv"),
            "{e}"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_tls() {
        let at = "source.security";
        let refused = |s: SecurityConfig, field: &str| {
            let e = s.check(at).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        };
        refused(
            SecurityConfig {
                key_file: None,
                key_password_env: None,
                ..mtls()
            },
            "source.security.keyFile",
        );
        refused(
            SecurityConfig {
                cert_file: None,
                ..mtls()
            },
            "source.security.certFile",
        );
        refused(
            SecurityConfig {
                protocol: SecurityProtocol::Plaintext,
                ..mtls()
            },
            "source.security.certFile",
        );
        refused(
            SecurityConfig {
                cert_file: None,
                key_file: None,
                ..mtls()
            },
            "source.security.keyPasswordEnv",
        );
        assert!(mtls().check(at).is_ok());
    }

    #[test]
    fn the_worker_names_files_by_path_and_reads_the_password_from_its_environment() {
        let s = SecurityConfig {
            sasl_mechanism: None,
            protocol: SecurityProtocol::Ssl,
            ..sasl_ssl()
        };
        assert_eq!(
            s.librdkafka(&ProcessEnvironment).unwrap(),
            [
                ("security.protocol", "ssl".to_string()),
                ("ssl.ca.location", "/etc/sluice/secrets/ca.pem".to_string()),
            ]
        );
    }

    #[test]
    fn the_controller_passes_files_by_content_and_leaves_out_what_it_cannot_read() {
        let creds = Fixed {
            vars: BTreeMap::from([("SLUICE_SASL_PASSWORD", "pw")]),
            files: BTreeMap::from([("/etc/sluice/secrets/ca.pem", "-----BEGIN CERTIFICATE-----")]),
        };
        let got = sasl_ssl().librdkafka(&creds).unwrap();
        assert_eq!(
            got,
            [
                ("security.protocol", "sasl_ssl".to_string()),
                ("sasl.mechanism", "SCRAM-SHA-512".to_string()),
                ("sasl.username", "app".to_string()),
                ("sasl.password", "pw".to_string()),
                ("ssl.ca.pem", "-----BEGIN CERTIFICATE-----".to_string()),
            ]
        );
        let elsewhere = SecurityConfig {
            ca_file: Some("/opt/image/ca.pem".into()),
            ..sasl_ssl()
        };
        let got = elsewhere.librdkafka(&creds).unwrap();
        assert!(got.iter().all(|(k, _)| !k.starts_with("ssl.")), "{got:?}");
    }

    #[test]
    fn a_missing_password_names_the_variable_and_the_field() {
        let creds = Fixed {
            vars: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        let e = sasl_ssl().librdkafka(&creds).unwrap_err().to_string();
        assert!(
            e.contains("SLUICE_SASL_PASSWORD") && e.contains("source.security.passwordEnv"),
            "{e}"
        );
    }
}
