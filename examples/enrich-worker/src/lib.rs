//! A custom sluice processor: enrich IoT readings with the device's site and model from an
//! in-memory table, and convert the temperature to Fahrenheit.
//!
//! Input:  `{"seq": 1, "deviceId": "dev-7", "tempC": 21.5}`
//! Output: `{"seq": 1, "deviceId": "dev-7", "tempC": 21.5, "tempF": 70.7, "site": "lyon", "model": "TX-2"}`
//!
//! A record that is not JSON, has no `deviceId`, or names an unknown device is an error: the
//! worker never skips it silently (it stalls its partition, or goes to the dead-letter
//! topic once that exists).

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::Value;
use sluice_worker::{Output, ProcessError, Processor, Record};

/// What the table knows about a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    /// Where it is installed.
    pub site: String,
    /// Its hardware model.
    pub model: String,
}

/// The enrichment processor.
#[derive(Debug, Default)]
pub struct Enrich {
    devices: HashMap<String, Device>,
}

impl Enrich {
    /// A processor over a fixed device table.
    pub fn new(devices: HashMap<String, Device>) -> Self {
        Enrich { devices }
    }

    /// The demo table: `dev-0` .. `dev-999`, spread over three sites and two models.
    pub fn demo_table() -> Self {
        let sites = ["lyon", "porto", "turku"];
        let models = ["TX-1", "TX-2"];
        let devices = (0..1000)
            .map(|i| {
                (
                    format!("dev-{i}"),
                    Device {
                        site: sites[i % 3].into(),
                        model: models[i % 2].into(),
                    },
                )
            })
            .collect();
        Enrich { devices }
    }
}

impl Processor for Enrich {
    fn name(&self) -> &'static str {
        "enrich"
    }

    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        let raw = record
            .value
            .as_deref()
            .ok_or_else(|| ProcessError::new("no_value", "the record has no value"))?;
        let mut v: Value = serde_json::from_slice(raw)
            .map_err(|e| ProcessError::new("not_json", e.to_string()))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| ProcessError::new("not_object", "the value is not a JSON object"))?;
        let id = obj
            .get("deviceId")
            .and_then(Value::as_str)
            .ok_or_else(|| ProcessError::new("no_device", "the record has no deviceId"))?
            .to_string();
        let device = self.devices.get(&id).ok_or_else(|| {
            ProcessError::new("unknown_device", format!("device {id} is not in the table"))
        })?;
        if let Some(c) = obj.get("tempC").and_then(Value::as_f64) {
            obj.insert(
                "tempF".into(),
                (((c * 1.8 + 32.0) * 10.0).round() / 10.0).into(),
            );
        }
        obj.insert("site".into(), device.site.clone().into());
        obj.insert("model".into(), device.model.clone().into());
        out.push(Output {
            key: Some(Bytes::from(id)),
            value: Some(Bytes::from(
                serde_json::to_vec(&v).expect("a JSON value serializes"),
            )),
            headers: record.headers.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &str) -> Record {
        Record {
            topic: "iot".into(),
            partition: 0,
            offset: 1,
            timestamp_ms: None,
            key: None,
            value: Some(Bytes::from(value.to_string())),
            headers: vec![],
        }
    }

    fn run(value: &str) -> Result<Value, ProcessError> {
        let mut out = Vec::new();
        Enrich::demo_table().process(&record(value), &mut out)?;
        assert_eq!(out.len(), 1);
        Ok(serde_json::from_slice(out[0].value.as_deref().unwrap()).unwrap())
    }

    #[test]
    fn known_devices_get_site_model_and_fahrenheit() {
        let v = run(r#"{"seq": 1, "deviceId": "dev-7", "tempC": 21.5}"#).unwrap();
        assert_eq!(v["site"], "porto");
        assert_eq!(v["model"], "TX-2");
        assert_eq!(v["tempF"], 70.7);
        assert_eq!(v["seq"], 1);
    }

    #[test]
    fn the_output_is_keyed_by_device() {
        let mut out = Vec::new();
        Enrich::demo_table()
            .process(&record(r#"{"deviceId": "dev-3"}"#), &mut out)
            .unwrap();
        assert_eq!(out[0].key.as_deref(), Some(&b"dev-3"[..]));
    }

    #[test]
    fn bad_records_are_errors_never_silently_dropped() {
        for (input, class) in [
            ("not json", "not_json"),
            ("[1, 2]", "not_object"),
            (r#"{"seq": 1}"#, "no_device"),
            (r#"{"deviceId": "dev-5000"}"#, "unknown_device"),
        ] {
            assert_eq!(run(input).unwrap_err().class, class, "{input}");
        }
    }
}
