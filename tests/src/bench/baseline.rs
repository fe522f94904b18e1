//! The pgbench-style reference the command path is held against: one
//! single-row `INSERT` per transaction, straight to Postgres.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

use super::load::{self, Phase};

/// Shaped like the event log (stream, version, type, payload) with the
/// per-stream uniqueness an append must also enforce.
const TABLE_DDL: &str = "CREATE TABLE bench_baseline (
    stream_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (stream_id, version)
)";

pub async fn run(
    database_url: &str,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let pool = PgPoolOptions::new()
        .max_connections(clients as u32)
        .min_connections(clients as u32)
        .acquire_timeout(Duration::from_secs(30))
        .connect(database_url)
        .await?;
    sqlx::query(TABLE_DDL).execute(&pool).await?;
    let next = Arc::new(AtomicU64::new(0));
    let op = {
        let pool = pool.clone();
        move || {
            let (pool, next) = (pool.clone(), next.clone());
            async move {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let data = serde_json::json!({
                    "orderId": format!("b-{n}"),
                    "customerId": format!("c-{}", n % 1000),
                    "total": format!("{}.{:02}", 10 + n % 90, n % 100),
                });
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_baseline (stream_id, version, type, data) VALUES ($1, 1, 'OrderPlaced', $2)")
                    .bind(format!("order-b-{n}"))
                    .bind(data)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok("")
            }
        }
    };
    load::closed_loop(clients, warmup, op.clone()).await;
    let phase = load::closed_loop(clients, duration, op).await;
    // Give the connections back before the next phase: the server's
    // max_connections is shared with the stack under test.
    pool.close().await;
    Ok(phase)
}
