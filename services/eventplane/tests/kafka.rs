//! Consumer-group projectors against a real Kafka-protocol broker (tansu,
//! started by tests/ensure-kafka.sh; KAFKA_BROKERS names it). Each test
//! declares two Kafka-fed projections and the same two fed from the
//! Postgres tail, drives events through the outbox relay, and requires the
//! Kafka-fed tables to equal the tail's once every partition is consumed
//! to its end: `accounts` (keyed by stream: updates guarded by `if`,
//! deletes, a jsonb log whose order shows per-stream order) and `owners`
//! (keyed across streams: counters, sums, minimum and maximum).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use eventplane::metrics::Metrics;
use eventplane::relay::{Relay, RelayConfig};
use eventplane_store::batch::replay_dead_letters;
use eventplane_store::catalog;
use eventplane_store::events::model::NamedVersion;
use eventplane_store::events::{AppendRequest, ExpectedVersion, NewEvent, append};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgPool;

const PARTITIONS: i32 = 3;
const STREAMS: usize = 24;
/// How long the group waits for a silent member.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

fn brokers() -> Option<String> {
    let brokers = std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty());
    if brokers.is_none() {
        println!("skipped: KAFKA_BROKERS is not set (tests/run.sh starts tansu and sets it)");
    }
    brokers
}

fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// The two projections, named and tabled with `suffix`, on `transport`.
fn specs(suffix: &str, transport: &str) -> String {
    format!(
        r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {{name: accounts-{suffix}}}
spec:
  table: accounts_{suffix}
  key: id
  {transport}
  columns:
    - {{name: id, type: text}}
    - {{name: status, type: text}}
    - {{name: balance, type: bigint}}
    - {{name: last_version, type: bigint}}
    - {{name: moves, type: jsonb}}
  handlers:
    - eventType: Opened
      op: upsert
      key: /streamId
      set:
        - {{column: status, value: OPEN}}
        - {{column: balance, value: "0"}}
        - {{column: last_version, from: /streamVersion}}
        - {{column: moves, value: "[]"}}
    - eventType: Moved
      op: update
      key: /streamId
      if: "status = 'OPEN'"
      set:
        - {{column: balance, op: add, from: /data/amount}}
        - {{column: last_version, from: /streamVersion}}
        - {{column: moves, op: append, from: /data/amount}}
    - eventType: Frozen
      op: update
      key: /streamId
      set:
        - {{column: status, value: FROZEN}}
        - {{column: last_version, from: /streamVersion}}
    - eventType: Closed
      op: delete
      key: /streamId
---
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {{name: owners-{suffix}}}
spec:
  table: owners_{suffix}
  key: owner
  {transport}
  columns:
    - {{name: owner, type: text}}
    - {{name: opened, type: bigint}}
    - {{name: moved, type: bigint}}
    - {{name: lo, type: bigint}}
    - {{name: hi, type: bigint}}
  handlers:
    - eventType: Opened
      op: upsert
      key: /data/owner
      set:
        - {{column: opened, op: add}}
    - eventType: Moved
      op: upsert
      key: /data/owner
      set:
        - {{column: moved, op: add, from: /data/amount}}
        - {{column: lo, op: min, from: /data/amount}}
        - {{column: hi, op: max, from: /data/amount}}
    - eventType: Tipped
      op: upsert
      key: /data/owner
      set:
        - {{column: moved, op: add, from: /data/amount}}
"#
    )
}

const KAFKA_FED: [&str; 2] = ["accounts-k", "owners-k"];

struct Setup {
    db: TestDb,
    pool: PgPool,
    brokers: String,
    topic: String,
    /// Consumer groups of this test: `<group_prefix>.<projection>`.
    group_prefix: String,
    /// Where each stream's next event is generated from.
    versions: Vec<i64>,
    rng: Lcg,
}

async fn setup(brokers: String) -> Setup {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.expect("migrate");
    let topic = unique("kafka-projector");
    let kafka = format!("transport: {{kind: kafka, topic: {topic}}}");
    let manifests = [specs("k", &kafka), specs("pg", "")].join("---\n");
    for manifest in eventplane_api::load_manifests(&manifests).expect("specs are valid") {
        catalog::apply(&pool, &manifest.metadata.name, &manifest.spec, "test")
            .await
            .expect("declared");
    }
    let setup = Setup {
        db,
        pool,
        brokers,
        topic,
        group_prefix: unique("group"),
        versions: vec![0; STREAMS],
        rng: Lcg(7),
    };
    create_topic(&setup).await;
    setup
}

fn relay_config(setup: &Setup) -> RelayConfig {
    RelayConfig {
        brokers: setup.brokers.clone(),
        topic: setup.topic.clone(),
        name: setup.topic.clone(),
        holder: unique("relay"),
        batch_size: 200,
        lease_ttl: Duration::from_millis(900),
        poll_interval: Duration::from_millis(50),
        delivery_timeout: Duration::from_millis(3000),
        create_partitions: PARTITIONS,
    }
}

/// A projector process of the real binary consuming the Kafka-fed
/// projections (and tailing the others), with its admin port.
struct Projector {
    child: Child,
    admin: u16,
}

impl Projector {
    fn spawn(setup: &Setup, batch_size: u32) -> Projector {
        let admin = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_eventplane"))
            .args(["projector", "--source", "kafka", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--catalog-resync-ms", "100", "--lease-ttl-ms", "1000"])
            .args(["--batch-size", &batch_size.to_string()])
            .args(["--brokers", &setup.brokers])
            .args(["--group-prefix", &setup.group_prefix])
            .args([
                "--session-timeout-ms",
                &SESSION_TIMEOUT.as_millis().to_string(),
            ])
            .env("DATABASE_URL", &setup.db.url)
            .env_remove("REDIS_URL")
            .env_remove("EVENTPLANE_PROJECTIONS")
            // A failing test's output then shows the rebalances, the
            // partitions read again, and why batches were retried or seeks
            // not made.
            .env("RUST_LOG", "warn,eventplane::projector::kafka=info")
            .stdout(Stdio::null())
            .spawn()
            .expect("projector starts");
        Projector { child, admin }
    }

    /// `kill -9`: whatever batch it was in rolls back.
    fn kill(mut self) {
        self.child.kill().expect("killed");
        self.child.wait().expect("reaped");
    }

    /// Partitions of `projection` this process consumes, from its metrics.
    async fn partitions(&self, projection: &str) -> Option<i64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let series = format!("kafka_partitions_assigned{{projection=\"{projection}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Setup {
    /// `rounds` rounds of one event on each of a random half of the
    /// streams, several streams per transaction: each stream opens, moves
    /// money, may freeze, close and open again.
    async fn append(&mut self, rounds: usize) -> usize {
        let mut appended = 0;
        for _ in 0..rounds {
            let mut requests = Vec::new();
            for stream in 0..STREAMS {
                if self.rng.next(2) == 0 {
                    continue;
                }
                let version = self.versions[stream];
                let owner = format!("owner-{}", stream % 5);
                let (event_type, data) = match (version, self.rng.next(10)) {
                    (0, _) | (_, 0) => ("Opened", json!({"owner": owner})),
                    (_, 1) => ("Frozen", json!({})),
                    (_, 2) => ("Closed", json!({})),
                    _ => (
                        "Moved",
                        json!({"owner": owner, "amount": self.rng.next(101) as i64 - 50}),
                    ),
                };
                self.versions[stream] += 1;
                requests.push(AppendRequest {
                    stream_id: format!("acct-{stream}"),
                    expected_version: ExpectedVersion::Named(NamedVersion::Any),
                    events: vec![NewEvent::new(event_type, &data)],
                    idempotency_key: None,
                    traceparent: None,
                });
            }
            let refs: Vec<&AppendRequest> = requests.iter().collect();
            append(&self.pool, &refs).await.expect("append succeeds");
            appended += requests.len();
        }
        appended
    }

    /// Whether `projection` has applied every event of its types once
    /// (its status counts what the partitions applied: an event applied
    /// twice would make up for one missing, and the tables then differ).
    async fn applied_all(&self, projection: &str) -> bool {
        let snapshot = catalog::load(&self.pool).await.expect("catalog");
        let entry = snapshot.get(projection).expect("declared");
        let live = eventplane_store::Projection::live(projection.into(), entry.desired.clone());
        let status = eventplane_store::status::status(&self.pool, &live)
            .await
            .expect("status");
        status.is_some_and(|s| s.lag_events == 0)
    }

    /// Waits until the relay published every event, both Kafka-fed
    /// projections applied as many events as the log holds of their types
    /// and the tail caught up; then the tables must be equal (nothing more
    /// will be applied, so a missing or doubled event shows). Panics with
    /// the differences.
    async fn assert_converged(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let relayed = caught_up_relay(&self.pool, &self.topic).await;
            let tail = caught_up(&self.pool, "accounts-pg").await
                && caught_up(&self.pool, "owners-pg").await;
            let consumed =
                self.applied_all(KAFKA_FED[0]).await && self.applied_all(KAFKA_FED[1]).await;
            if relayed && tail && consumed {
                break;
            }
            if Instant::now() > deadline {
                let mut state = String::new();
                for (projection, table) in KAFKA_FED.iter().zip(["accounts", "owners"]) {
                    let offsets =
                        eventplane_store::kafka_offsets::list(&self.pool, projection).await;
                    let missing = self
                        .rows(&format!(
                            "(SELECT * FROM {table}_pg EXCEPT SELECT * FROM {table}_k)"
                        ))
                        .await;
                    let extra = self
                        .rows(&format!(
                            "(SELECT * FROM {table}_k EXCEPT SELECT * FROM {table}_pg)"
                        ))
                        .await;
                    state += &format!(
                        "\n{projection}: applied all {}, offsets {offsets:?}; tail only {missing}; kafka only {extra}",
                        self.applied_all(projection).await
                    );
                }
                panic!(
                    "{what}: not converged in 90 s (relayed {relayed}, tail {tail}, consumed {consumed}){state}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for table in ["accounts", "owners"] {
            let diff = differences(&self.pool, &format!("{table}_k"), &format!("{table}_pg")).await;
            if diff != 0 {
                panic!(
                    "{what}: {table} fed from Kafka differs from the tail's in {diff} rows:\n kafka {}\n tail  {}",
                    self.rows(&format!("{table}_k")).await,
                    self.rows(&format!("{table}_pg")).await
                );
            }
        }
        let rows = count(&self.pool, "SELECT count(*) FROM accounts_pg").await;
        assert!(rows > 0, "{what}: the reference table is empty");
    }

    /// A table's rows as JSON, for a failure message.
    async fn rows(&self, table: &str) -> String {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COALESCE(jsonb_agg(to_jsonb(t) ORDER BY t)::text, '[]') FROM {table} t"
        )))
        .fetch_one(&self.pool)
        .await
        .expect("rows")
    }

    async fn duplicates(&self) -> i64 {
        sqlx::query_scalar("SELECT COALESCE(sum(duplicates), 0)::bigint FROM kafka_offsets")
            .fetch_one(&self.pool)
            .await
            .expect("duplicates")
    }
}

/// Whether the relay of `topic` has published everything in the log.
async fn caught_up_relay(pool: &PgPool, relay: &str) -> bool {
    let done: Option<bool> = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM events e WHERE (e.tx_id, e.position) > (r.tx_id, r.position)) \
         FROM relays r WHERE relay = $1",
    )
    .bind(relay)
    .fetch_optional(pool)
    .await
    .expect("relay query");
    done == Some(true)
}

#[tokio::test]
async fn one_two_and_three_replicas_share_the_partitions_and_equal_the_tail() {
    let Some(brokers) = brokers() else { return };
    let mut setup = setup(brokers).await;
    let relay = Relay::start(setup.pool.clone(), relay_config(&setup), Metrics::new())
        .await
        .expect("relay starts");
    let mut replicas = vec![Projector::spawn(&setup, 50)];
    for n in 1..=3 {
        let appended = setup.append(60).await;
        setup
            .assert_converged(&format!("{n} replica(s), {appended} more events"))
            .await;
        if n == 3 {
            break;
        }
        replicas.push(Projector::spawn(&setup, 50));
    }
    // Three replicas, three partitions: one each, for both projections.
    for projection in KAFKA_FED {
        let shared = eventually(Duration::from_secs(30), || async {
            let mut held = Vec::new();
            for replica in &replicas {
                held.push(replica.partitions(projection).await);
            }
            held == [Some(1), Some(1), Some(1)]
        })
        .await;
        assert!(shared, "{projection}: each replica holds one partition");
    }
    // The status reports where each partition stands.
    let status = eventplane_store::status::status(
        &setup.pool,
        &eventplane_store::Projection::live("owners-k".into(), {
            let yaml = specs(
                "k",
                &format!("transport: {{kind: kafka, topic: {}}}", setup.topic),
            );
            eventplane_api::load_manifests(&yaml)
                .unwrap()
                .remove(1)
                .spec
        }),
    )
    .await
    .expect("status")
    .expect("exists");
    assert_eq!(status.partitions.len(), PARTITIONS as usize);
    assert_eq!(status.lag_events, 0);
    let events = count(
        &setup.pool,
        "SELECT count(*) FROM events WHERE event_type IN ('Opened', 'Moved', 'Tipped')",
    )
    .await;
    assert_eq!(status.events_applied, events, "every event counts once");
    relay.stop().await;
}

#[tokio::test]
async fn a_replica_killed_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let Some(brokers) = brokers() else { return };
    let mut setup = setup(brokers).await;
    let relay = Relay::start(setup.pool.clone(), relay_config(&setup), Metrics::new())
        .await
        .expect("relay starts");
    // Small batches, so a kill lands inside one.
    let first = Projector::spawn(&setup, 5);
    let second = Projector::spawn(&setup, 5);
    setup.append(40).await;
    // Both have applied something: kill one while events keep coming, and
    // start a third, so the group rebalances twice.
    let started = eventually(Duration::from_secs(30), || async {
        count(&setup.pool, "SELECT count(*) FROM accounts_k").await > 0
    })
    .await;
    assert!(started, "the Kafka-fed projection starts");
    first.kill();
    setup.append(40).await;
    // The third joins once the group has dropped the dead member. A member
    // joining makes the group form again; tansu 0.6, when it finds a dead
    // member on a heartbeat instead, keeps the group as it was and leaves
    // the dead member's partitions with no one.
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
    let third = Projector::spawn(&setup, 5);
    setup.append(40).await;
    setup.assert_converged("after kill -9 and rebalance").await;
    drop((second, third));
    relay.stop().await;
}

/// A relay process of the real binary.
fn spawn_relay(setup: &Setup) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args([
            "relay",
            "--brokers",
            &setup.brokers,
            "--topic",
            &setup.topic,
        ])
        .args(["--batch-size", "20", "--lease-ttl-ms", "500"])
        .args(["--topic-partitions", &PARTITIONS.to_string()])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .env("DATABASE_URL", &setup.db.url)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("relay starts")
}

#[tokio::test]
async fn events_the_relay_publishes_again_are_dropped() {
    let Some(brokers) = brokers() else { return };
    let mut setup = setup(brokers).await;
    let _projector = Projector::spawn(&setup, 50);
    // kill -9 the relay while it publishes: a batch the broker
    // acknowledged but the checkpoint did not record goes out again.
    let mut relay = spawn_relay(&setup);
    setup.append(50).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill().expect("killed");
    relay.wait().expect("reaped");
    let mut relay = spawn_relay(&setup);
    setup.append(50).await;
    setup.assert_converged("after the relay was killed").await;

    // Rewound to the start of the log, the relay publishes everything
    // again: every copy is dropped.
    let before = setup.duplicates().await;
    relay.kill().expect("killed");
    relay.wait().expect("reaped");
    sqlx::query("UPDATE relays SET tx_id = '0', position = 0, holder = NULL WHERE relay = $1")
        .bind(&setup.topic)
        .execute(&setup.pool)
        .await
        .expect("rewound");
    let mut relay = spawn_relay(&setup);
    setup
        .assert_converged("after the relay published everything again")
        .await;
    let events = count(&setup.pool, "SELECT count(*) FROM events").await;
    let dropped = eventually(Duration::from_secs(30), || async {
        setup.duplicates().await - before >= events * KAFKA_FED.len() as i64
    })
    .await;
    assert!(
        dropped,
        "both projections dropped every event published again"
    );
    relay.kill().expect("killed");
    relay.wait().expect("reaped");
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_replayed_from_the_log() {
    let Some(brokers) = brokers() else { return };
    let mut setup = setup(brokers).await;
    let _projector = Projector::spawn(&setup, 50);
    // A tip, which only `owners` applies, reaches the topic first as a
    // message whose value does not decode but whose headers name it, with
    // its stream as key (so it lands in the stream's partition).
    let tip = AppendRequest {
        stream_id: "tips-1".into(),
        expected_version: ExpectedVersion::Named(NamedVersion::Any),
        events: vec![NewEvent::new(
            "Tipped",
            &json!({"owner": "owner-1", "amount": 7}),
        )],
        idempotency_key: None,
        traceparent: None,
    };
    append(&setup.pool, &[&tip]).await.expect("tip appended");
    setup.append(10).await;
    let (tx_id, position): (i64, i64) = sqlx::query_as(
        "SELECT tx_id::text::bigint, position FROM events WHERE stream_id = 'tips-1'",
    )
    .fetch_one(&setup.pool)
    .await
    .expect("the tip");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &setup.brokers)
        .create()
        .expect("producer");
    let (tx_text, position_text) = (tx_id.to_string(), position.to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: eventplane::relay::HEADER_POSITION,
            value: Some(position_text.as_str()),
        })
        .insert(Header {
            key: eventplane::relay::HEADER_TX_ID,
            value: Some(tx_text.as_str()),
        })
        .insert(Header {
            key: eventplane::relay::HEADER_EVENT_TYPE,
            value: Some("Tipped"),
        });
    producer
        .send(
            FutureRecord::to(&setup.topic)
                .key("tips-1")
                .payload("{not json")
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .expect("poison sent");
    // And one that names nothing at all: skipped, its offset passed.
    producer
        .send(
            FutureRecord::<str, str>::to(&setup.topic).payload("garbage"),
            Duration::from_secs(5),
        )
        .await
        .expect("garbage sent");
    // The relay's copy of the tip comes later in the partition and is
    // dropped as published before.
    let relay = Relay::start(setup.pool.clone(), relay_config(&setup), Metrics::new())
        .await
        .expect("relay starts");
    let lettered = eventually(Duration::from_secs(60), || async {
        count(&setup.pool, "SELECT count(*) FROM projection_dead_letters").await == 1
    })
    .await;
    assert!(
        lettered,
        "the poison message is a dead letter of owners-k alone"
    );
    let (projection, reason): (String, String) =
        sqlx::query_as("SELECT projection, reason FROM projection_dead_letters")
            .fetch_one(&setup.pool)
            .await
            .expect("the letter");
    assert_eq!(projection, "owners-k");
    assert!(reason.contains("undecodable Kafka message"), "{reason}");
    let replayed = replay_dead_letters(&setup.pool, "owners-k", 10)
        .await
        .expect("replayed");
    assert_eq!(
        replayed.applied, 1,
        "the tip is applied as the log holds it"
    );
    setup.assert_converged("after the replay").await;
    relay.stop().await;
}

/// The topic with its partitions, before anything is published to it.
async fn create_topic(setup: &Setup) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &setup.brokers)
        .create()
        .expect("admin client");
    let topic = NewTopic::new(&setup.topic, PARTITIONS, TopicReplication::Fixed(1));
    admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("topic created");
}

/// A broker of the test's own on a free port, so that stopping it disturbs
/// no other test.
struct Broker {
    child: Child,
    url: String,
}

impl Broker {
    fn start() -> Broker {
        let port = free_port();
        let url = format!("127.0.0.1:{port}");
        let child = Command::new("tansu")
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &format!("tcp://{url}")])
            .args(["--advertised-listener-url", &format!("tcp://{url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is on PATH (tests/ensure-kafka.sh installs it)");
        Broker { child, url }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_stopped_broker_only_delays_the_projection() {
    if brokers().is_none() {
        return;
    }
    let broker = Broker::start();
    let listening = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&broker.url).await.is_ok()
    })
    .await;
    assert!(listening, "the test's broker listens");
    let mut setup = setup(broker.url.clone()).await;
    let relay = Relay::start(setup.pool.clone(), relay_config(&setup), Metrics::new())
        .await
        .expect("relay starts");
    let _projector = Projector::spawn(&setup, 50);
    setup.append(20).await;
    setup.assert_converged("before the outage").await;

    // SIGSTOP: the broker holds its connections and answers nothing.
    broker.signal("-STOP");
    let appended = setup.append(20).await;
    assert!(appended > 0, "commands succeed while the broker is down");
    let lagging = eventually(Duration::from_secs(30), || async {
        let status = relay.status();
        !status.broker_ok && status.lag_events > 0
    })
    .await;
    assert!(lagging, "the relay reports the broker down and its lag");
    let events = count(&setup.pool, "SELECT count(*) FROM events").await;
    assert!(count(&setup.pool, "SELECT count(*) FROM owners_pg").await > 0);
    broker.signal("-CONT");
    setup.assert_converged("after the broker came back").await;
    assert_eq!(
        count(&setup.pool, "SELECT count(*) FROM events").await,
        events
    );
    relay.stop().await;
}
