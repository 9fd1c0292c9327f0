//! Encoding a Kafka sink's output values in the Confluent wire format: the JSON value is
//! written with the sink's schema (Avro, or a Protobuf message), after a zero byte, the
//! schema's id in the registry and, for Protobuf, the message's indexes. The schema is
//! registered (or looked up) once, at start-up. A value that does not fit the schema is the
//! caller's to dead-letter, with the reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::Schema as AvroSchema;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use sluice_api::config::{SinkRegistryConfig, SubjectStrategy, WriterSchema};

use super::registry::{FetchError, Registry, RegistrySetupError, SchemaType};
use super::schema::Compiled;

/// How long start-up keeps asking an unreachable registry before it gives up.
const REGISTER_FOR: Duration = Duration::from_secs(60);

/// Why a sink's encoder could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EncoderSetupError {
    /// The registry client could not be made.
    #[error(transparent)]
    Registry(#[from] RegistrySetupError),
    /// The schema does not compile.
    #[error("kafka sink {topic}: format.schemaRegistry.schema: {message}")]
    Schema {
        /// The sink's topic.
        topic: String,
        /// What is wrong.
        message: String,
    },
    /// The registry refused the schema, does not have it, or could not be reached.
    #[error("kafka sink {topic}: schema registry, subject {subject}: {message}")]
    Register {
        /// The sink's topic.
        topic: String,
        /// The subject.
        subject: String,
        /// What happened.
        message: String,
    },
}

/// What a value is written with.
enum Writer {
    /// The schema, and its named types by name (what a `Ref` in it points at).
    Avro(
        Box<AvroSchema>,
        HashMap<apache_avro::schema::Name, AvroSchema>,
    ),
    Protobuf(MessageDescriptor),
}

/// Encodes output values with one registered schema.
pub struct Encoder {
    /// The zero byte, the id, and for Protobuf the message indexes.
    prefix: Vec<u8>,
    writer: Writer,
    /// The schema's id in the registry.
    pub id: u32,
    /// The subject it is registered under.
    pub subject: String,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .finish()
    }
}

/// Zigzag varint, as the wire format writes message indexes.
fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The message indexes of `m` in its file: `[0]` is written as the single byte 0.
fn indexes_of(m: &MessageDescriptor) -> Vec<u8> {
    let mut path = Vec::new();
    let mut cur = m.clone();
    loop {
        match cur.parent_message() {
            Some(parent) => {
                let i = parent
                    .child_messages()
                    .position(|c| c.full_name() == cur.full_name())
                    .unwrap_or(0);
                path.push(i as i64);
                cur = parent;
            }
            None => {
                let i = cur
                    .parent_file()
                    .messages()
                    .position(|c| c.full_name() == cur.full_name())
                    .unwrap_or(0);
                path.push(i as i64);
                break;
            }
        }
    }
    path.reverse();
    let mut out = Vec::new();
    if path == [0] {
        out.push(0);
        return out;
    }
    put_zigzag(&mut out, path.len() as i64);
    for i in path {
        put_zigzag(&mut out, i);
    }
    out
}

/// A JSON number an Avro long cannot hold (apache-avro would wrap it round).
fn too_big(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_u64() && !n.is_i64(),
        serde_json::Value::Array(a) => a.iter().any(too_big),
        serde_json::Value::Object(o) => o.values().any(too_big),
        _ => false,
    }
}

/// Every number written to an Avro `int` fits one: apache-avro would cut a larger one to
/// 32 bits without a word.
fn ints_fit(
    v: &serde_json::Value,
    s: &AvroSchema,
    names: &HashMap<apache_avro::schema::Name, AvroSchema>,
) -> Result<(), String> {
    use serde_json::Value as J;
    let out_of_int = |v: &J| v.as_i64().is_some_and(|n| i32::try_from(n).is_err());
    match (v, s) {
        (_, AvroSchema::Ref { name }) => match names.get(name) {
            Some(s) => ints_fit(v, s, names),
            None => Ok(()),
        },
        (J::Number(_), AvroSchema::Int) if out_of_int(v) => {
            Err(format!("{v} does not fit an Avro int"))
        }
        (J::Number(_), AvroSchema::Union(u)) if out_of_int(v) => {
            let wide = u
                .variants()
                .iter()
                .any(|s| matches!(s, AvroSchema::Long | AvroSchema::Float | AvroSchema::Double));
            if u.variants().iter().any(|s| matches!(s, AvroSchema::Int)) && !wide {
                Err(format!("{v} does not fit an Avro int"))
            } else {
                Ok(())
            }
        }
        (J::Object(o), AvroSchema::Record(r)) => {
            r.fields.iter().try_for_each(|f| match o.get(&f.name) {
                Some(v) => ints_fit(v, &f.schema, names),
                None => Ok(()),
            })
        }
        (J::Object(o), AvroSchema::Map(m)) => {
            o.values().try_for_each(|v| ints_fit(v, &m.types, names))
        }
        (J::Array(a), AvroSchema::Array(items)) => {
            a.iter().try_for_each(|v| ints_fit(v, &items.items, names))
        }
        (_, AvroSchema::Union(u)) if !v.is_null() => {
            // The first branch of the value's shape, as apache-avro's resolution picks it.
            match u.variants().iter().find(|s| {
                matches!(
                    (v, s),
                    (
                        J::Object(_),
                        AvroSchema::Record(_) | AvroSchema::Map(_) | AvroSchema::Ref { .. }
                    ) | (J::Array(_), AvroSchema::Array(_))
                )
            }) {
                Some(s) => ints_fit(v, s, names),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

impl Encoder {
    /// Compile the sink's schema and register it (or look it up) under its subject for
    /// `topic`, asking an unreachable registry again for up to a minute.
    pub async fn new(
        config: &SinkRegistryConfig,
        topic: &str,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Self, EncoderSetupError> {
        let registry = Registry::new(&config.registry(), env)?;
        let bad = |message: String| EncoderSetupError::Schema {
            topic: topic.to_string(),
            message,
        };
        let (text, schema_type, writer, full_name) = match &config.schema {
            WriterSchema::Avro(text) => {
                let schema = AvroSchema::parse_str(text)
                    .map_err(|e| bad(format!("not an Avro schema: {e}")))?;
                let name = schema
                    .name()
                    .map(|n| n.fullname(None))
                    .unwrap_or_else(|| "value".to_string());
                let names = apache_avro::schema::ResolvedSchema::try_from(&schema)
                    .map_err(|e| bad(format!("not an Avro schema: {e}")))?
                    .get_names()
                    .iter()
                    .map(|(n, s)| (n.clone(), (*s).clone()))
                    .collect();
                (
                    text.clone(),
                    SchemaType::Avro,
                    Writer::Avro(Box::new(schema), names),
                    name,
                )
            }
            WriterSchema::Protobuf { proto, message } => {
                let reg = super::registry::RegisteredSchema {
                    schema: proto.clone(),
                    schema_type: SchemaType::Protobuf,
                    references: Vec::new(),
                };
                let Compiled::Protobuf { pool, file } = Compiled::new(&reg, &[]).map_err(bad)?
                else {
                    unreachable!("a protobuf schema compiles to Compiled::Protobuf")
                };
                let f = pool
                    .get_file_by_name(&file)
                    .ok_or_else(|| bad("no file".into()))?;
                let desc = match message {
                    Some(m) => pool.get_message_by_name(m).ok_or_else(|| {
                        bad(format!(
                            "no message {m} in it (it has: {})",
                            pool.all_messages()
                                .map(|m| m.full_name().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?,
                    None => f
                        .messages()
                        .next()
                        .ok_or_else(|| bad("the file has no message".into()))?,
                };
                let name = desc.full_name().to_string();
                (
                    proto.clone(),
                    SchemaType::Protobuf,
                    Writer::Protobuf(desc),
                    name,
                )
            }
        };
        let subject = match config.subject_strategy {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => full_name,
            SubjectStrategy::TopicRecord => format!("{topic}-{full_name}"),
        };
        let deadline = Instant::now() + REGISTER_FOR;
        let id = loop {
            let answer = if config.auto_register {
                registry.register(&subject, &text, schema_type).await
            } else {
                registry.lookup(&subject, &text, schema_type).await
            };
            match answer {
                Ok(id) => break id,
                Err(FetchError::Unavailable(m)) if Instant::now() < deadline => {
                    tracing::warn!(subject, error = %m, "schema registry unreachable; asking again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(
                    FetchError::Unavailable(m) | FetchError::NotFound(m) | FetchError::Unusable(m),
                ) => {
                    return Err(EncoderSetupError::Register {
                        topic: topic.to_string(),
                        subject,
                        message: m,
                    })
                }
            }
        };
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&id.to_be_bytes());
        if let Writer::Protobuf(desc) = &writer {
            prefix.extend(indexes_of(desc));
        }
        tracing::info!(
            topic,
            subject,
            id,
            "output values are encoded with a registered schema"
        );
        Ok(Encoder {
            prefix,
            writer,
            id,
            subject,
        })
    }

    /// The wire-format bytes of the JSON `value`, or why it does not fit the schema.
    pub fn encode(&self, value: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = self.prefix.clone();
        match &self.writer {
            Writer::Avro(schema, names) => {
                let json: serde_json::Value = serde_json::from_slice(value)
                    .map_err(|e| format!("the output value is not JSON: {e}"))?;
                if too_big(&json) {
                    return Err("a number is larger than an Avro long holds".into());
                }
                ints_fit(&json, schema, names)?;
                let v = apache_avro::types::Value::from(json)
                    .resolve(schema)
                    .map_err(|e| format!("the value does not fit the Avro schema: {e}"))?;
                let bytes = apache_avro::to_avro_datum(schema, v)
                    .map_err(|e| format!("the value does not fit the Avro schema: {e}"))?;
                out.extend_from_slice(&bytes);
            }
            Writer::Protobuf(desc) => {
                let mut de = serde_json::Deserializer::from_slice(value);
                let msg = DynamicMessage::deserialize_with_options(
                    desc.clone(),
                    &mut de,
                    &DeserializeOptions::new().deny_unknown_fields(true),
                )
                .map_err(|e| format!("the value does not fit message {}: {e}", desc.full_name()))?;
                de.end()
                    .map_err(|e| format!("the output value is not JSON: {e}"))?;
                prost::Message::encode(&msg, &mut out).map_err(|e| e.to_string())?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_indexes_round_trip_through_the_decoder() {
        for path in [vec![1i64], vec![0, 2], vec![3, 0, 1], vec![200]] {
            let mut out = Vec::new();
            put_zigzag(&mut out, path.len() as i64);
            for i in &path {
                put_zigzag(&mut out, *i);
            }
            let (got, rest) = super::super::schema::message_indexes(&out).unwrap();
            assert_eq!(got, path.iter().map(|&i| i as usize).collect::<Vec<_>>());
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn numbers_past_an_int_are_caught_where_the_schema_has_an_int() {
        let schema = AvroSchema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"n","type":"int"},{"name":"m","type":["null","int"]},{"name":"l","type":"long"},{"name":"xs","type":{"type":"array","items":"int"}}]}"#,
        )
        .unwrap();
        let names = HashMap::new();
        let ok = serde_json::json!({"n": 1, "m": null, "l": 3000000000i64, "xs": [1, -2147483648]});
        assert!(ints_fit(&ok, &schema, &names).is_ok());
        for bad in [
            serde_json::json!({"n": 3000000000i64, "m": null, "l": 1, "xs": []}),
            serde_json::json!({"n": 1, "m": -3000000000i64, "l": 1, "xs": []}),
            serde_json::json!({"n": 1, "m": null, "l": 1, "xs": [2147483648i64]}),
        ] {
            assert!(ints_fit(&bad, &schema, &names).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_past_a_long_are_caught() {
        assert!(too_big(
            &serde_json::json!({"a": [18446744073709551615u64]})
        ));
        assert!(!too_big(
            &serde_json::json!({"a": [9223372036854775807i64, -1, 1.5]})
        ));
    }
}
