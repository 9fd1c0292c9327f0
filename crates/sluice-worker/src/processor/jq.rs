//! The `jq` processor: a jq program run by jaq (a Rust implementation of jq).
//!
//! The program is compiled once when the worker starts; a compile error stops start-up
//! with jq's message and the position in the program. Each record's value is parsed as
//! JSON and is the program's input; each value the program emits is one output (so one
//! record yields zero, one or many outputs). A value that is not JSON (class `not_json`)
//! or a runtime error (class `jq_error`) fails the record, which then goes to the
//! dead-letter path.
//!
//! The program sees these variables: `$key` (the record key as a string, or null),
//! `$topic`, `$partition`, `$offset`, `$timestamp` (ms since the epoch, or null) and
//! `$headers` (an object of header name to string value).
//!
//! Output shape: by default each emitted value is the output value (written as compact
//! JSON) and the key and headers are the input's. With `envelope: true` each emitted value
//! must be an object `{"value": ..., "key": "...", "headers": {"name": "value"}}`: `key`
//! (a string; null for none) and `headers` are optional and default to the input's.

use bytes::Bytes;
use jaq_core::{data, unwrap_valr, Ctx, Vars};
use jaq_json::{read, write, Val};
pub use sluice_api::jq::CompileError;
use sluice_api::jq::Filter;

use crate::processor::{ProcessError, Processor};
use crate::record::{Header, Output, Record};

/// A compiled jq program.
pub struct Jq {
    filter: Filter,
    envelope: bool,
}

impl std::fmt::Debug for Jq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jq")
            .field("envelope", &self.envelope)
            .finish()
    }
}

impl Jq {
    /// Compile `program` (see [`sluice_api::jq::compile`]).
    pub fn compile(program: &str, envelope: bool) -> Result<Self, CompileError> {
        Ok(Jq {
            filter: sluice_api::jq::compile(program)?,
            envelope,
        })
    }

    fn vars(record: &Record) -> Vars<Val> {
        let key = record.key.clone().map_or(Val::Null, Val::utf8_str);
        let headers: jaq_json::Map = record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    Val::utf8_str(Bytes::from(k.clone())),
                    v.clone().map_or(Val::Null, Val::utf8_str),
                )
            })
            .collect();
        Vars::new([
            key,
            Val::utf8_str(Bytes::from(record.topic.to_string())),
            Val::from(record.partition as isize),
            Val::from(record.offset as isize),
            record
                .timestamp_ms
                .map_or(Val::Null, |t| Val::from(t as isize)),
            Val::obj(headers),
        ])
    }

    fn output(&self, record: &Record, v: Val) -> Result<Output, ProcessError> {
        if !self.envelope {
            return Ok(Output {
                key: record.key.clone(),
                value: Some(json_bytes(&v)),
                headers: record.headers.clone(),
            });
        }
        let Val::Obj(obj) = &v else {
            return Err(ProcessError::new(
                "jq_envelope",
                format!(
                    "with envelope: true the program must emit objects {{\"value\": ...}}, got {}",
                    short(&v)
                ),
            ));
        };
        let field = |name: &str| obj.get(&Val::utf8_str(Bytes::copy_from_slice(name.as_bytes())));
        let Some(value) = field("value") else {
            return Err(ProcessError::new(
                "jq_envelope",
                format!("the emitted object has no \"value\": {}", short(&v)),
            ));
        };
        let key = match field("key") {
            None => record.key.clone(),
            Some(Val::Null) => None,
            Some(Val::TStr(b) | Val::BStr(b)) => Some((**b).clone()),
            Some(other) => Some(json_bytes(other)),
        };
        let headers = match field("headers") {
            None => record.headers.clone(),
            Some(Val::Obj(h)) => h
                .iter()
                .map(|(k, v)| {
                    let name = match k {
                        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                        other => other.to_string(),
                    };
                    let value = match v {
                        Val::Null => None,
                        Val::TStr(b) | Val::BStr(b) => Some((**b).clone()),
                        other => Some(json_bytes(other)),
                    };
                    (name, value)
                })
                .collect::<Vec<Header>>(),
            Some(other) => {
                return Err(ProcessError::new(
                    "jq_envelope",
                    format!("\"headers\" must be an object, got {}", short(other)),
                ))
            }
        };
        Ok(Output {
            key,
            value: Some(json_bytes(value)),
            headers,
        })
    }
}

fn json_bytes(v: &Val) -> Bytes {
    let mut buf = Vec::with_capacity(64);
    // Writing to a Vec cannot fail.
    let _ = write::write(&mut buf, &write::Pp::default(), 0, v);
    buf.into()
}

fn short(v: &Val) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

impl Processor for Jq {
    fn name(&self) -> &'static str {
        "jq"
    }

    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        let input = match &record.value {
            None => Val::Null,
            Some(v) => read::parse_single(v).map_err(|e| {
                ProcessError::new("not_json", format!("the record value is not JSON: {e}"))
            })?,
        };
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Self::vars(record));
        let start = out.len();
        for v in self.filter.id.run((ctx, input)).map(unwrap_valr) {
            match v {
                Ok(v) => {
                    let o = self.output(record, v);
                    match o {
                        Ok(o) => out.push(o),
                        Err(e) => {
                            out.truncate(start);
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    // A jq error ends the program: none of this record's outputs count.
                    out.truncate(start);
                    return Err(ProcessError::new("jq_error", e.to_string()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "in".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_700_000_000_000),
            key: Some(Bytes::from_static(b"dev-1")),
            value: Some(Bytes::copy_from_slice(value)),
            headers: vec![("trace".into(), Some(Bytes::from_static(b"t1")))],
        }
    }

    fn run(program: &str, envelope: bool, value: &[u8]) -> Result<Vec<Output>, ProcessError> {
        let jq = Jq::compile(program, envelope).unwrap();
        let mut out = Vec::new();
        jq.process(&record(value), &mut out)?;
        Ok(out)
    }

    fn values(outs: &[Output]) -> Vec<String> {
        outs.iter()
            .map(|o| String::from_utf8(o.value.clone().unwrap().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_record_yields_zero_one_or_many_outputs() {
        let v = br#"{"temp": 31, "readings": [1, 2, 3]}"#;
        assert!(run("select(.temp > 40)", false, v).unwrap().is_empty());
        assert_eq!(
            values(&run("{t: .temp}", false, v).unwrap()),
            [r#"{"t":31}"#]
        );
        assert_eq!(
            values(&run(".readings[] * 10", false, v).unwrap()),
            ["10", "20", "30"]
        );
    }

    #[test]
    fn by_default_key_and_headers_are_the_inputs() {
        let out = run(".", false, br#"{"a":1}"#).unwrap();
        assert_eq!(out[0].key.as_deref(), Some(&b"dev-1"[..]));
        assert_eq!(out[0].headers, record(b"").headers);
    }

    #[test]
    fn the_program_sees_the_record_coordinates() {
        let out = run(
            "{k: $key, t: $topic, p: $partition, o: $offset, ts: $timestamp, h: $headers.trace}",
            false,
            b"null",
        )
        .unwrap();
        assert_eq!(
            values(&out),
            [r#"{"k":"dev-1","t":"in","p":3,"o":42,"ts":1700000000000,"h":"t1"}"#]
        );
    }

    #[test]
    fn an_envelope_sets_key_and_headers() {
        let out = run(
            r#"{key: .id, value: {c: .temp}, headers: {src: $topic}}"#,
            true,
            br#"{"id":"x9","temp":3}"#,
        )
        .unwrap();
        assert_eq!(out[0].key.as_deref(), Some(&b"x9"[..]));
        assert_eq!(values(&out), [r#"{"c":3}"#]);
        assert_eq!(
            out[0].headers,
            vec![("src".to_string(), Some(Bytes::from_static(b"in")))]
        );
        // key and headers default to the input's; a null key removes it
        let out = run("{value: 1}", true, b"{}").unwrap();
        assert_eq!(out[0].key.as_deref(), Some(&b"dev-1"[..]));
        let out = run("{value: 1, key: null}", true, b"{}").unwrap();
        assert_eq!(out[0].key, None);
        let e = run("1", true, b"{}").unwrap_err();
        assert_eq!(e.class, "jq_envelope");
    }

    #[test]
    fn bad_input_and_runtime_errors_fail_the_record_with_a_class() {
        let e = run(".", false, b"not json{").unwrap_err();
        assert_eq!(e.class, "not_json");
        let e = run(".x | tonumber", false, br#"{"x":"abc"}"#).unwrap_err();
        assert_eq!(e.class, "jq_error");
        assert!(e.message.contains("abc"), "{}", e.message);
        // outputs emitted before the error do not survive it
        let jq = Jq::compile(".[] | if . == 2 then error(\"two\") else . end", false).unwrap();
        let mut out = Vec::new();
        assert!(jq.process(&record(b"[1,2,3]"), &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn compile_errors_name_the_position() {
        let e = Jq::compile(".a |", false).unwrap_err().to_string();
        assert!(e.contains("line 1, column 5"), "{e}");
        let e = Jq::compile("{a: 1}\n| foo(1)", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("undefined filter `foo`") && e.contains("line 2, column 3"),
            "{e}"
        );
        let e = Jq::compile("$nope", false).unwrap_err().to_string();
        assert!(e.contains("undefined variable `$nope`"), "{e}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// JSON-looking text: valid documents, truncated ones and byte noise.
        fn jsonish() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                "[ \\[\\]{}:,\"a-z0-9.eE+-]{0,120}".prop_map(String::into_bytes),
                (any::<i64>(), any::<f64>(), "[a-z]{0,8}").prop_map(|(i, f, s)| {
                    format!(r#"{{"seq":{i},"deviceId":"{s}","tempC":{f},"n":[1,{{"x":null}}]}}"#)
                        .into_bytes()
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]
            #[test]
            fn fuzz_jq_input_path_never_panics_and_fails_only_with_a_known_class(
                value in jsonish(),
                key in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
                header in prop::option::of(prop::collection::vec(any::<u8>(), 0..32)),
                envelope in any::<bool>(),
                program in prop::sample::select(vec![
                    ".",
                    "{seq, device: .deviceId, tempF: ((.tempC | tonumber) * 9 / 5 + 32)}",
                    ".[]?",
                    "{value: ., key: $key, headers: $headers}",
                    "select(type == \"object\") | .n[]? | tostring",
                    "$key | ascii_downcase",
                ]),
            ) {
                let jq = Jq::compile(program, envelope).unwrap();
                let record = Record {
                    topic: "t".into(),
                    partition: 0,
                    offset: 1,
                    timestamp_ms: None,
                    key: key.map(Bytes::from),
                    value: Some(Bytes::from(value)),
                    headers: header.map(|h| vec![("h".to_string(), Some(Bytes::from(h)))]).unwrap_or_default(),
                };
                let mut out = Vec::new();
                if let Err(e) = jq.process(&record, &mut out) {
                    prop_assert!(["not_json", "jq_error", "jq_envelope"].contains(&e.class), "{e}");
                    prop_assert!(out.is_empty());
                }
            }
        }
    }
}
