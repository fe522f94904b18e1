//! Stream reads, paged by stream version.

use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// One event of a stream.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub position: i64,
    pub version: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

/// A page of a stream's events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamPage {
    pub stream_id: String,
    pub version: i64,
    pub events: Vec<StoredEvent>,
    /// The `from` of the next page, absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

/// Reads up to `limit` events from version `from`; `None` when the stream
/// has no events.
pub async fn read_stream(
    pool: &PgPool,
    stream_id: &str,
    from: i64,
    limit: i64,
) -> sqlx::Result<Option<StreamPage>> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM streams WHERE stream_id = $1")
            .bind(stream_id)
            .fetch_optional(pool)
            .await?;
    let Some(version) = version.filter(|v| *v > 0) else {
        return Ok(None);
    };
    let events: Vec<StoredEvent> = sqlx::query_as(
        "SELECT position, stream_version AS version, event_type, data, metadata, recorded_at \
         FROM events WHERE stream_id = $1 AND stream_version >= $2 \
         ORDER BY stream_version LIMIT $3",
    )
    .bind(stream_id)
    .bind(from)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let next = events
        .last()
        .map(|e| e.version + 1)
        .filter(|n| *n <= version);
    Ok(Some(StreamPage {
        stream_id: stream_id.to_string(),
        version,
        events,
        next,
    }))
}
