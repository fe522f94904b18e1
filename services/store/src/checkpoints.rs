//! Checkpoints and dead letters (`projection_checkpoints`,
//! `projection_dead_letters`): where each projection version stands in the
//! log, and the events it could not map. Every statement on these two
//! tables is here.
//!
//! The live version of a projection uses the projection's name as its
//! checkpoint; a version being built, or retained for swapping back, uses
//! [`version_checkpoint`].

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::token::Token;

/// Everything at or before `(tx_id, position)` has been applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Checkpoint {
    pub tx_id: i64,
    pub position: i64,
}

impl Checkpoint {
    /// Where the read after a batch read from `self` starts: after its
    /// `last` event, or, when the read saw everything below `horizon` (a
    /// short batch), at the horizon, so the next read skips what other
    /// readers' events left behind.
    pub fn after_batch(self, last: Option<Checkpoint>, horizon: i64, saw_all: bool) -> Checkpoint {
        let last = last.unwrap_or(self);
        if saw_all {
            Checkpoint {
                tx_id: horizon,
                position: 0,
            }
            .max(last)
        } else {
            last
        }
    }
}

/// The checkpoint of a version other than the live one: `<name>@v<version>`.
pub fn version_checkpoint(name: &str, version: u32) -> String {
    format!("{name}@v{version}")
}

/// One checkpoint row.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct CheckpointRow {
    pub tx_id: i64,
    pub position: i64,
    /// Events applied or dead-lettered so far.
    pub applied: i64,
    pub last_event_at: Option<DateTime<Utc>>,
    /// Set when the projection stopped on an event it cannot map.
    pub halted_reason: Option<String>,
}

impl CheckpointRow {
    pub fn at(&self) -> Checkpoint {
        Checkpoint {
            tx_id: self.tx_id,
            position: self.position,
        }
    }
}

const ROW: &str = "tx_id::text::bigint AS tx_id, position, applied, last_event_at, halted_reason";

/// Creates the checkpoint at the start of the log, unless it exists.
pub async fn create(conn: impl PgExecutor<'_>, name: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Puts the checkpoint (created if missing) back at the start of the log.
pub async fn reset(conn: impl PgExecutor<'_>, name: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) \
         ON CONFLICT (projection) DO UPDATE SET tx_id = '0', position = 0, applied = 0, halted_reason = NULL",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(conn: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Option<CheckpointRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW} FROM projection_checkpoints WHERE projection = $1"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Reads the checkpoint and locks it until the caller's transaction ends:
/// whoever holds it is the only writer of this version's rows.
pub async fn lock(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<CheckpointRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW} FROM projection_checkpoints WHERE projection = $1 FOR UPDATE"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Reads the checkpoint and holds it against [`lock`] until the caller's
/// transaction ends. Kafka-fed batches take it this way: they run side by
/// side, one per partition set, while a swap, which takes it exclusively,
/// waits for them and they for it.
pub async fn lock_shared(
    conn: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Option<CheckpointRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW} FROM projection_checkpoints WHERE projection = $1 FOR SHARE"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// What one batch moves a checkpoint by.
#[derive(Clone, Debug, PartialEq)]
pub struct Advance<'a> {
    pub to: Checkpoint,
    /// Record time of the last event applied, if the batch applied any.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Events applied or dead-lettered by the batch.
    pub applied: i64,
    pub halted_reason: Option<&'a str>,
}

/// Moves a locked checkpoint after a batch, in the batch's transaction.
pub async fn advance(conn: &mut PgConnection, name: &str, step: &Advance<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_checkpoints SET tx_id = $2::text::xid8, position = $3, \
             last_event_at = COALESCE($4, last_event_at), applied = applied + $5, halted_reason = $6, updated_at = now() \
         WHERE projection = $1",
    )
    .bind(name)
    .bind(step.to.tx_id.to_string())
    .bind(step.to.position)
    .bind(step.last_event_at)
    .bind(step.applied)
    .bind(step.halted_reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets the checkpoint (created if missing) to `row`'s position and count,
/// clearing any halt: a version retired by a swap keeps the live position,
/// so it can be caught up and swapped back later.
pub async fn set(conn: &mut PgConnection, name: &str, row: &CheckpointRow) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, tx_id, position, applied) \
         VALUES ($1, $2::text::xid8, $3, $4) \
         ON CONFLICT (projection) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, \
             applied = EXCLUDED.applied, halted_reason = NULL, updated_at = now()",
    )
    .bind(name)
    .bind(row.tx_id.to_string())
    .bind(row.position)
    .bind(row.applied)
    .execute(conn)
    .await?;
    Ok(())
}

/// `to` takes `from`'s position, count and last event time (a swap hands
/// the live checkpoint the new version's progress).
pub async fn copy(conn: &mut PgConnection, from: &str, to: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_checkpoints AS t SET tx_id = f.tx_id, position = f.position, applied = f.applied, \
             last_event_at = f.last_event_at, halted_reason = NULL, updated_at = now() \
         FROM projection_checkpoints AS f WHERE t.projection = $2 AND f.projection = $1",
    )
    .bind(from)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether the checkpoint has reached `token`; `None` without a checkpoint.
pub async fn passed(
    conn: impl PgExecutor<'_>,
    name: &str,
    token: Token,
) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar(
        "SELECT (tx_id, position) >= ($2::text::xid8, $3) FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(name)
    .bind(token.tx_id.to_string())
    .bind(token.position)
    .fetch_optional(conn)
    .await
}

/// Removes one checkpoint.
pub async fn delete(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// Removes the checkpoints and dead letters of every version of projection
/// `name`.
pub async fn delete_projection(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    let every_version = "projection = $1 OR projection LIKE $1 || '@v%'";
    for table in ["projection_checkpoints", "projection_dead_letters"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE {every_version}"
        )))
        .bind(name)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// An event that could not be mapped, with the reason.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub position: i64,
    pub tx_id: i64,
    pub stream_id: String,
    pub event_type: String,
    pub reason: String,
}

pub async fn record_dead_letters(
    conn: &mut PgConnection,
    name: &str,
    dead: &[DeadLetter],
) -> sqlx::Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let positions: Vec<i64> = dead.iter().map(|d| d.position).collect();
    let tx_ids: Vec<String> = dead.iter().map(|d| d.tx_id.to_string()).collect();
    let streams: Vec<&str> = dead.iter().map(|d| d.stream_id.as_str()).collect();
    let types: Vec<&str> = dead.iter().map(|d| d.event_type.as_str()).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, position, tx_id, stream_id, event_type, reason) \
         SELECT $1, p, t::xid8, s, e, r FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[]) AS u(p, t, s, e, r)",
    )
    .bind(name)
    .bind(&positions)
    .bind(&tx_ids)
    .bind(&streams)
    .bind(&types)
    .bind(&reasons)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn dead_letter_count(conn: impl PgExecutor<'_>, name: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters WHERE projection = $1")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Dead letters follow their version when its checkpoint changes name in
/// a swap.
pub async fn move_dead_letters(conn: &mut PgConnection, from: &str, to: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE projection_dead_letters SET projection = $2 WHERE projection = $1")
        .bind(from)
        .bind(to)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn delete_dead_letters(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_dead_letters WHERE projection = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// For verification: the events a checkpoint accounts for (applied or
/// dead-lettered; the count moves for both), and the events of
/// `event_types` in the log up to it.
pub async fn accounted(
    conn: &mut PgConnection,
    name: &str,
    event_types: &[String],
) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT c.applied, \
                (SELECT count(*) FROM events e WHERE e.event_type = ANY($2) AND (e.tx_id, e.position) <= (c.tx_id, c.position)) \
         FROM projection_checkpoints c WHERE c.projection = $1",
    )
    .bind(name)
    .bind(event_types)
    .fetch_one(conn)
    .await
}

/// A dead letter with the event it holds back.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub reason: String,
    /// When the event was dead-lettered.
    pub dead_at: DateTime<Utc>,
    pub position: i64,
    pub tx_id: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

const DEAD_LETTER_ROW: &str = "d.id, d.reason, d.recorded_at AS dead_at, e.position, e.tx_id::text::bigint AS tx_id, \
     e.stream_id, e.stream_version, e.event_type, e.data, e.metadata, e.recorded_at";

/// A page of `name`'s dead letters in log order, after the one with id
/// `after` (by log order too).
pub async fn dead_letters(
    conn: impl PgExecutor<'_>,
    name: &str,
    after: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetterRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEAD_LETTER_ROW} FROM projection_dead_letters d \
         JOIN events e ON e.tx_id = d.tx_id AND e.position = d.position \
         WHERE d.projection = $1 AND ($2::bigint IS NULL OR (d.tx_id, d.position) > \
             (SELECT a.tx_id, a.position FROM projection_dead_letters a WHERE a.id = $2)) \
         ORDER BY d.tx_id, d.position LIMIT $3"
    )))
    .bind(name)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The oldest of `name`'s dead letters (by when it was dead-lettered).
pub async fn oldest_dead_letter(
    conn: impl PgExecutor<'_>,
    name: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar("SELECT min(recorded_at) FROM projection_dead_letters WHERE projection = $1")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Removes dead letters that were replayed.
pub async fn forget_dead_letters(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM projection_dead_letters WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records why dead letters still cannot be applied, after a replay.
pub async fn update_dead_letter_reasons(
    conn: &mut PgConnection,
    reasons: &[(i64, String)],
) -> sqlx::Result<()> {
    if reasons.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = reasons.iter().map(|(id, _)| *id).collect();
    let texts: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
    sqlx::query(
        "UPDATE projection_dead_letters d SET reason = u.reason \
         FROM unnest($1::bigint[], $2::text[]) AS u(id, reason) WHERE d.id = u.id",
    )
    .bind(&ids)
    .bind(&texts)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_other_than_the_live_one_have_checkpoints_of_their_own() {
        assert_eq!(version_checkpoint("orders", 3), "orders@v3");
        assert_ne!(version_checkpoint("orders", 3), "orders");
    }
}
