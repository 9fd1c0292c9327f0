//! Record headers through the worker, against the real broker: kept exactly, whether a
//! record has none, one or many (librdkafka reads a record without headers through the
//! fast path sluice vendors, vendor/patches/README.md; that it allocates nothing is
//! sluice-loadgen's tests/header_fast_path.rs).

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

/// A record's headers as the tests compare them: name and value (`None`: a null value).
type Headers = Vec<(String, Option<Vec<u8>>)>;

fn create_topics(names: &[&str], partitions: i32) {
    let b = bootstrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            for n in names {
                create_topic(&b, n, partitions).await.unwrap();
            }
        });
}

/// Produce `(value, headers)` records to partition 0 of `topic`, in order; a record with
/// an empty header list is produced without headers at all (its header count is 0).
fn produce_with_headers(topic: &str, records: &[(Vec<u8>, Headers)]) {
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for (value, headers) in records {
        let mut rec: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(topic).payload(&value[..]).partition(0);
        if !headers.is_empty() {
            rec = rec.headers(headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k.as_str(),
                    value: v.as_deref(),
                })
            }));
        }
        p.send(rec).map_err(|(e, _)| e).expect("enqueued");
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60))
        .expect("every record delivered");
}

/// A header with a value.
fn header(name: &str, value: &[u8]) -> (String, Option<Vec<u8>>) {
    (name.to_string(), Some(value.to_vec()))
}

/// The headers of record `i` of the behaviour test: none, one, or the awkward kinds
/// (a null value, an empty value, an empty name, a repeated name, binary bytes).
fn headers_of(i: usize) -> Headers {
    match i % 4 {
        0 | 2 => vec![],
        1 => vec![header("trace", format!("t-{i}").as_bytes())],
        _ => vec![
            ("null".to_string(), None),
            header("empty", b""),
            header("", b"no name"),
            header("dup", b"first"),
            header("dup", b"second"),
            header("bytes", &[0, 0xff, 0x80, 0x01]),
        ],
    }
}

#[test]
fn records_keep_their_headers_exactly_through_a_relay_with_or_without_any() {
    let input = unique("headers-in");
    let output = unique("headers-out");
    let group = unique("headers-g");
    create_topics(&[&input, &output], 1);
    let n = 400;
    let records: Vec<(Vec<u8>, Headers)> = (0..n)
        .map(|i| (format!("{{\"seq\":{i}}}").into_bytes(), headers_of(i)))
        .collect();
    produce_with_headers(&input, &records);

    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = worker_config(&bootstrap(), &input, &output, &group, &addr, "");
    let mut w = WorkerProcess::start(BIN, &unique("headers"), &cfg, &addr);
    wait_for("every record committed", Duration::from_secs(120), || {
        uncommitted(&bootstrap(), &group, &input) == 0
    });
    w.signal("TERM");
    let st = w.wait(Duration::from_secs(30)).expect("exit");
    assert!(st.success(), "{st:?}\n{}", w.log_tail(30));

    let out = read_all(&output, Duration::from_secs(60));
    assert_eq!(out.len(), n, "every record relayed once");
    for (i, r) in out.iter().enumerate() {
        assert_eq!(
            r.value.as_deref(),
            Some(&records[i].0[..]),
            "record {i} in order"
        );
        assert_eq!(r.all_headers, records[i].1, "record {i}'s headers");
    }
}
