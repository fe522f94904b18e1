//! The outbox relay against a real Kafka-protocol broker (tansu, started
//! by tests/ensure-kafka.sh; KAFKA_BROKERS names it): every event arrives
//! with its headers and per-stream order, one replica publishes at a time,
//! and a broker outage only makes the relay lag until it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use eventplane::metrics::Metrics;
use eventplane::relay::{
    HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_POSITION, Relay, RelayConfig, RelayStatus,
};
use eventplane_store::events::model::NamedVersion;
use eventplane_store::events::{AppendRequest, ExpectedVersion, NewEvent, append};
use eventplane_testkit::{TestDb, eventually};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use sqlx::PgPool;

const PARTITIONS: i32 = 3;

fn brokers() -> Option<String> {
    let brokers = std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty());
    if brokers.is_none() {
        println!("skipped: KAFKA_BROKERS is not set (tests/run.sh starts tansu and sets it)");
    }
    brokers
}

fn unique_topic(what: &str) -> String {
    format!("relay-{what}-{}", uuid::Uuid::new_v4().simple())
}

fn config(brokers: &str, topic: &str, holder: &str) -> RelayConfig {
    RelayConfig {
        brokers: brokers.to_string(),
        topic: topic.to_string(),
        name: topic.to_string(),
        holder: holder.to_string(),
        batch_size: 500,
        lease_ttl: Duration::from_millis(900),
        poll_interval: Duration::from_millis(50),
        delivery_timeout: Duration::from_millis(3000),
        create_partitions: PARTITIONS,
    }
}

async fn database() -> (TestDb, PgPool) {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.expect("migrate");
    (db, pool)
}

/// Appends `rounds` events to each of `streams` streams, one request per
/// stream and round, several streams per transaction.
async fn append_events(pool: &PgPool, prefix: &str, streams: usize, rounds: usize, from: usize) {
    for round in from..from + rounds {
        let requests: Vec<AppendRequest> = (0..streams)
            .map(|s| AppendRequest {
                stream_id: format!("{prefix}-{s}"),
                expected_version: ExpectedVersion::Named(NamedVersion::Any),
                events: vec![NewEvent::new("OrderNoted", &json!({"round": round}))],
                idempotency_key: None,
                traceparent: None,
            })
            .collect();
        let refs: Vec<&AppendRequest> = requests.iter().collect();
        append(pool, &refs).await.expect("append succeeds");
    }
}

#[derive(Debug, Clone)]
struct Received {
    key: String,
    position: i64,
    event_id: String,
    event_type: String,
    value: Value,
}

fn consumer(brokers: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    // assign(), not subscribe(): no group join to wait for.
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    consumer
}

fn header(message: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> String {
    let headers = message.headers().expect("headers");
    let header = headers
        .iter()
        .find(|h| h.key == name)
        .unwrap_or_else(|| panic!("header {name} missing"));
    String::from_utf8(header.value.expect("value").to_vec()).expect("utf-8")
}

/// Reads messages (in arrival order, duplicates kept) until `distinct`
/// positions have arrived or `timeout` passes.
async fn consume(consumer: &StreamConsumer, distinct: usize, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    while seen.len() < distinct && Instant::now() < deadline {
        let next = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await;
        let Ok(message) = next else { continue };
        let message = match message {
            Ok(message) => message,
            // The topic may not exist yet when the consumer starts.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let received = Received {
            key: String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8"),
            position: header(&message, HEADER_POSITION).parse().expect("number"),
            event_id: header(&message, HEADER_EVENT_ID),
            event_type: header(&message, HEADER_EVENT_TYPE),
            value: serde_json::from_slice(message.payload().expect("payload")).expect("json"),
        };
        seen.insert(received.position);
        out.push(received);
    }
    out
}

/// First arrival of each position, in arrival order: what a consumer that
/// drops duplicates keeps.
fn deduplicated(received: &[Received]) -> Vec<Received> {
    let mut seen = BTreeSet::new();
    received
        .iter()
        .filter(|r| seen.insert(r.position))
        .cloned()
        .collect()
}

async fn status_until(
    relay: &Relay,
    timeout: Duration,
    check: impl Fn(&RelayStatus) -> bool,
) -> bool {
    eventually(timeout, || async { check(&relay.status()) }).await
}

#[tokio::test]
async fn relay_publishes_every_event_keyed_by_stream_in_order_with_headers() {
    let Some(brokers) = brokers() else { return };
    let (_db, pool) = database().await;
    let topic = unique_topic("order");
    let (streams, rounds) = (8, 250);
    let total = streams * rounds;
    append_events(&pool, "order", streams, rounds, 0).await;

    let metrics = Metrics::new();
    let started = Instant::now();
    let relay = Relay::start(pool.clone(), config(&brokers, &topic, "a"), metrics.clone())
        .await
        .expect("relay starts");
    let consumer = consumer(&brokers, &topic);
    let received = consume(&consumer, total, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let events = deduplicated(&received);
    assert_eq!(events.len(), total, "every event arrives");
    println!(
        "relay: {total} events over {streams} streams published and consumed in {:.2} s ({:.0} events/s), {} duplicates",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        received.len() - events.len()
    );

    let mut per_stream: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for event in &events {
        per_stream.entry(event.key.clone()).or_default().push(event);
    }
    assert_eq!(per_stream.len(), streams);
    for (stream, list) in &per_stream {
        let versions: Vec<i64> = list
            .iter()
            .map(|e| e.value["streamVersion"].as_i64().expect("version"))
            .collect();
        let expected: Vec<i64> = (1..=rounds as i64).collect();
        assert_eq!(versions, expected, "{stream}: in stream order");
        for (event, version) in list.iter().zip(1..) {
            assert_eq!(event.value["streamId"], json!(stream));
            assert_eq!(event.value["position"], json!(event.position));
            assert_eq!(event.event_id, format!("{stream}@{version}"));
            assert_eq!(event.value["eventId"], json!(event.event_id));
            assert_eq!(event.event_type, "OrderNoted");
            assert_eq!(event.value["type"], json!("OrderNoted"));
            assert_eq!(event.value["data"]["round"], json!(version - 1));
        }
        assert!(
            list.windows(2).all(|w| w[0].position < w[1].position),
            "{stream}: positions ascend"
        );
    }
    assert!(
        status_until(&relay, Duration::from_secs(10), |s| s.lag_events == 0
            && s.lease_held)
        .await,
        "lag drops to zero: {:?}",
        relay.status()
    );
    let text = metrics.encode();
    assert!(text.contains("relay_published_total"), "{text}");
    assert!(text.contains("relay_lag_events 0"), "{text}");
    relay.stop().await;
}

#[tokio::test]
async fn a_second_relay_waits_for_the_lease_and_takes_over_when_the_first_dies() {
    let Some(brokers) = brokers() else { return };
    let (_db, pool) = database().await;
    let topic = unique_topic("lease");
    let first = Relay::start(
        pool.clone(),
        config(&brokers, &topic, "first"),
        Metrics::new(),
    )
    .await
    .expect("first relay");
    assert!(status_until(&first, Duration::from_secs(10), |s| s.lease_held).await);
    let second = Relay::start(
        pool.clone(),
        config(&brokers, &topic, "second"),
        Metrics::new(),
    )
    .await
    .expect("second relay");

    append_events(&pool, "lease", 4, 5, 0).await;
    let consumer = consumer(&brokers, &topic);
    assert_eq!(
        deduplicated(&consume(&consumer, 20, Duration::from_secs(30)).await).len(),
        20
    );
    let waiting = second.status();
    assert!(!waiting.lease_held, "{waiting:?}");
    assert_eq!(waiting.published, 0, "the second relay published nothing");
    assert!(first.status().published >= 20);

    // As a crash would: no release, the lease lapses after its TTL.
    first.abort();
    append_events(&pool, "lease", 4, 5, 5).await;
    let all = deduplicated(&consume(&consumer, 20, Duration::from_secs(30)).await);
    assert_eq!(all.len(), 20, "the second relay published the rest");
    let positions: BTreeSet<i64> = all.iter().map(|r| r.position).collect();
    assert_eq!(positions.len(), 20);
    assert!(
        status_until(&second, Duration::from_secs(10), |s| s.lease_held
            && s.published >= 20
            && s.lag_events == 0)
        .await,
        "{:?}",
        second.status()
    );
    second.stop().await;
}

#[tokio::test]
async fn with_the_broker_down_appends_succeed_the_lag_is_reported_and_the_relay_converges() {
    let Some(brokers) = brokers() else { return };
    let (_db, pool) = database().await;
    let topic = unique_topic("fault");
    // Nothing listens on port 1: every batch fails.
    let mut down = config("127.0.0.1:1", &topic, "relay");
    down.delivery_timeout = Duration::from_millis(500);
    let metrics = Metrics::new();
    let relay = Relay::start(pool.clone(), down, metrics.clone())
        .await
        .expect("relay starts without a broker");
    append_events(&pool, "fault", 4, 5, 0).await;
    assert!(
        status_until(&relay, Duration::from_secs(20), |s| !s.broker_ok
            && s.last_error.is_some()
            && s.lag_events == 20
            && s.lag_seconds > 0.0)
        .await,
        "lag reported while the broker is down: {:?}",
        relay.status()
    );
    assert!(metrics.encode().contains("relay_lag_events 20"));
    assert_eq!(relay.status().published, 0);
    relay.stop().await;

    // The broker is back (here: the relay is pointed at one that answers).
    let relay = Relay::start(
        pool.clone(),
        config(&brokers, &topic, "relay"),
        Metrics::new(),
    )
    .await
    .expect("relay restarts");
    let consumer = consumer(&brokers, &topic);
    let events = deduplicated(&consume(&consumer, 20, Duration::from_secs(30)).await);
    assert_eq!(
        events.len(),
        20,
        "every event arrives once the broker answers"
    );
    assert!(
        status_until(&relay, Duration::from_secs(10), |s| s.broker_ok
            && s.lag_events == 0)
        .await,
        "{:?}",
        relay.status()
    );
    relay.stop().await;
}
