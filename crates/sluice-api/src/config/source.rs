//! `source`: the topic the pipeline reads, its consumer group and where it starts.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::properties::{self, RESERVED_CONSUMER_PROPERTIES};
use super::rules::{non_empty, topic_name};
use super::security::SecurityConfig;
use super::ConfigError;
use crate::units::HumanDuration;

/// The Kafka topics read by the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// The input topic (one of `topic`, `topics` and `topicPattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The input topics (one of `topic`, `topics` and `topicPattern`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Every topic whose whole name matches this regular expression, including topics
    /// created later (one of `topic`, `topics` and `topicPattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_pattern: Option<String>,
    /// Consumer group id; one group per pipeline.
    pub group_id: String,
    /// Where to start when the group has no committed offset.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Group session timeout. The revoke drain deadline must be shorter.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: HumanDuration,
    /// Static membership id (e.g. the pod name), so a restart does not rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_instance_id: Option<String>,
    /// TLS and SASL.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Extra librdkafka consumer properties, applied last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer_properties: BTreeMap<String, String>,
    /// How record values are encoded. Without it they reach the processor as they are
    /// (JSON for the jq processor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
}

/// The encoding of the source's record values.
///
/// ```yaml
/// format:
///   schemaRegistry:
///     url: https://registry.example.com
///     credentialsEnv: SLUICE_REGISTRY_CREDENTIALS   # user:password, from spec.secretEnv
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceFormat {
    /// Values in the Confluent wire format (a zero byte, the schema id, the payload):
    /// Avro, Protobuf and JSON Schema records are decoded into JSON by their schema,
    /// fetched from this registry and kept.
    pub schema_registry: SchemaRegistryConfig,
}

/// A Confluent-compatible schema registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// The registry's base URL (`https://...`; Apicurio: `.../apis/ccompat/v7`). No
    /// credentials in it.
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^/@\s]+(/\S*)?$")
    )]
    pub url: String,
    /// Name of the environment variable holding `user:password` for HTTP basic
    /// authentication (Confluent Cloud: the API key and secret). None: no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_env: Option<String>,
    /// PEM file of the CA certificates to trust for an `https://` URL (without it, the
    /// system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl SchemaRegistryConfig {
    /// The checks of the registry at `at` (`source.format.schemaRegistry`).
    pub fn check(&self, at: &str) -> Result<(), ConfigError> {
        super::rules::http_url(&format!("{at}.url"), &self.url)?;
        if let Some(env) = &self.credentials_env {
            non_empty(&format!("{at}.credentialsEnv"), env)?;
        }
        if let Some(f) = &self.ca_file {
            non_empty(&format!("{at}.caFile"), f)?;
            if self.url.starts_with("http://") {
                return Err(ConfigError::invalid(
                    format!("{at}.caFile"),
                    "is for an https:// URL; this one is http://",
                ));
            }
        }
        Ok(())
    }
}

/// Where a group without a committed offset starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    /// The log start offset: nothing that is still retained is skipped.
    #[default]
    Earliest,
    /// The end of the log: only records produced after the first join.
    Latest,
}

/// `source.sessionTimeout` when it is not set.
pub fn default_session_timeout() -> HumanDuration {
    HumanDuration::from_millis(30_000)
}

/// The shortest `source.sessionTimeout` (the broker's default `group.min.session.timeout.ms`).
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(6);
/// The longest `source.sessionTimeout` (the broker's default `group.max.session.timeout.ms`).
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);

impl SourceConfig {
    /// The checks of `source` on its own.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let SourceConfig {
            bootstrap_servers,
            topic: _,
            topics: _,
            topic_pattern: _,
            group_id,
            start_from: _,
            session_timeout,
            group_instance_id: _,
            security,
            consumer_properties,
            format,
        } = self;
        non_empty("source.bootstrapServers", bootstrap_servers)?;
        if let Some(f) = format {
            f.schema_registry.check("source.format.schemaRegistry")?;
        }
        self.subscription()?;
        non_empty("source.groupId", group_id)?;
        properties::check(
            "source.consumerProperties",
            consumer_properties,
            RESERVED_CONSUMER_PROPERTIES,
        )?;
        if session_timeout.0 < SESSION_TIMEOUT_MIN || session_timeout.0 > SESSION_TIMEOUT_MAX {
            return Err(ConfigError::invalid(
                "source.sessionTimeout",
                format!(
                    "must be between {} and {}, got {session_timeout}",
                    HumanDuration(SESSION_TIMEOUT_MIN),
                    HumanDuration(SESSION_TIMEOUT_MAX)
                ),
            ));
        }
        security.check("source.security")
    }
}

/// The most topics `source.topics` may list.
pub const TOPICS_MAX: usize = 100;
/// The longest `source.topicPattern`.
pub const TOPIC_PATTERN_LEN_MAX: usize = 249;

/// What the pipeline reads: named topics, or every topic a pattern matches.
#[derive(Clone, Debug)]
pub enum Subscription {
    /// These topics (one or more).
    Topics(Vec<String>),
    /// Every topic whose whole name matches (topics created later included).
    Pattern(TopicPattern),
}

/// `source.topicPattern`, compiled: it matches a topic's whole name.
#[derive(Clone, Debug)]
pub struct TopicPattern {
    source: String,
    anchored: regex::Regex,
}

impl TopicPattern {
    /// Compile `pattern` (refused at `field` when it is not a regular expression both
    /// Rust's `regex` and librdkafka's POSIX one take).
    pub fn new(field: &str, pattern: &str) -> Result<Self, ConfigError> {
        if pattern.is_empty() || pattern.len() > TOPIC_PATTERN_LEN_MAX {
            return Err(ConfigError::invalid(
                field,
                format!("must be 1 to {TOPIC_PATTERN_LEN_MAX} characters"),
            ));
        }
        if pattern.starts_with('^') || pattern.ends_with('$') {
            return Err(ConfigError::invalid(
                field,
                "the pattern matches whole topic names already: leave out `^` and `$`",
            ));
        }
        let ast = regex_syntax::ast::parse::Parser::new()
            .parse(pattern)
            .map_err(|e| ConfigError::invalid(field, format!("not a regular expression: {e}")))?;
        if let Err(what) = posix_ere(&ast) {
            return Err(ConfigError::invalid(
                field,
                format!("{what} is not read the same by librdkafka (POSIX extended regular expressions, which the workers subscribe with) and by the controller: use literals, `.`, `( )`, `|`, `* + ? {{m,n}}`, classes like `[a-z0-9._-]` and `[[:digit:]]`, and `\\.` for a literal dot"),
            ));
        }
        let anchored = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| ConfigError::invalid(field, format!("not a regular expression: {e}")))?;
        Ok(TopicPattern {
            source: pattern.to_string(),
            anchored,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `topic`'s whole name matches.
    pub fn matches(&self, topic: &str) -> bool {
        self.anchored.is_match(topic)
    }

    /// The subscription librdkafka takes: a regex subscription starts with `^`.
    pub fn librdkafka(&self) -> String {
        format!("^({})$", self.source)
    }
}

/// Whether `ast` is in the part of regular-expression syntax that Rust's `regex` (the
/// controller's matching) and POSIX extended regular expressions (glibc's `regcomp`,
/// librdkafka's subscription) read alike: an allowlist, so anything either reads otherwise
/// (`\d`, `\A`, `\x2d`, lazy repetition, flags, nested classes and class operations, a
/// backslash inside brackets, Rust-only class names) is refused. Returns what is not.
fn posix_ere(ast: &regex_syntax::ast::Ast) -> Result<(), String> {
    use regex_syntax::ast::{
        Ast, ClassAsciiKind, ClassSet, ClassSetItem, GroupKind, Literal, LiteralKind,
    };
    let literal = |l: &Literal, in_class: bool| match l.kind {
        LiteralKind::Verbatim if l.c.is_ascii() => Ok(()),
        LiteralKind::Meta if !in_class && ".[]{}()\\*+?^$|".contains(l.c) => Ok(()),
        _ => Err(format!("`{}`", &l.c)),
    };
    fn item(
        i: &ClassSetItem,
        literal: &dyn Fn(&Literal, bool) -> Result<(), String>,
    ) -> Result<(), String> {
        match i {
            ClassSetItem::Literal(l) => literal(l, true),
            ClassSetItem::Range(r) => {
                literal(&r.start, true)?;
                literal(&r.end, true)
            }
            ClassSetItem::Ascii(a)
                if !a.negated
                    && !matches!(a.kind, ClassAsciiKind::Ascii | ClassAsciiKind::Word) =>
            {
                Ok(())
            }
            ClassSetItem::Ascii(_) => Err("that character class name".into()),
            ClassSetItem::Union(u) => u.items.iter().try_for_each(|i| item(i, literal)),
            ClassSetItem::Bracketed(_) => Err("a class inside a class".into()),
            _ => Err("that character class".into()),
        }
    }
    match ast {
        Ast::Literal(l) => literal(l, false),
        Ast::Dot(_) => Ok(()),
        Ast::Group(g) => match g.kind {
            GroupKind::CaptureIndex(_) => posix_ere(&g.ast),
            _ => Err("a named or non-capturing group".into()),
        },
        Ast::Repetition(r) if r.greedy => posix_ere(&r.ast),
        Ast::Repetition(_) => Err("a lazy repetition".into()),
        Ast::Alternation(a) => a.asts.iter().try_for_each(|b| match b {
            Ast::Empty(_) => Err("an empty alternative".into()),
            b => posix_ere(b),
        }),
        Ast::Concat(c) => c.asts.iter().try_for_each(posix_ere),
        Ast::ClassBracketed(c) => match &c.kind {
            ClassSet::Item(i) => item(i, &literal),
            ClassSet::BinaryOp(_) => Err("a class operation (`&&`, `--`, `~~`)".into()),
        },
        Ast::Assertion(_) => Err("an anchor or word boundary".into()),
        Ast::ClassPerl(_) | Ast::ClassUnicode(_) => {
            Err("an escape class (`\\d`, `\\w`, `\\p{..}`)".into())
        }
        Ast::Flags(_) => Err("a flag group".into()),
        Ast::Empty(_) => Err("an empty pattern".into()),
    }
}

impl Subscription {
    /// Whether the pipeline reads `topic`.
    pub fn reads(&self, topic: &str) -> bool {
        match self {
            Subscription::Topics(t) => t.iter().any(|t| t == topic),
            Subscription::Pattern(p) => p.matches(topic),
        }
    }

    /// What the consumer subscribes to.
    pub fn librdkafka(&self) -> Vec<String> {
        match self {
            Subscription::Topics(t) => t.clone(),
            Subscription::Pattern(p) => vec![p.librdkafka()],
        }
    }

    /// The named topics, or `None` for a pattern.
    pub fn names(&self) -> Option<&[String]> {
        match self {
            Subscription::Topics(t) => Some(t),
            Subscription::Pattern(_) => None,
        }
    }
}

impl std::fmt::Display for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subscription::Topics(t) => write!(f, "{}", t.join(",")),
            Subscription::Pattern(p) => write!(f, "/{}/", p.as_str()),
        }
    }
}

/// The subscription of `topic`, `topics` and `topicPattern` (exactly one set), checked:
/// names follow Kafka's rule, no name twice, at most [`TOPICS_MAX`]. `at` is the
/// section's path (`source`).
pub fn subscription(
    at: &str,
    topic: Option<&str>,
    topics: &[String],
    pattern: Option<&str>,
) -> Result<Subscription, ConfigError> {
    match (topic, topics.is_empty(), pattern) {
        (Some(t), true, None) => {
            topic_name(&format!("{at}.topic"), t)?;
            Ok(Subscription::Topics(vec![t.to_string()]))
        }
        (None, false, None) => {
            if topics.len() > TOPICS_MAX {
                return Err(ConfigError::invalid(
                    format!("{at}.topics"),
                    format!(
                        "at most {TOPICS_MAX} topics, got {}; a topicPattern matches any number",
                        topics.len()
                    ),
                ));
            }
            for (i, t) in topics.iter().enumerate() {
                topic_name(&format!("{at}.topics[{i}]"), t)?;
                if topics[..i].contains(t) {
                    return Err(ConfigError::invalid(
                        format!("{at}.topics[{i}]"),
                        format!("`{t}` is listed twice"),
                    ));
                }
            }
            Ok(Subscription::Topics(topics.to_vec()))
        }
        (None, true, Some(p)) => Ok(Subscription::Pattern(TopicPattern::new(
            &format!("{at}.topicPattern"),
            p,
        )?)),
        (None, true, None) => Err(ConfigError::invalid(
            format!("{at}.topic"),
            "required: the input topic (or topics, a list, or topicPattern, a regular expression)",
        )),
        _ => Err(ConfigError::invalid(
            format!("{at}.topics"),
            "set one of topic, topics and topicPattern",
        )),
    }
}

impl SourceConfig {
    /// What the pipeline reads (the configuration is valid: [`SourceConfig::check`]).
    pub fn subscription(&self) -> Result<Subscription, ConfigError> {
        subscription(
            "source",
            self.topic.as_deref(),
            &self.topics,
            self.topic_pattern.as_deref(),
        )
    }
}
