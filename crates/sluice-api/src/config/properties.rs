//! Which librdkafka properties `consumerProperties` and `producerProperties` may not set,
//! and why: each of them is what the at-least-once promise (or a field of its own) rests on.
//!
//! The lists are the documented contract (README, "Properties sluice keeps for itself"). A
//! property that is merely unknown to librdkafka, or has a value it refuses, is caught
//! elsewhere: the controller builds the librdkafka configuration while validating.

use super::ConfigError;

/// Consumer properties sluice sets itself, with the reason a pipeline may not change them.
pub const RESERVED_CONSUMER_PROPERTIES: &[(&str, &str)] = &[
    ("enable.auto.commit", "the worker commits an offset only after every output of the records below it was delivered; auto-commit would commit records not yet delivered (loss on a crash)"),
    ("enable.auto.offset.store", "the worker stores an offset only after its records were delivered; automatic storing would commit records not yet delivered (loss on a crash)"),
    ("auto.commit.interval.ms", "offset commits follow commit.interval"),
    ("group.id", "the consumer group is source.groupId; another group would commit where the controller does not measure lag"),
    ("group.instance.id", "static membership is set per pod by the worker"),
    ("auto.offset.reset", "where a group without commits starts is source.startFrom"),
    ("session.timeout.ms", "set source.sessionTimeout (commit.drainTimeout is checked against it)"),
    ("partition.assignment.strategy", "the worker's rebalance handling (drain, then commit, per revoked partition) relies on cooperative-sticky"),
    ("enable.partition.eof", "the worker does not handle end-of-partition events"),
    ("bootstrap.servers", "set source.bootstrapServers"),
    ("metadata.broker.list", "set source.bootstrapServers"),
    ("security.protocol", "set source.security.protocol"),
    ("sasl.mechanism", "set source.security.saslMechanism"),
    ("sasl.mechanisms", "set source.security.saslMechanism"),
    ("sasl.username", "set source.security.username"),
    ("sasl.password", "a password never goes into the configuration: set source.security.passwordSecretRef"),
    ("ssl.ca.location", "set source.security.caFile"),
    ("ssl.ca.pem", "set source.security.caFile"),
    ("ssl.certificate.location", "set source.security.certFile"),
    ("ssl.certificate.pem", "set source.security.certFile"),
    ("ssl.key.location", "set source.security.keyFile"),
    ("ssl.key.pem", "set source.security.keyFile"),
    ("ssl.key.password", "a password never goes into the configuration: set source.security.keyPasswordSecretRef"),
    ("sasl.oauthbearer.method", "set source.security.oauth (OIDC client credentials)"),
    ("sasl.oauthbearer.token.endpoint.url", "set source.security.oauth.tokenEndpointUrl"),
    ("sasl.oauthbearer.client.id", "set source.security.oauth.clientId"),
    ("sasl.oauthbearer.client.credentials.client.id", "set source.security.oauth.clientId"),
    ("sasl.oauthbearer.client.secret", "a secret never goes into the configuration: set source.security.oauth.clientSecretRef"),
    ("sasl.oauthbearer.client.credentials.client.secret", "a secret never goes into the configuration: set source.security.oauth.clientSecretRef"),
    ("sasl.oauthbearer.scope", "set source.security.oauth.scope"),
    ("sasl.oauthbearer.extensions", "set source.security.oauth.extensions"),
    ("https.ca.location", "set source.security.oauth.caFile"),
    ("https.ca.pem", "set source.security.oauth.caFile"),
    ("enable.sasl.oauthbearer.unsecure.jwt", "unsigned tokens are for tests: set source.security.oauth"),
    ("sasl.oauthbearer.", "OAUTHBEARER is set by source.security.oauth (OIDC client credentials); its other methods and their keys are not configurable here"),
    ("statistics.interval.ms", "the worker's liveness rule expects librdkafka's statistics every 5 s; another interval (or none) would fail /healthz for good"),
];

/// Producer properties sluice sets itself (Kafka sinks and the dead-letter producer), with
/// the reason a pipeline may not change them.
pub const RESERVED_PRODUCER_PROPERTIES: &[(&str, &str)] = &[
    ("acks", "an output counts as delivered only when every in-sync replica has it (acks=all); fewer acknowledgements lose records on a broker failure"),
    ("request.required.acks", "an alias of acks: outputs count as delivered only with acks=all"),
    ("enable.idempotence", "retries must not duplicate or reorder outputs: the producer is idempotent"),
    ("delivery.report.only.error", "a batch is acknowledged from its delivery reports: without success reports no offset would ever be committed"),
    ("transactional.id", "set delivery.guarantee: exactly-once; the worker then sets a transactional id per process itself"),
    ("transaction.timeout.ms", "exactly-once derives it from delivery.transactionWindow and commit.drainTimeout: a window must fit in its transaction"),
    ("bootstrap.servers", "set the sink's bootstrapServers"),
    ("metadata.broker.list", "set the sink's bootstrapServers"),
    ("security.protocol", "the sink uses source.security"),
    ("sasl.mechanism", "the sink uses source.security"),
    ("sasl.mechanisms", "the sink uses source.security"),
    ("sasl.username", "the sink uses source.security"),
    ("sasl.password", "a password never goes into the configuration: set source.security.passwordSecretRef"),
    ("sasl.oauthbearer.method", "the sink uses source.security"),
    ("sasl.oauthbearer.token.endpoint.url", "the sink uses source.security"),
    ("sasl.oauthbearer.client.id", "the sink uses source.security"),
    ("sasl.oauthbearer.client.credentials.client.id", "the sink uses source.security"),
    ("sasl.oauthbearer.client.secret", "a secret never goes into the configuration: set source.security.oauth.clientSecretRef"),
    ("sasl.oauthbearer.client.credentials.client.secret", "a secret never goes into the configuration: set source.security.oauth.clientSecretRef"),
    ("sasl.oauthbearer.scope", "the sink uses source.security"),
    ("sasl.oauthbearer.extensions", "the sink uses source.security"),
    ("https.ca.location", "the sink uses source.security"),
    ("https.ca.pem", "the sink uses source.security"),
    ("enable.sasl.oauthbearer.unsecure.jwt", "the sink uses source.security"),
    ("sasl.oauthbearer.", "the sink uses source.security"),
];

/// Refuse a reserved key of `props` (found at `field`), naming the key and the reason.
pub(super) fn check(
    field: &str,
    props: &std::collections::BTreeMap<String, String>,
    reserved: &[(&str, &str)],
) -> Result<(), ConfigError> {
    for key in props.keys() {
        if key.trim().is_empty() {
            return Err(ConfigError::invalid(
                field,
                "a property name must not be empty",
            ));
        }
        // An entry ending in `.` reserves every property under it.
        let k = key.trim();
        if let Some((_, why)) = reserved
            .iter()
            .find(|(r, _)| *r == k || (r.ends_with('.') && k.starts_with(r)))
        {
            return Err(ConfigError::invalid(
                format!("{field}[{key:?}]"),
                format!("`{key}` may not be set: {why}"),
            ));
        }
    }
    Ok(())
}
