//! A Confluent-compatible schema registry client: schemas by id
//! (`GET /schemas/ids/{id}`) and the schemas they reference (`GET
//! /subjects/{subject}/versions/{version}`), over the pooled HTTP client the http sink uses.
//!
//! Only a `404` means "no such schema"; anything else that is not a `200` (no connection, a
//! timeout, `401`, `5xx`) is the registry being unavailable, which holds records, never
//! fails them.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use sluice_api::config::SchemaRegistryConfig;

use crate::sink::tls::{chain, http_client, HttpClient, TlsError};

/// Longest wait for one answer of the registry.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest schema document read.
const SCHEMA_LIMIT: usize = 8 << 20;

/// Why the registry client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RegistrySetupError {
    /// `credentialsEnv` names a variable that is not set, or is not `user:password`.
    #[error("schema registry: the environment variable {0} (credentialsEnv) is not set or is not user:password")]
    Credentials(String),
    /// The URL does not parse.
    #[error("schema registry: url {url}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// No TLS configuration for an `https://` URL.
    #[error("schema registry: {0}")]
    Tls(#[from] TlsError),
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The registry answered that there is no such schema (a `404` with the registry's
    /// own error code, 40401-40403), or refused one (`409`, `422`).
    NotFound(String),
    /// The registry has the schema, but sluice cannot use it (a schema type it does not
    /// know).
    Unusable(String),
    /// The registry could not be asked, or did not answer usefully (a `404` without the
    /// registry's error code is a wrong path or a proxy's answer): try again later.
    Unavailable(String),
}

/// The kinds of schema a registry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaType {
    /// Apache Avro (the default when a registry names none).
    Avro,
    /// Protocol Buffers.
    Protobuf,
    /// JSON Schema.
    Json,
}

/// Another schema a schema imports (Protobuf) or names (Avro).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Reference {
    /// The name it is imported by (a `.proto` path, an Avro full name).
    pub name: String,
    /// Its subject.
    pub subject: String,
    /// Its version under the subject.
    pub version: i64,
}

/// A schema as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredSchema {
    /// The schema text (Avro JSON, `.proto` text or a base64 `FileDescriptorProto`, JSON
    /// Schema).
    pub schema: String,
    /// Its kind.
    pub schema_type: SchemaType,
    /// What it references.
    pub references: Vec<Reference>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A registry client.
pub struct Registry {
    client: HttpClient,
    base: String,
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .finish()
    }
}

impl Registry {
    /// A client for `config`, reading `credentialsEnv` through `env`.
    pub fn new(
        config: &SchemaRegistryConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, RegistrySetupError> {
        let base = config.url.trim_end_matches('/').to_string();
        let uri: http::Uri =
            base.parse()
                .map_err(|e: http::uri::InvalidUri| RegistrySetupError::Url {
                    url: config.url.clone(),
                    message: e.to_string(),
                })?;
        let auth = match &config.credentials_env {
            None => None,
            Some(var) => {
                let creds = env(var)
                    .filter(|c| c.contains(':'))
                    .ok_or_else(|| RegistrySetupError::Credentials(var.clone()))?;
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(creds.trim_end());
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| RegistrySetupError::Credentials(var.clone()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let client = http_client(
            uri.scheme_str() == Some("https"),
            config.ca_file.as_deref(),
            TIMEOUT,
            4,
        )?;
        Ok(Registry { client, base, auth })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The schema of `id`.
    pub async fn schema(&self, id: u32) -> Result<RegisteredSchema, FetchError> {
        self.get(&format!("/schemas/ids/{id}")).await
    }

    /// Version `version` of `subject` (what a reference names).
    pub async fn subject_version(
        &self,
        subject: &str,
        version: i64,
    ) -> Result<RegisteredSchema, FetchError> {
        self.get(&format!(
            "/subjects/{}/versions/{version}",
            encode_path(subject)
        ))
        .await
    }

    /// Register `schema` under `subject` (or find it there): its id.
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
        schema_type: SchemaType,
    ) -> Result<u32, FetchError> {
        let path = format!("/subjects/{}/versions", encode_path(subject));
        self.id_of(&path, schema, schema_type).await
    }

    /// The id `schema` has under `subject`, which must have it.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &str,
        schema_type: SchemaType,
    ) -> Result<u32, FetchError> {
        let path = format!("/subjects/{}", encode_path(subject));
        self.id_of(&path, schema, schema_type).await
    }

    async fn id_of(
        &self,
        path: &str,
        schema: &str,
        schema_type: SchemaType,
    ) -> Result<u32, FetchError> {
        let mut doc = serde_json::json!({ "schema": schema });
        match schema_type {
            SchemaType::Avro => {}
            SchemaType::Protobuf => doc["schemaType"] = "PROTOBUF".into(),
            SchemaType::Json => doc["schemaType"] = "JSON".into(),
        }
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        let answer = self.call(http::Method::POST, path, Some(body)).await?;
        #[derive(Deserialize)]
        struct Id {
            id: u32,
        }
        serde_json::from_slice::<Id>(&answer)
            .map(|i| i.id)
            .map_err(|e| {
                FetchError::Unavailable(format!("{}{path}: no id in the answer: {e}", self.base))
            })
    }

    async fn get(&self, path: &str) -> Result<RegisteredSchema, FetchError> {
        let url = format!("{}{path}", self.base);
        let body = self.call(http::Method::GET, path, None).await?;
        let wire: Wire = serde_json::from_slice(&body)
            .map_err(|e| FetchError::Unavailable(format!("{url}: not a schema document: {e}")))?;
        let schema_type = match wire
            .schema_type
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("AVRO") => SchemaType::Avro,
            Some("PROTOBUF") => SchemaType::Protobuf,
            Some("JSON") => SchemaType::Json,
            Some(other) => {
                return Err(FetchError::Unusable(format!(
                    "{url}: schema type {other} is not one sluice decodes (AVRO, PROTOBUF, JSON)"
                )))
            }
        };
        Ok(RegisteredSchema {
            schema: wire.schema,
            schema_type,
            references: wire.references,
        })
    }

    /// One request: the body of a `200`; `NotFound` for a `404`, and for a `409` or `422`
    /// (a schema the registry refuses), with its message; `Unavailable` otherwise.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, FetchError> {
        let url = format!("{}{path}", self.base);
        let unavailable = |m: String| FetchError::Unavailable(format!("{url}: {m}"));
        let mut req = Request::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| unavailable(e.to_string()))?;
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.schemaregistry.v1+json"),
        );
        req.headers_mut().insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.schemaregistry.v1+json, application/json"),
        );
        if let Some(a) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, a.clone());
        }
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unavailable(format!("no answer: {}", chain(&e))))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), SCHEMA_LIMIT)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| unavailable(format!("reading the answer: {e}")))?;
            Ok::<_, FetchError>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| unavailable(format!("no answer within {TIMEOUT:?}")))??;
        let text = || {
            String::from_utf8_lossy(&body[..body.len().min(256)])
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        // The registry's own answer carries its error code: 40401 no such subject, 40402 no
        // such version, 40403 no such schema.
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error_code").and_then(serde_json::Value::as_i64));
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::NOT_FOUND if matches!(code, Some(40401..=40403)) => {
                Err(FetchError::NotFound(format!("{url}: HTTP 404: {}", text())))
            }
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => Err(FetchError::NotFound(
                format!("{url}: HTTP {}: {}", status.as_u16(), text()),
            )),
            s => Err(unavailable(format!(
                "HTTP {}: {}{}",
                s.as_u16(),
                text(),
                if s == StatusCode::NOT_FOUND {
                    " (not the registry's own answer: is the url its Confluent-compatible API, e.g. .../apis/ccompat/v7 for Apicurio?)"
                } else {
                    ""
                }
            ))),
        }
    }
}

/// `subject` as one path segment.
fn encode_path(subject: &str) -> String {
    subject
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
