//! Shared set-up for the integration tests: a fresh database per test on
//! the real Postgres (DATABASE_URL), the real Redis (REDIS_URL), and an
//! in-process stack on an ephemeral port.

#![allow(dead_code)]

use std::time::Duration;

use eventplane::server::{Stack, StackConfig};
use eventplane_api::ProjectionManifest;
use serde_json::Value;
use sqlx::PgPool;

#[allow(unused_imports)]
pub use eventplane_testkit::{TestDb, admin_url, eventually, redis_url};

pub fn orders() -> Vec<ProjectionManifest> {
    eventplane::dev::sample_projections()
}

/// A local stack with catalog and lease timings short enough for tests
/// that stop and start processes: a crashed projector's projections move
/// on within a third of a second.
pub fn local(
    database_url: &str,
    redis: Option<&str>,
    declare: Vec<ProjectionManifest>,
) -> StackConfig {
    let mut config = StackConfig::local(database_url, redis, declare);
    config.projector.lease_ttl = Duration::from_millis(300);
    config.catalog_resync = Duration::from_millis(100);
    config
}

pub async fn stack(db: &TestDb) -> Stack {
    Stack::start(local(&db.url, Some(&redis_url()), orders()))
        .await
        .expect("stack starts")
}

pub async fn stack_with(config: StackConfig) -> Stack {
    Stack::start(config).await.expect("stack starts")
}

/// A loopback port free at the time of asking, for a child process to
/// listen on. It is drawn below the kernel's ephemeral range (32768 and
/// up on Linux): a port from there could be taken meanwhile by any
/// connection a test opens, and the child would fail to listen.
pub fn free_port() -> u16 {
    free_port_in(20_000..EPHEMERAL_START)
}

/// Where Linux starts handing out ports for outgoing connections.
pub const EPHEMERAL_START: u16 = 32_768;

/// A loopback port in `range` free at the time of asking.
pub fn free_port_in(range: std::ops::Range<u16>) -> u16 {
    let span = u128::from(range.end - range.start);
    loop {
        let port = range.start + (uuid::Uuid::new_v4().as_u128() % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub fn placed(order: &str, customer: &str, total: &str) -> Value {
    serde_json::json!({"type": "OrderPlaced", "data": {"orderId": order, "customerId": customer, "total": total}})
}

pub async fn append(
    http: &reqwest::Client,
    stack: &Stack,
    stream: &str,
    expected: Value,
    events: Vec<Value>,
) -> (u16, Value) {
    let body = serde_json::json!({"expectedVersion": expected, "events": events});
    let response = http
        .post(stack.url(&format!("/v1/streams/{stream}/events")))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn get(
    http: &reqwest::Client,
    stack: &Stack,
    path: &str,
) -> (u16, Value, Option<String>) {
    let response = http
        .get(stack.url(path))
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let layer = response
        .headers()
        .get("eventplane-cache")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, response.json().await.unwrap_or(Value::Null), layer)
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count query")
}

/// Whether the checkpoint row `checkpoint` has passed every event in the log.
pub async fn caught_up(pool: &PgPool, checkpoint: &str) -> bool {
    let done: Option<bool> = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM events e WHERE (e.tx_id, e.position) > (c.tx_id, c.position)) \
         FROM projection_checkpoints c WHERE projection = $1",
    )
    .bind(checkpoint)
    .fetch_optional(pool)
    .await
    .expect("checkpoint query");
    done == Some(true)
}

/// Rows in one relation and not the other, both ways (duplicates count).
pub async fn differences(pool: &PgPool, a: &str, b: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) \
         UNION ALL (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d"
    )))
    .fetch_one(pool)
    .await
    .expect("difference query")
}

/// A tiny deterministic generator: a test's workload is the same on every
/// run.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    /// `v` three times in four.
    pub fn maybe<T>(&mut self, v: T) -> Option<T> {
        (self.next(4) != 0).then_some(v)
    }
}

/// A projector process of the real binary following the catalog of `db`,
/// with small batches so that a kill lands inside them, and a short lease
/// so that another process takes its projections over soon.
pub fn spawn_projector(db: &TestDb, batch_size: u32, lease_ttl_ms: u64) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args([
            "projector",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--catalog-resync-ms",
            "100",
        ])
        .arg("--batch-size")
        .arg(batch_size.to_string())
        .arg("--lease-ttl-ms")
        .arg(lease_ttl_ms.to_string())
        .env("DATABASE_URL", &db.url)
        .env_remove("REDIS_URL")
        .env_remove("EVENTPLANE_PROJECTIONS")
        .env("RUST_LOG", "error")
        .spawn()
        .expect("projector starts")
}
