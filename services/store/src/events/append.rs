//! One batch of appends in one statement: `eventplane_append` (migrations
//! 0006 and 0010) locks, checks, writes and answers every request of the
//! batch in one round trip. Each request succeeds or fails on its own: a version
//! conflict or a reused idempotency key rejects that request only, never
//! its neighbours in the batch.

use std::borrow::Cow;

use serde_json::Value;
use sqlx::PgExecutor;

use super::model::{AppendRequest, AppendResult, ExpectedVersion, NamedVersion};
use crate::error_body::ErrorBody;
use crate::token::Token;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AppendError {
    #[error("expected version {}, stream is at {actual}", expected.describe())]
    Conflict {
        expected: ExpectedVersion,
        actual: i64,
    },
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyMismatch(String),
}

impl AppendError {
    /// The body a client gets for this rejection, synchronously or as the
    /// error of an async job.
    pub fn body(&self) -> ErrorBody {
        let message = self.to_string();
        match self {
            AppendError::Conflict { expected, actual } => {
                ErrorBody::new("version_conflict", message)
                    .with("expectedVersion", serde_json::json!(expected))
                    .with("actualVersion", serde_json::json!(actual))
            }
            AppendError::IdempotencyMismatch(_) => {
                ErrorBody::new("idempotency_key_reused", message)
            }
        }
    }
}

/// What happened to one request of the batch.
pub type Outcome = Result<AppendResult, AppendError>;

/// `r_expected` of `eventplane_append`.
fn expected_code(expected: &ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Exact(v) => *v,
        ExpectedVersion::Named(NamedVersion::Any) => -1,
        ExpectedVersion::Named(NamedVersion::NoStream) => -2,
    }
}

/// Appends every admissible request and returns one outcome per request, in
/// order. Outside a transaction block the call is its own transaction;
/// inside one (an async job) it joins it. A database error fails the whole
/// batch; the caller decides whether to retry.
/// The metadata an event is stored with: as sent, plus the command's trace
/// context when it has one.
fn with_traceparent<'a>(metadata: &'a Value, traceparent: Option<&str>) -> Cow<'a, Value> {
    match (traceparent, metadata) {
        (Some(traceparent), Value::Object(fields)) => {
            let mut fields = fields.clone();
            fields.insert("traceparent".into(), Value::String(traceparent.into()));
            Cow::Owned(Value::Object(fields))
        }
        _ => Cow::Borrowed(metadata),
    }
}

pub async fn append(
    conn: impl PgExecutor<'_>,
    requests: &[&AppendRequest],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let events: usize = requests.iter().map(|r| r.events.len()).sum();
    let mut streams = Vec::with_capacity(requests.len());
    let mut expected = Vec::with_capacity(requests.len());
    let mut counts = Vec::with_capacity(requests.len());
    let mut keys = Vec::with_capacity(requests.len());
    let mut hashes = Vec::with_capacity(requests.len());
    let mut types = Vec::with_capacity(events);
    let mut data = Vec::with_capacity(events);
    let mut metadata = Vec::with_capacity(events);
    for request in requests {
        streams.push(request.stream_id.as_str());
        expected.push(expected_code(&request.expected_version));
        counts.push(request.events.len() as i32);
        keys.push(request.idempotency_key.as_deref());
        // Only requests with an idempotency key are ever compared.
        hashes.push(request.idempotency_key.as_ref().map(|_| request.digest()));
        for event in &request.events {
            types.push(event.event_type.as_str());
            data.push(sqlx::types::Json(&event.data));
            metadata.push(sqlx::types::Json(with_traceparent(
                &event.metadata,
                request.traceparent.as_deref(),
            )));
        }
    }
    let rows: Vec<AnswerRow> = sqlx::query_as(
        "SELECT outcome, actual_version, version, positions, tx, response \
         FROM eventplane_append($1, $2, $3, $4, $5, $6, $7, $8) ORDER BY idx",
    )
    .bind(&streams)
    .bind(&expected)
    .bind(&counts)
    .bind(&keys)
    .bind(&hashes)
    .bind(&types)
    .bind(&data)
    .bind(&metadata)
    .fetch_all(conn)
    .await?;
    if rows.len() != requests.len() {
        return Err(sqlx::Error::Protocol(format!(
            "eventplane_append answered {} of {} requests",
            rows.len(),
            requests.len()
        )));
    }
    rows.into_iter()
        .zip(requests)
        .map(|(row, request)| row.outcome_of(request))
        .collect()
}

/// One row of `eventplane_append` (migration 0010).
#[derive(sqlx::FromRow)]
struct AnswerRow {
    outcome: String,
    actual_version: Option<i64>,
    version: Option<i64>,
    positions: Option<Vec<i64>>,
    tx: Option<i64>,
    /// The stored answer of the request that first used the key, for a
    /// replayed request.
    response: Option<Value>,
}

impl AnswerRow {
    fn outcome_of(self, request: &AppendRequest) -> Result<Outcome, sqlx::Error> {
        let unexpected = |row: &Self| {
            sqlx::Error::Protocol(format!(
                "eventplane_append answered {:?} without its details",
                row.outcome
            ))
        };
        match self.outcome.as_str() {
            "conflict" => match self.actual_version {
                Some(actual) => Ok(Err(AppendError::Conflict {
                    expected: request.expected_version.clone(),
                    actual,
                })),
                None => Err(unexpected(&self)),
            },
            "key_reused" => Ok(Err(AppendError::IdempotencyMismatch(
                request.idempotency_key.clone().unwrap_or_default(),
            ))),
            "replayed" => match self.response {
                Some(response) => serde_json::from_value(response)
                    .map(Ok)
                    .map_err(|err| sqlx::Error::Decode(Box::new(err))),
                None => Err(unexpected(&self)),
            },
            "appended" => match (self.version, self.positions.as_deref(), self.tx) {
                (Some(version), Some(&[.., last]), Some(tx)) => Ok(Ok(AppendResult {
                    stream_id: request.stream_id.clone(),
                    version,
                    token: Token {
                        tx_id: tx,
                        position: last,
                    }
                    .to_string(),
                    positions: self.positions.unwrap_or_default(),
                })),
                _ => Err(unexpected(&self)),
            },
            _ => Err(unexpected(&self)),
        }
    }
}
