//! One append transaction for a batch of requests. Each request succeeds or
//! fails on its own: a version conflict or a reused idempotency key rejects
//! that request only, never its neighbours in the batch.
//!
//! Locks are taken in one global order (idempotency keys, then stream rows,
//! each sorted) so concurrent batches do not deadlock each other.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;
use sqlx::PgConnection;

use super::model::{AppendRequest, AppendResult, ExpectedVersion};
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

struct Accepted {
    index: usize,
    first_version: i64,
}

/// Appends every admissible request inside the caller's transaction and
/// returns one outcome per request, in order. A database error fails the
/// whole transaction; the caller decides whether to retry.
pub async fn append_in_tx(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Vec<Outcome>, sqlx::Error> {
    // Only requests with an idempotency key are ever compared.
    let digests: Vec<Vec<u8>> = requests
        .iter()
        .map(|r| {
            if r.idempotency_key.is_some() {
                r.digest()
            } else {
                Vec::new()
            }
        })
        .collect();
    let stored = lock_idempotency_keys(conn, requests).await?;
    let mut versions = lock_streams(conn, requests, &stored).await?;

    let mut outcomes: Vec<Option<Outcome>> = vec![None; requests.len()];
    let mut accepted: Vec<Accepted> = Vec::new();
    // Keys accepted earlier in this batch: a duplicate in the same batch gets
    // the first request's answer.
    let mut batch_keys: HashMap<&str, usize> = HashMap::new();

    for (index, request) in requests.iter().enumerate() {
        if let Some(key) = request.idempotency_key.as_deref() {
            if let Some((digest, response)) = stored.get(key) {
                outcomes[index] = Some(replay(key, digest, &digests[index], response));
                continue;
            }
            if let Some(&first) = batch_keys.get(key) {
                if digests[first] != digests[index] {
                    outcomes[index] = Some(Err(AppendError::IdempotencyMismatch(key.to_string())));
                } else {
                    // Filled in once the first request's positions are known.
                    outcomes[index] = None;
                }
                continue;
            }
        }
        let current = versions.get(&request.stream_id).copied().unwrap_or(0);
        if !request.expected_version.admits(current) {
            outcomes[index] = Some(Err(AppendError::Conflict {
                expected: request.expected_version.clone(),
                actual: current,
            }));
            continue;
        }
        versions.insert(
            request.stream_id.clone(),
            current + request.events.len() as i64,
        );
        accepted.push(Accepted {
            index,
            first_version: current + 1,
        });
        if let Some(key) = request.idempotency_key.as_deref() {
            batch_keys.insert(key, index);
        }
    }

    if !accepted.is_empty() {
        let results = write_accepted(conn, requests, &accepted, &versions).await?;
        store_idempotency_keys(conn, requests, &digests, &results).await?;
        for (index, result) in results {
            outcomes[index] = Some(Ok(result));
        }
    }

    // Same-batch duplicates of an accepted key take its result.
    for (index, request) in requests.iter().enumerate() {
        if outcomes[index].is_none() {
            let key = request.idempotency_key.as_deref().unwrap_or_default();
            let first = batch_keys[key];
            outcomes[index] = outcomes[first].clone();
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every request has an outcome"))
        .collect())
}

fn replay(key: &str, stored_digest: &[u8], digest: &[u8], response: &Value) -> Outcome {
    if stored_digest != digest {
        return Err(AppendError::IdempotencyMismatch(key.to_string()));
    }
    serde_json::from_value(response.clone())
        .map_err(|_| AppendError::IdempotencyMismatch(key.to_string()))
}

type StoredKeys = HashMap<String, (Vec<u8>, Value)>;

/// Serialises requests that share an idempotency key (advisory locks, in key
/// order) and returns the keys already stored with their digest and answer.
async fn lock_idempotency_keys(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<StoredKeys, sqlx::Error> {
    let keys: BTreeSet<&str> = requests
        .iter()
        .filter_map(|r| r.idempotency_key.as_deref())
        .collect();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<&str> = keys.into_iter().collect();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 7340)) \
         FROM unnest($1::text[]) WITH ORDINALITY AS u(k, ord) ORDER BY ord",
    )
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(String, Vec<u8>, Value)> = sqlx::query_as(
        "SELECT key, request_hash, response FROM idempotency_keys WHERE key = ANY($1)",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(k, h, r)| (k, (h, r))).collect())
}

/// Locks the stream rows the batch may write (creating missing ones at
/// version 0) in stream-id order and returns their current versions.
async fn lock_streams(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
    stored: &StoredKeys,
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let streams: BTreeSet<&str> = requests
        .iter()
        .filter(|r| {
            r.idempotency_key
                .as_ref()
                .is_none_or(|k| !stored.contains_key(k))
        })
        .map(|r| r.stream_id.as_str())
        .collect();
    if streams.is_empty() {
        return Ok(HashMap::new());
    }
    let streams: Vec<&str> = streams.into_iter().collect();
    // The no-op update locks existing rows and returns their version.
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO streams (stream_id, version) \
         SELECT s, 0 FROM unnest($1::text[]) WITH ORDINALITY AS u(s, ord) ORDER BY ord \
         ON CONFLICT (stream_id) DO UPDATE SET version = streams.version \
         RETURNING stream_id, version",
    )
    .bind(&streams)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn write_accepted(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
    accepted: &[Accepted],
    versions: &HashMap<String, i64>,
) -> Result<Vec<(usize, AppendResult)>, sqlx::Error> {
    let touched: BTreeSet<&str> = accepted
        .iter()
        .map(|a| requests[a.index].stream_id.as_str())
        .collect();
    let (ids, new_versions): (Vec<&str>, Vec<i64>) =
        touched.iter().map(|s| (*s, versions[*s])).unzip();
    let total: usize = accepted
        .iter()
        .map(|a| requests[a.index].events.len())
        .sum();
    let mut stream_ids = Vec::with_capacity(total);
    let mut stream_versions = Vec::with_capacity(total);
    let mut types = Vec::with_capacity(total);
    let mut data = Vec::with_capacity(total);
    let mut metadata = Vec::with_capacity(total);
    for a in accepted {
        let request = requests[a.index];
        for (offset, event) in request.events.iter().enumerate() {
            stream_ids.push(request.stream_id.as_str());
            stream_versions.push(a.first_version + offset as i64);
            types.push(event.event_type.as_str());
            data.push(&event.data);
            metadata.push(&event.metadata);
        }
    }
    // Positions are drawn after the sort, so they follow request order and,
    // within a stream, version order: the projector's (tx_id, position)
    // order is then the stream order.
    // One round trip: the stream versions move in the same statement.
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "WITH bumped AS ( \
             UPDATE streams SET version = b.version, updated_at = now() \
             FROM unnest($6::text[], $7::bigint[]) AS b(stream_id, version) \
             WHERE streams.stream_id = b.stream_id) \
         INSERT INTO events (position, stream_id, stream_version, event_type, data, metadata) \
         SELECT nextval('events_position_seq'), u.s, u.v, u.t, u.d, u.m \
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::jsonb[]) \
              WITH ORDINALITY AS u(s, v, t, d, m, ord) \
         ORDER BY u.ord \
         RETURNING stream_id, stream_version, position, tx_id::text::bigint",
    )
    .bind(&stream_ids)
    .bind(&stream_versions)
    .bind(&types)
    .bind(data.iter().map(sqlx::types::Json).collect::<Vec<_>>())
    .bind(metadata.iter().map(sqlx::types::Json).collect::<Vec<_>>())
    .bind(&ids)
    .bind(&new_versions)
    .fetch_all(&mut *conn)
    .await?;

    let tx_id = rows.first().map(|r| r.3).unwrap_or_default();
    let positions: HashMap<(&str, i64), i64> = rows
        .iter()
        .map(|(s, v, p, _)| ((s.as_str(), *v), *p))
        .collect();
    Ok(accepted
        .iter()
        .map(|a| {
            let request = requests[a.index];
            let count = request.events.len() as i64;
            let event_positions: Vec<i64> = (0..count)
                .map(|offset| positions[&(request.stream_id.as_str(), a.first_version + offset)])
                .collect();
            let last = *event_positions
                .last()
                .expect("an accepted request has events");
            let result = AppendResult {
                stream_id: request.stream_id.clone(),
                version: a.first_version + count - 1,
                positions: event_positions,
                token: Token {
                    tx_id,
                    position: last,
                }
                .to_string(),
            };
            (a.index, result)
        })
        .collect())
}

async fn store_idempotency_keys(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
    digests: &[Vec<u8>],
    results: &[(usize, AppendResult)],
) -> Result<(), sqlx::Error> {
    let mut keys = Vec::new();
    let mut hashes = Vec::new();
    let mut responses = Vec::new();
    for (index, result) in results {
        if let Some(key) = requests[*index].idempotency_key.as_deref() {
            keys.push(key);
            hashes.push(digests[*index].as_slice());
            responses.push(sqlx::types::Json(result));
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO idempotency_keys (key, request_hash, response) \
         SELECT * FROM unnest($1::text[], $2::bytea[], $3::jsonb[])",
    )
    .bind(&keys)
    .bind(&hashes)
    .bind(&responses)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
