//! Where each Kafka-fed projection stands in each partition of its topic
//! (`kafka_offsets`). Every statement on that table is here.
//!
//! A partition's row is locked by the batch that applies its messages and
//! advanced in the same transaction as the rows, so two consumers that
//! both hold a partition for a moment (during a rebalance) apply each
//! message once between them, in offset order.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::checkpoints::Checkpoint;

/// One partition's row.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct PartitionOffset {
    pub partition: i32,
    /// The first offset not applied yet.
    pub next_offset: i64,
    pub tx_id: i64,
    pub position: i64,
    /// Events applied or dead-lettered from this partition since the live
    /// checkpoint last moved (a swap).
    pub applied: i64,
    /// Messages skipped because the relay had published them before.
    pub duplicates: i64,
    pub last_event_at: Option<DateTime<Utc>>,
}

impl PartitionOffset {
    /// The coordinate of the last event applied from this partition.
    pub fn at(&self) -> Checkpoint {
        Checkpoint {
            tx_id: self.tx_id,
            position: self.position,
        }
    }
}

const ROW: &str = "partition, next_offset, tx_id::text::bigint AS tx_id, position, applied, duplicates, last_event_at";

/// Locks the rows of `partitions` (created at offset 0 when missing), in
/// partition order so that two batches never wait on each other in a
/// cycle.
pub async fn lock(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    partitions: &[i32],
) -> sqlx::Result<BTreeMap<i32, PartitionOffset>> {
    sqlx::query(
        "INSERT INTO kafka_offsets (projection, topic, partition) \
         SELECT $1, $2, p FROM unnest($3::int[]) AS p ORDER BY p ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<PartitionOffset> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW} FROM kafka_offsets WHERE projection = $1 AND topic = $2 AND partition = ANY($3) \
         ORDER BY partition FOR UPDATE"
    )))
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.partition, r)).collect())
}

/// How one batch moves one partition's row.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub partition: i32,
    pub next_offset: i64,
    pub at: Checkpoint,
    pub applied: i64,
    pub duplicates: i64,
    pub last_event_at: Option<DateTime<Utc>>,
}

/// Advances locked rows, in the batch's transaction.
pub async fn advance(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    steps: &[Step],
) -> sqlx::Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = steps.iter().map(|s| s.partition).collect();
    let offsets: Vec<i64> = steps.iter().map(|s| s.next_offset).collect();
    let tx_ids: Vec<String> = steps.iter().map(|s| s.at.tx_id.to_string()).collect();
    let positions: Vec<i64> = steps.iter().map(|s| s.at.position).collect();
    let applied: Vec<i64> = steps.iter().map(|s| s.applied).collect();
    let duplicates: Vec<i64> = steps.iter().map(|s| s.duplicates).collect();
    let last: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.last_event_at).collect();
    sqlx::query(
        "UPDATE kafka_offsets k SET next_offset = u.o, tx_id = u.t::xid8, position = u.p, \
             applied = k.applied + u.a, duplicates = k.duplicates + u.d, \
             last_event_at = COALESCE(u.l, k.last_event_at), updated_at = now() \
         FROM unnest($3::int[], $4::bigint[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::timestamptz[]) \
             AS u(partition, o, t, p, a, d, l) \
         WHERE k.projection = $1 AND k.topic = $2 AND k.partition = u.partition",
    )
    .bind(projection)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&tx_ids)
    .bind(&positions)
    .bind(&applied)
    .bind(&duplicates)
    .bind(&last)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every partition row of `projection`, for status and lag.
pub async fn list(
    conn: impl PgExecutor<'_>,
    projection: &str,
) -> sqlx::Result<Vec<PartitionOffset>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW} FROM kafka_offsets WHERE projection = $1 ORDER BY partition"
    )))
    .bind(projection)
    .fetch_all(conn)
    .await
}

/// Counts from zero again: a swap put the live checkpoint where the new
/// version stands, and `applied` counts the events applied since.
pub async fn restart_counts(conn: &mut PgConnection, projection: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE kafka_offsets SET applied = 0 WHERE projection = $1")
        .bind(projection)
        .execute(conn)
        .await?;
    Ok(())
}

/// Forgets where `projection` stands in Kafka, with its tables.
pub async fn delete_projection(conn: &mut PgConnection, projection: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM kafka_offsets WHERE projection = $1")
        .bind(projection)
        .execute(conn)
        .await?;
    Ok(())
}
