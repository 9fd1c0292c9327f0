//! Schemas compiled for decoding, and the wire format they decode.

use std::collections::HashMap;

use apache_avro::Schema as AvroSchema;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use super::registry::{RegisteredSchema, SchemaType};

/// A value in the Confluent wire format, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireValue<'a> {
    /// The schema id.
    pub id: u32,
    /// What follows the id (for Protobuf, the message indexes then the message).
    pub rest: &'a [u8],
}

impl<'a> WireValue<'a> {
    /// Split `value`: a zero byte, 4 bytes of id, the rest.
    pub fn parse(value: &'a [u8]) -> Result<Self, String> {
        match value {
            [0, a, b, c, d, rest @ ..] => Ok(WireValue {
                id: u32::from_be_bytes([*a, *b, *c, *d]),
                rest,
            }),
            [] => Err("an empty value is not in the schema registry's wire format".into()),
            [m, ..] if *m != 0 => Err(format!(
                "the value does not start with the wire format's zero byte (it starts with 0x{m:02x}): not written by a schema-registry serializer"
            )),
            _ => Err(format!(
                "{} bytes are too short for the wire format (a zero byte and a 4-byte schema id)",
                value.len()
            )),
        }
    }
}

/// A zigzag varint (Protobuf's `sint32`, as the wire format writes message indexes).
fn read_zigzag(buf: &mut &[u8]) -> Result<i64, String> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some((&b, rest)) = buf.split_first() else {
            return Err("the message indexes end early".into());
        };
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    Err("a message index is not a varint".into())
}

/// The message indexes at the start of a Protobuf wire value, and the message after them.
/// `[0]` (one byte) is the file's first message.
pub fn message_indexes(mut rest: &[u8]) -> Result<(Vec<usize>, &[u8]), String> {
    let count = read_zigzag(&mut rest)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    if !(1..=100).contains(&count) {
        return Err(format!("{count} message indexes"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let i = read_zigzag(&mut rest)?;
        out.push(usize::try_from(i).map_err(|_| format!("message index {i}"))?);
    }
    Ok((out, rest))
}

/// A schema ready to decode with.
pub enum Compiled {
    /// Avro, with the schemas it names.
    Avro {
        /// The writer's schema.
        schema: Box<AvroSchema>,
        /// The schemas it references.
        refs: Vec<AvroSchema>,
    },
    /// Protobuf: the schema's file in a pool with its imports.
    Protobuf {
        /// The pool.
        pool: DescriptorPool,
        /// The schema's file name in it.
        file: String,
    },
    /// JSON Schema: the payload is JSON already.
    Json,
}

const PROTO_MAIN: &str = "sluice-schema.proto";

impl Compiled {
    /// Compile `main` with its references (`(name, schema)`).
    pub fn new(
        main: &RegisteredSchema,
        refs: &[(String, RegisteredSchema)],
    ) -> Result<Self, String> {
        match main.schema_type {
            SchemaType::Json => Ok(Compiled::Json),
            SchemaType::Avro => {
                // Before any decode (apache-avro reads the limit once, at its first decode).
                apache_avro::util::max_allocation_bytes(super::AVRO_MAX_ALLOCATION);
                let texts: Vec<&str> = refs.iter().map(|(_, s)| s.schema.as_str()).collect();
                let (schema, refs) = if texts.is_empty() {
                    let schema = AvroSchema::parse_str(&main.schema)
                        .map_err(|e| format!("not an Avro schema: {e}"))?;
                    (schema, Vec::new())
                } else {
                    AvroSchema::parse_str_with_list(&main.schema, texts)
                        .map_err(|e| format!("not an Avro schema (with its references): {e}"))?
                };
                Ok(Compiled::Avro {
                    schema: Box::new(schema),
                    refs,
                })
            }
            SchemaType::Protobuf => {
                let mut files: HashMap<String, protox::file::File> = HashMap::new();
                let main_file = proto_file(PROTO_MAIN, &main.schema)?;
                let main_name = main_file.name().to_string();
                files.insert(main_name.clone(), main_file);
                for (name, s) in refs {
                    files.insert(name.clone(), proto_file(name, &s.schema)?);
                }
                let mut resolver = protox::file::ChainFileResolver::new();
                resolver.add(MapResolver(files));
                resolver.add(protox::file::GoogleFileResolver::new());
                let mut compiler = protox::Compiler::with_file_resolver(resolver);
                compiler.include_imports(true);
                compiler
                    .open_file(&main_name)
                    .map_err(|e| format!("not a Protobuf schema: {e}"))?;
                let pool = compiler.descriptor_pool();
                if pool.get_file_by_name(&main_name).is_none() {
                    return Err(format!("the compiled schema has no file {main_name}"));
                }
                Ok(Compiled::Protobuf {
                    pool,
                    file: main_name,
                })
            }
        }
    }

    /// A short name of the schema's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Compiled::Avro { .. } => "avro",
            Compiled::Protobuf { .. } => "protobuf",
            Compiled::Json => "json",
        }
    }

    /// The value as JSON text.
    pub fn decode(&self, wire: &WireValue<'_>) -> Result<Vec<u8>, String> {
        match self {
            Compiled::Json => {
                serde_json::from_slice::<serde::de::IgnoredAny>(wire.rest)
                    .map_err(|e| format!("not JSON: {e}"))?;
                Ok(wire.rest.to_vec())
            }
            Compiled::Avro { schema, refs } => {
                let mut reader = Exact {
                    rest: wire.rest,
                    short: false,
                };
                let value = if refs.is_empty() {
                    apache_avro::from_avro_datum(schema, &mut reader, None)
                } else {
                    apache_avro::from_avro_datum_schemata(
                        schema,
                        refs.iter().collect(),
                        &mut reader,
                        None,
                    )
                }
                .map_err(|e| e.to_string())?;
                if reader.short {
                    return Err("the payload ends early".into());
                }
                if !reader.rest.is_empty() {
                    return Err(format!("{} bytes left after the record", reader.rest.len()));
                }
                let json = serde_json::Value::try_from(value).map_err(|e| e.to_string())?;
                serde_json::to_vec(&json).map_err(|e| e.to_string())
            }
            Compiled::Protobuf { pool, file } => {
                let (indexes, payload) = message_indexes(wire.rest)?;
                let desc = message(pool, file, &indexes)?;
                let msg = DynamicMessage::decode(desc, payload).map_err(|e| e.to_string())?;
                let options = SerializeOptions::new()
                    .stringify_64_bit_integers(false)
                    .use_proto_field_name(true)
                    .skip_default_fields(false);
                let mut out = Vec::with_capacity(payload.len() * 2);
                let mut ser = serde_json::Serializer::new(&mut out);
                msg.serialize_with_options(&mut ser, &options)
                    .map_err(|e| e.to_string())?;
                Ok(out)
            }
        }
    }
}

/// The payload as apache-avro reads it, remembering whether it asked for more than there
/// was: apache-avro reads the end of input inside some values (a string, bytes, a boolean,
/// a union's branch) as null instead of failing, so a record cut short would decode.
struct Exact<'a> {
    rest: &'a [u8],
    short: bool,
}

impl std::io::Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.short = true;
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

/// The message of `file` that `indexes` name: the first picks a top-level message, each
/// next one a message nested in it.
fn message(
    pool: &DescriptorPool,
    file: &str,
    indexes: &[usize],
) -> Result<MessageDescriptor, String> {
    let f = pool
        .get_file_by_name(file)
        .ok_or("the schema's file is gone")?;
    let (first, nested) = indexes.split_first().ok_or("no message index")?;
    let mut m = f
        .messages()
        .nth(*first)
        .ok_or_else(|| format!("the schema has no message {first}"))?;
    for i in nested {
        let child = m.child_messages().nth(*i);
        m = child.ok_or_else(|| format!("message {} has no nested message {i}", m.full_name()))?;
    }
    Ok(m)
}

/// A `.proto` file from a registry's schema text: `.proto` source, or a base64
/// `FileDescriptorProto` (what Confluent's serializers register and some registries return).
fn proto_file(name: &str, schema: &str) -> Result<protox::file::File, String> {
    use base64::Engine;
    let trimmed = schema.trim();
    if !trimmed.contains(char::is_whitespace) {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(trimmed) {
            if let Ok(mut fdp) =
                <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice())
            {
                if fdp.name.as_deref().is_none_or(str::is_empty) {
                    fdp.name = Some(name.to_string());
                }
                return Ok(protox::file::File::from_file_descriptor_proto(fdp));
            }
        }
    }
    protox::file::File::from_source(name, schema).map_err(|e| format!("not a Protobuf schema: {e}"))
}

/// Files by name.
struct MapResolver(HashMap<String, protox::file::File>);

impl protox::file::FileResolver for MapResolver {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| protox::Error::file_not_found(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_split_or_refused() {
        let w = WireValue::parse(&[0, 0, 0, 1, 2, 9, 8]).unwrap();
        assert_eq!((w.id, w.rest), (258, &[9u8, 8][..]));
        assert!(WireValue::parse(b"{\"a\":1}")
            .unwrap_err()
            .contains("zero byte"));
        assert!(WireValue::parse(&[0, 1]).unwrap_err().contains("too short"));
        assert!(WireValue::parse(&[]).unwrap_err().contains("empty"));
    }

    #[test]
    fn message_indexes_follow_confluents_encoding() {
        assert_eq!(
            message_indexes(&[0, 8, 1]).unwrap(),
            (vec![0], &[8u8, 1][..])
        );
        // [1]: count 1 (zigzag 2), index 1 (zigzag 2).
        assert_eq!(message_indexes(&[2, 2, 8]).unwrap(), (vec![1], &[8u8][..]));
        // [0, 2]: count 2 (4), 0 (0), 2 (4).
        assert_eq!(message_indexes(&[4, 0, 4]).unwrap(), (vec![0, 2], &[][..]));
        assert!(message_indexes(&[]).is_err());
        assert!(message_indexes(&[1]).is_err(), "a negative count");
    }

    fn registered(t: SchemaType, schema: &str) -> RegisteredSchema {
        RegisteredSchema {
            schema: schema.into(),
            schema_type: t,
            references: vec![],
        }
    }

    #[test]
    fn avro_records_decode_into_json() {
        let schema = r#"{"type":"record","name":"Reading","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"},{"name":"temp","type":["null","double"]}]}"#;
        let c = Compiled::new(&registered(SchemaType::Avro, schema), &[]).unwrap();
        let AvroSchema::Record(_) = (match &c {
            Compiled::Avro { schema, .. } => (**schema).clone(),
            _ => panic!(),
        }) else {
            panic!()
        };
        // id 3 (zigzag 6), "ab", union branch 1 (2), 20.25.
        let mut payload = vec![6, 4, b'a', b'b', 2];
        payload.extend_from_slice(&20.25f64.to_le_bytes());
        let json = c
            .decode(&WireValue {
                id: 1,
                rest: &payload,
            })
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v, serde_json::json!({"id": 3, "name": "ab", "temp": 20.25}));
        let short = c.decode(&WireValue {
            id: 1,
            rest: &payload[..3],
        });
        assert!(short.is_err(), "{:?}", short.map(String::from_utf8));
        assert!(Compiled::new(&registered(SchemaType::Avro, "{not avro"), &[]).is_err());
    }

    #[test]
    fn a_forged_avro_block_count_is_a_decode_error_not_an_allocation() {
        let c = Compiled::new(
            &registered(SchemaType::Avro, r#"{"type":"array","items":"long"}"#),
            &[],
        )
        .unwrap();
        // A block of 500,000,000 longs (zigzag 1e9), then nothing.
        let mut payload = Vec::new();
        let mut z: u64 = 1_000_000_000;
        while z >= 0x80 {
            payload.push((z as u8) | 0x80);
            z >>= 7;
        }
        payload.push(z as u8);
        assert!(c
            .decode(&WireValue {
                id: 1,
                rest: &payload
            })
            .is_err());
    }

    #[test]
    fn protobuf_messages_decode_by_their_indexes() {
        let proto = r#"syntax = "proto3";
package demo;
message Other { string x = 1; }
message Reading { int64 id = 1; string name = 2; double temp = 3;
  message Inner { bool ok = 1; } }
"#;
        let c = Compiled::new(&registered(SchemaType::Protobuf, proto), &[]).unwrap();
        // Reading = message 1: indexes [1] = 02 02; id=1, name="s", temp=0 (a default).
        let rest = [2u8, 2, 0x08, 0x01, 0x12, 0x01, b's'];
        let v: serde_json::Value =
            serde_json::from_slice(&c.decode(&WireValue { id: 1, rest: &rest }).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"id": 1, "name": "s", "temp": 0.0}));
        // Reading.Inner = [1, 0]: 04 02 00; ok=true.
        let rest = [4u8, 2, 0, 0x08, 0x01];
        let v: serde_json::Value =
            serde_json::from_slice(&c.decode(&WireValue { id: 1, rest: &rest }).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"ok": true}));
        // The same schema as a base64 FileDescriptorProto.
        let fds = match &c {
            Compiled::Protobuf { pool, file } => pool
                .get_file_by_name(file)
                .unwrap()
                .file_descriptor_proto()
                .clone(),
            _ => panic!(),
        };
        use base64::Engine;
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(&fds));
        let c2 = Compiled::new(&registered(SchemaType::Protobuf, &b64), &[]).unwrap();
        let rest = [0u8, 0x0a, 0x01, b'q'];
        let v: serde_json::Value =
            serde_json::from_slice(&c2.decode(&WireValue { id: 1, rest: &rest }).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"x": "q"}));
        assert!(c
            .decode(&WireValue {
                id: 1,
                rest: &[2, 8]
            })
            .unwrap_err()
            .contains("no message 4"));
    }

    #[test]
    fn json_schema_values_must_be_json() {
        let c = Compiled::new(&registered(SchemaType::Json, "{}"), &[]).unwrap();
        assert_eq!(
            c.decode(&WireValue {
                id: 1,
                rest: b"{\"a\":1}"
            })
            .unwrap(),
            b"{\"a\":1}"
        );
        assert!(c
            .decode(&WireValue {
                id: 1,
                rest: b"{\"a\""
            })
            .is_err());
    }
}
