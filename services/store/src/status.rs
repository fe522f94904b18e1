//! A projection's progress as the status endpoints report it.

use serde::Serialize;
use sqlx::PgPool;

use crate::checkpoints::{self, CheckpointRow};
use crate::projection::Projection;
use crate::token::Token;
use crate::{kafka_offsets, leases};

/// Counting unapplied events stops here; beyond it the count says "at least".
const LAG_COUNT_LIMIT: i64 = 100_000;

/// A projection's progress.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub table: String,
    pub version: u32,
    pub checkpoint: String,
    pub events_applied: i64,
    pub last_event_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Events of this projection's types not yet applied (capped).
    pub lag_events: i64,
    /// Age of the oldest event not yet applied; 0 when caught up.
    pub lag_seconds: f64,
    pub dead_letters: i64,
    /// When the oldest dead letter was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_dead_letter_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halted_reason: Option<String>,
    /// The projector process applying the projection now, if any holds
    /// its lease (for a Kafka-fed projection: setting it up and rebuilding
    /// it; the consumers apply it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<String>,
    /// A Kafka-fed projection's partitions, where each stands.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionProgress>,
}

/// Where a Kafka-fed projection stands in one partition of its topic.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionProgress {
    pub partition: i32,
    /// The first offset not applied yet.
    pub next_offset: i64,
    /// Events applied from it since the last rebuild swapped in.
    pub events_applied: i64,
    /// Messages dropped because the relay had published them before.
    pub duplicates: i64,
    pub last_event_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn status(
    pool: &PgPool,
    projection: &Projection,
) -> sqlx::Result<Option<ProjectionStatus>> {
    let Some(CheckpointRow {
        tx_id,
        position,
        applied,
        last_event_at,
        halted_reason,
    }) = checkpoints::get(pool, &projection.name).await?
    else {
        return Ok(None);
    };
    let types = projection.spec.event_types();
    let partitions = match projection.spec.kafka_topic() {
        Some(_) => kafka_offsets::list(pool, &projection.name).await?,
        None => Vec::new(),
    };
    // Events past the checkpoint were applied by Kafka-fed batches, each
    // once, through one partition; the tail applies none past it.
    let applied_past: i64 = partitions.iter().map(|p| p.applied).sum();
    let (pending, oldest): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT count(*), min(recorded_at) FROM ( \
             SELECT recorded_at FROM events \
             WHERE (tx_id, position) > ($1::text::xid8, $2) AND event_type = ANY($3) \
             ORDER BY tx_id, position LIMIT $4) pending",
    )
    .bind(tx_id.to_string())
    .bind(position)
    .bind(&types)
    .bind(LAG_COUNT_LIMIT + applied_past)
    .fetch_one(pool)
    .await?;
    let lag_events = (pending - applied_past).max(0);
    // Which of the events past the checkpoint a Kafka-fed projection
    // lacks is not known here; the oldest of them bounds the lag.
    let oldest = oldest.filter(|_| lag_events > 0);
    let dead_letters = checkpoints::dead_letter_count(pool, &projection.name).await?;
    let oldest_dead_letter_at = if dead_letters > 0 {
        checkpoints::oldest_dead_letter(pool, &projection.name).await?
    } else {
        None
    };
    let applied_by = leases::holder(pool, &projection.name).await?;
    let lag_seconds = oldest
        .map(|t| ((chrono::Utc::now() - t).num_milliseconds().max(0)) as f64 / 1000.0)
        .unwrap_or(0.0);
    Ok(Some(ProjectionStatus {
        name: projection.name.clone(),
        table: projection.table.clone(),
        version: projection.spec.version,
        checkpoint: Token { tx_id, position }.to_string(),
        events_applied: applied + applied_past,
        last_event_at,
        lag_events,
        lag_seconds,
        dead_letters,
        oldest_dead_letter_at,
        halted_reason,
        applied_by,
        partitions: partitions
            .into_iter()
            .map(|p| PartitionProgress {
                partition: p.partition,
                next_offset: p.next_offset,
                events_applied: p.applied,
                duplicates: p.duplicates,
                last_event_at: p.last_event_at,
            })
            .collect(),
    }))
}
