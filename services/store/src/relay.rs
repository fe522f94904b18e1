//! The outbox relay's row (`relays`): its checkpoint in the log and its
//! lease. Every statement on that table is here.
//!
//! The lease is a row with a holder and an expiry, not an advisory lock: a
//! relay killed with `kill -9` (or cut off from the database) loses it when
//! the expiry passes, whatever became of its connection (a half-open TCP
//! connection would hold an advisory lock until keepalive noticed, and a
//! pooler in transaction mode would not keep one at all). The checkpoint is
//! fenced by the lease: only the current, unexpired holder can advance it,
//! so a relay that lost its lease mid-batch may publish that batch again
//! (at-least-once) but never moves the checkpoint.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::batch::TailEvent;
use crate::checkpoints::Checkpoint;

/// A relay's row as the status endpoint shows it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct RelayRow {
    pub tx_id: i64,
    pub position: i64,
    pub published: i64,
    pub last_event_at: Option<DateTime<Utc>>,
    pub holder: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl RelayRow {
    pub fn at(&self) -> Checkpoint {
        Checkpoint {
            tx_id: self.tx_id,
            position: self.position,
        }
    }
}

/// Creates the relay's row at the start of the log, unless it exists.
pub async fn create(conn: impl PgExecutor<'_>, relay: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO relays (relay) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(relay)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn get(conn: impl PgExecutor<'_>, relay: &str) -> sqlx::Result<Option<RelayRow>> {
    sqlx::query_as(
        "SELECT tx_id::text::bigint AS tx_id, position, published, last_event_at, holder, lease_expires_at \
         FROM relays WHERE relay = $1",
    )
    .bind(relay)
    .fetch_optional(conn)
    .await
}

/// Renews `holder`'s lease for `ttl` from now, or takes it when it is free
/// or expired. Returns whether `holder` holds it now.
pub async fn hold(
    conn: impl PgExecutor<'_>,
    relay: &str,
    holder: &str,
    ttl: Duration,
) -> sqlx::Result<bool> {
    let held: Option<String> = sqlx::query_scalar(
        "UPDATE relays SET holder = $2, lease_expires_at = now() + $3 * interval '1 millisecond', \
             acquired_at = CASE WHEN holder = $2 THEN acquired_at ELSE now() END \
         WHERE relay = $1 AND (holder = $2 OR holder IS NULL OR lease_expires_at < now()) \
         RETURNING holder",
    )
    .bind(relay)
    .bind(holder)
    .bind(ttl.as_millis() as f64)
    .fetch_optional(conn)
    .await?;
    Ok(held.is_some())
}

/// Gives the lease up, so another replica need not wait for it to expire.
pub async fn release(conn: impl PgExecutor<'_>, relay: &str, holder: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE relays SET holder = NULL, lease_expires_at = NULL WHERE relay = $1 AND holder = $2",
    )
    .bind(relay)
    .bind(holder)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the checkpoint to `to` after `published` more events were
/// acknowledged, if `holder` still holds an unexpired lease; returns
/// whether it did.
pub async fn advance(
    conn: impl PgExecutor<'_>,
    relay: &str,
    holder: &str,
    to: Checkpoint,
    published: i64,
    last_event_at: Option<DateTime<Utc>>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE relays SET tx_id = greatest(tx_id, $3::text::xid8), \
             position = CASE WHEN $3::text::xid8 > tx_id OR ($3::text::xid8 = tx_id AND $4 > position) THEN $4 ELSE position END, \
             published = published + $5, last_event_at = coalesce($6, last_event_at), updated_at = now() \
         WHERE relay = $1 AND holder = $2 AND lease_expires_at > now()",
    )
    .bind(relay)
    .bind(holder)
    .bind(to.tx_id.to_string())
    .bind(to.position)
    .bind(published)
    .bind(last_event_at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every event after `after` and below `horizon`, in log order: the
/// projector's gap-safe tail, without its event-type filter.
pub async fn read(
    conn: &mut PgConnection,
    after: Checkpoint,
    horizon: i64,
    limit: i64,
) -> sqlx::Result<Vec<TailEvent>> {
    sqlx::query_as(crate::batch::tail_sql!("", "$4"))
        .bind(after.tx_id.to_string())
        .bind(after.position)
        .bind(horizon.to_string())
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// Events committed after `after` (not yet published), at most `cap`
/// counted, and the age in seconds of the oldest of them.
pub async fn lag(
    conn: impl PgExecutor<'_>,
    after: Checkpoint,
    cap: i64,
) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*), coalesce(EXTRACT(epoch FROM now() - min(recorded_at))::float8, 0) FROM ( \
             SELECT recorded_at FROM events WHERE (tx_id, position) > ($1::text::xid8, $2) LIMIT $3) AS behind",
    )
    .bind(after.tx_id.to_string())
    .bind(after.position)
    .bind(cap)
    .fetch_one(conn)
    .await
}
