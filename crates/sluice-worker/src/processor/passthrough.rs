use crate::processor::{ProcessError, Processor};
use crate::record::{Output, Record};

/// Emits each record unchanged: same key, value and headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Passthrough;

impl Processor for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        out.push(Output {
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
        });
        Ok(())
    }
}

/// Passthrough after a sleep per record: simulates expensive processing in load tests.
#[derive(Clone, Copy, Debug)]
pub struct Delay(pub std::time::Duration);

impl Processor for Delay {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        std::thread::sleep(self.0);
        Passthrough.process(record, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn passthrough_keeps_key_value_and_headers() {
        let r = Record {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
            headers: vec![("h".into(), Some(Bytes::from_static(b"x")))],
        };
        let mut out = Vec::new();
        Passthrough.process(&r, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, r.key);
        assert_eq!(out[0].value, r.value);
        assert_eq!(out[0].headers, r.headers);
    }
}
