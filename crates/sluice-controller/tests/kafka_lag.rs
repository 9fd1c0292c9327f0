//! Lag and partition count against the real broker.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::StartFrom;
use sluice_controller::autoscale::lag::{group_lag, partition_count, LagError};
use sluice_testkit::{bootstrap, create_topic, unique};

#[test]
fn lag_per_partition_is_high_watermark_minus_committed_or_from_the_log_start() {
    let b = bootstrap();
    let topic = unique("lag");
    let group = unique("lag-g");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            create_topic(&b, &topic, 6).await.unwrap();
        });
    // Partition p gets 100 * (p + 1) records.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    for p in 0..6 {
        for i in 0..100 * (p + 1) {
            let payload = format!("{i}");
            producer
                .send(
                    BaseRecord::<(), _>::to(&topic)
                        .partition(p)
                        .payload(&payload),
                )
                .unwrap();
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    // The group commits 50 on partitions 0..3 and nothing on 3..6.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Offset(50))
            .unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();

    let cfg = ClientConfig::new().set("bootstrap.servers", &b).clone();
    assert_eq!(
        partition_count(&cfg, &topic, Duration::from_secs(10)).unwrap(),
        6
    );
    let lag = group_lag(
        &cfg,
        &group,
        &topic,
        StartFrom::Earliest,
        Duration::from_secs(10),
    )
    .unwrap();
    let got: Vec<(i32, Option<i64>, u64)> = lag
        .iter()
        .map(|l| (l.partition, l.committed, l.lag))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, Some(50), 50),
            (1, Some(50), 150),
            (2, Some(50), 250),
            (3, None, 400),
            (4, None, 500),
            (5, None, 600)
        ]
    );
}

#[test]
fn a_missing_topic_is_an_error_not_zero_lag() {
    let b = bootstrap();
    let cfg = ClientConfig::new().set("bootstrap.servers", &b).clone();
    let missing = unique("no-such-topic");
    let e = group_lag(
        &cfg,
        "g",
        &missing,
        StartFrom::Earliest,
        Duration::from_secs(10),
    )
    .unwrap_err();
    assert!(matches!(e, LagError::TopicNotFound(_)), "{e}");
    assert!(partition_count(&cfg, &missing, Duration::from_secs(10)).is_err());
}
