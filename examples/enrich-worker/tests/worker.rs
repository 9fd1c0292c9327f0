//! The custom worker binary runs a real pipeline: `processor: {custom: {name: enrich}}`
//! selects the compiled-in processor, and every record comes out enriched.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_enrich-worker");

#[test]
fn the_custom_binary_enriches_every_record() {
    let b = bootstrap();
    let (input, output, group) = pipeline_topics("enrich", 2);
    let n = 2_000;
    produce_seq(&input, n);
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = worker_config(
        &b,
        &input,
        &output,
        &group,
        &addr,
        "processor: {custom: {name: enrich}}",
    );
    let mut w = WorkerProcess::start(BIN, &unique("enrich"), &cfg, &addr);
    wait_for("all records committed", Duration::from_secs(120), || {
        uncommitted(&b, &group, &input) == 0
    });
    w.signal("TERM");
    assert!(
        w.wait(Duration::from_secs(30)).expect("exits").success(),
        "{}",
        w.log_tail(20)
    );

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", unique("reader"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&output, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen < n && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert!(
                v["site"].is_string() && v["model"].is_string() && v["tempF"].is_number(),
                "{v}"
            );
            assert_eq!(m.key(), v["deviceId"].as_str().map(str::as_bytes));
            seen += 1;
        }
    }
    assert_eq!(seen, n);
}

#[test]
fn a_processor_name_the_binary_does_not_provide_fails_at_start_up() {
    // A custom binary run with the wrong name fails at start-up with a clear message.
    let dir = std::env::temp_dir().join(unique("enrich-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        worker_config(
            "127.0.0.1:1",
            "in",
            "out",
            "g",
            "127.0.0.1:0",
            "processor: {custom: {name: geo}}",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`geo`") && err.contains("`enrich`"), "{err}");
}
