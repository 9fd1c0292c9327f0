//! A worker whose custom processor panics on one record in 10,000 (those whose `seq`
//! field ends in 5000): what the fault harness runs to show that a processor panic is
//! the record's failure (dead-lettered with class `panic`) and its lane lives on
//! (`sluice-chaos panic`). Configuration: `processor: {custom: {name: panic-on-seq}}`.

use std::sync::Arc;

use sluice_worker::{Output, ProcessError, Processor, Record};

struct PanicOnSeq;

impl Processor for PanicOnSeq {
    fn name(&self) -> &'static str {
        "panic-on-seq"
    }

    fn process(&self, r: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        let seq = r
            .value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.split("\"seq\":").nth(1))
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|v| v.parse::<u64>().ok());
        if seq.is_some_and(|s| s % 10_000 == 5_000) {
            panic!("panic-on-seq: record {seq:?}");
        }
        out.push(Output {
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
        });
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    sluice_worker::run(Some(Arc::new(PanicOnSeq)))
}
