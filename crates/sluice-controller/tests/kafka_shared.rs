//! Kafka access shared per connection, against the real broker: one batch answers many
//! pipelines' queries over one client (one metadata request, two offsets requests, one
//! committed-offsets request per group) with the same numbers as one query at a time, and
//! what cannot be read is an error, never zero.

use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::StartFrom;
use sluice_controller::autoscale::lag::{group_lag, LagError};
use sluice_controller::controller::{KafkaInspector, RdKafka};
use sluice_controller::kafka::{Connection, ConnectionKey, LagOf, Query, Requests, Topics};
use sluice_testkit::{bootstrap, create_topic, free_port, produce_seq, unique};

fn counter(name: &str) -> IntCounter {
    IntCounter::new(name, "test").unwrap()
}

fn connection(bootstrap: &str) -> Connection {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    let requests = Requests {
        metadata: counter("metadata"),
        list_offsets: counter("list_offsets"),
        offset_fetch: counter("offset_fetch"),
    };
    Connection::new(ConnectionKey::of(&cfg), cfg, requests)
}

fn commit(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))
            .unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

fn lag(group: &str, topic: &str, start: StartFrom) -> Query {
    Query {
        topics: Topics::one(topic),
        lag: Some(LagOf {
            group: group.into(),
            start,
        }),
    }
}

#[test]
fn one_batch_answers_many_groups_on_shared_topics_as_one_query_each_would() {
    let b = bootstrap();
    let base = unique("shared");
    let topics = [format!("{base}-a"), format!("{base}-b")];
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            create_topic(&b, &topics[0], 3).await.unwrap();
            create_topic(&b, &topics[1], 5).await.unwrap();
        });
    produce_seq(&topics[0], 900);
    produce_seq(&topics[1], 1_000);
    let groups: Vec<String> = (0..6).map(|i| unique(&format!("shared-g{i}"))).collect();
    // Some groups committed part of the way, some on some partitions, some never.
    commit(&groups[0], &topics[0], &[(0, 10), (1, 20), (2, 30)]);
    commit(&groups[1], &topics[0], &[(1, 5)]);
    commit(&groups[2], &topics[1], &[(0, 1), (4, 2)]);
    commit(
        &groups[4],
        &topics[1],
        &[(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)],
    );
    let missing = unique("no-such-topic");
    let queries = vec![
        lag(&groups[0], &topics[0], StartFrom::Earliest),
        lag(&groups[1], &topics[0], StartFrom::Latest),
        Query {
            topics: Topics::one(&topics[1]),
            lag: None,
        },
        lag(&groups[2], &topics[1], StartFrom::Earliest),
        lag(&groups[3], &topics[1], StartFrom::Earliest),
        lag(&groups[4], &topics[1], StartFrom::Latest),
        lag(&groups[5], &missing, StartFrom::Earliest),
        // A pipeline of both topics, by name and by pattern: their partitions and lags
        // together.
        Query {
            topics: Topics::Names(topics.to_vec()),
            lag: Some(LagOf {
                group: groups[0].clone(),
                start: StartFrom::Earliest,
            }),
        },
        Query {
            topics: Topics::Pattern(format!("{base}-[ab]")),
            lag: Some(LagOf {
                group: groups[2].clone(),
                start: StartFrom::Earliest,
            }),
        },
        Query {
            topics: Topics::Pattern(format!("{base}-z.*")),
            lag: None,
        },
    ];
    let conn = connection(&b);
    let answers = RdKafka.read(&conn, &queries);
    assert_eq!(answers.len(), queries.len());

    // The same numbers as one query at a time, with a client each (the old way).
    let cfg = ClientConfig::new().set("bootstrap.servers", &b).clone();
    for (q, a) in queries.iter().zip(&answers) {
        let names: Vec<String> = match &q.topics {
            Topics::Names(n) if n == std::slice::from_ref(&missing) => {
                assert!(matches!(a.partitions, Err(LagError::TopicNotFound(_))));
                assert!(matches!(a.lag, Some(Err(LagError::TopicNotFound(_)))));
                continue;
            }
            Topics::Names(n) => n.clone(),
            Topics::Pattern(p) if p.ends_with("z.*") => {
                let e = a.partitions.as_ref().unwrap_err().to_string();
                assert!(
                    e.contains("no topic matches /") && e.ends_with("/ yet"),
                    "{e}"
                );
                continue;
            }
            Topics::Pattern(_) => topics.to_vec(),
        };
        let want: u32 = names
            .iter()
            .map(|t| if *t == topics[0] { 3 } else { 5 })
            .sum();
        assert_eq!(*a.partitions.as_ref().unwrap(), want, "{}", q.topics);
        match &q.lag {
            None => assert!(a.lag.is_none()),
            Some(l) => {
                let mut one = Vec::new();
                for t in &names {
                    one.extend(
                        group_lag(&cfg, &l.group, t, l.start, Duration::from_secs(10)).unwrap(),
                    );
                }
                let got = a.lag.as_ref().unwrap().as_ref().unwrap();
                assert_eq!(got, &one, "{} on {}", l.group, q.topics);
            }
        }
    }
    // Spot check against the arithmetic: group 0 committed 60 of topic 0's 900 records.
    let g0 = answers[0].lag.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(g0.iter().map(|p| p.lag).sum::<u64>(), 840);
    assert_eq!(g0.iter().map(|p| p.high).sum::<i64>(), 900);

    // One batch: one metadata request, two offsets requests, one request per group.
    assert_eq!(conn.requests.metadata.get(), 1);
    assert_eq!(conn.requests.list_offsets.get(), 2);
    assert_eq!(
        conn.requests.offset_fetch.get(),
        5,
        "five groups on topics that exist"
    );

    // The client stays: a second batch opens no other one and sees new records.
    produce_seq(&topics[0], 30);
    let again = RdKafka.read(&conn, &queries[..1]);
    let g0 = again[0].lag.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(g0.iter().map(|p| p.high).sum::<i64>(), 930);
    assert_eq!(conn.requests.metadata.get(), 2);
}

#[test]
fn a_kafka_out_of_reach_is_an_error_for_every_query_never_zero_lag() {
    let conn = connection(&format!("127.0.0.1:{}", free_port()));
    let queries = vec![
        lag("g", "t", StartFrom::Earliest),
        Query {
            topics: Topics::one("u"),
            lag: None,
        },
    ];
    let answers = RdKafka.read(&conn, &queries);
    assert!(matches!(answers[0].partitions, Err(LagError::Kafka { .. })));
    assert!(matches!(answers[0].lag, Some(Err(LagError::Kafka { .. }))));
    assert!(matches!(answers[1].partitions, Err(LagError::Kafka { .. })));
    assert!(answers[1].lag.is_none());
}
