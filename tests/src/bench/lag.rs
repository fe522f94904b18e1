//! Projection lag as a client sees it: from the append's 201 to the row
//! being visible in the read-model table. Visibility is checked in Postgres
//! directly, because a read with a token waits server-side and would hide
//! the lag it is meant to show.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::mpsc;

use super::load;

/// How often pending rows are looked for: the resolution of a lag sample.
const POLL_EVERY: Duration = Duration::from_millis(1);
/// A row not visible after this long is counted as missing, not waited for.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

pub struct LagResult {
    /// Time from the 201 to the row being visible, in microseconds.
    pub lag: Histogram<u64>,
    pub missing: u64,
}

/// Receives `(key, time of the 201)` for sampled appends until the sender is
/// dropped and every pending row has been seen (or given up on). One
/// `= ANY($1)` query per tick checks every pending key, so the sampling does
/// not itself load the database by one query per key per millisecond.
pub async fn watch(
    pool: PgPool,
    table: String,
    key_column: String,
    mut samples: mpsc::UnboundedReceiver<(String, Instant)>,
) -> anyhow::Result<LagResult> {
    let sql = format!(
        "SELECT {key}::text FROM {table} WHERE {key}::text = ANY($1)",
        key = eventplane_api::quote_ident(&key_column),
        table = eventplane_api::quote_ident(&table)
    );
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut lag = load::histogram();
    let mut missing = 0;
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match samples.recv().await {
                Some((key, t0)) => {
                    pending.insert(key, t0);
                }
                None => break,
            }
        }
        while let Ok((key, t0)) = samples.try_recv() {
            pending.insert(key, t0);
        }
        if open && samples.is_closed() && samples.is_empty() {
            open = false;
        }
        let keys: Vec<String> = pending.keys().cloned().collect();
        let found: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .bind(&keys)
            .fetch_all(&pool)
            .await?;
        // Taken after the answer: the row was visible no later than this.
        let seen = Instant::now();
        for key in found {
            if let Some(t0) = pending.remove(&key) {
                load::record(&mut lag, seen.saturating_duration_since(t0));
            }
        }
        pending.retain(|_, t0| {
            let keep = seen.saturating_duration_since(*t0) < GIVE_UP_AFTER;
            if !keep {
                missing += 1;
            }
            keep
        });
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(LagResult { lag, missing })
}
