//! Async commands (the seed's command queue). A request is validated, then
//! persisted as a job before `202 Accepted` is returned. Workers claim jobs
//! by priority with `FOR UPDATE SKIP LOCKED` and run the append in the same
//! transaction that records the job's result, so a job runs exactly once and
//! a crash leaves it pending for the next worker.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use prometheus_client::metrics::counter::Counter;

use crate::error_body::ErrorBody;
use crate::events::append::append;
use crate::events::model::AppendRequest;
use crate::events::notify::CommitSignal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    fn rank(self) -> i16 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// An async command and how it went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub job_id: Uuid,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    pub attempts: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A job whose append hits a database error this many times is failed.
const MAX_ATTEMPTS: i32 = 5;

pub async fn enqueue(
    pool: &PgPool,
    request: &AppendRequest,
    priority: Priority,
) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO command_jobs (id, priority, status, request) VALUES ($1, $2, 'pending', $3)",
    )
    .bind(id)
    .bind(priority.rank())
    .bind(sqlx::types::Json(request))
    .execute(pool)
    .await?;
    Ok(id)
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<JobView>> {
    sqlx::query_as(
        "SELECT id AS job_id, status, result, error, attempts, created_at, finished_at FROM command_jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Claims and runs the most urgent pending job. Returns whether one ran.
pub async fn run_one(pool: &PgPool) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(Uuid, Value)> = sqlx::query_as(
        "SELECT id, request FROM command_jobs WHERE status = 'pending' \
         ORDER BY priority, created_at, id FOR UPDATE SKIP LOCKED LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, request)) = claimed else {
        return Ok(false);
    };
    let request: AppendRequest = match serde_json::from_value(request) {
        Ok(r) => r,
        Err(err) => {
            let error = ErrorBody::new(
                "invalid_job",
                format!("stored request is unreadable: {err}"),
            )
            .to_json();
            finish(&mut tx, id, None, Some(error)).await?;
            tx.commit().await?;
            return Ok(true);
        }
    };
    match append(&mut *tx, &[&request]).await {
        Ok(mut outcomes) => {
            let (result, error) = match outcomes.remove(0) {
                Ok(result) => (
                    Some(serde_json::to_value(result).expect("results serialize")),
                    None,
                ),
                Err(err) => (None, Some(err.body().to_json())),
            };
            finish(&mut tx, id, result, error).await?;
            tx.commit().await?;
        }
        Err(err) if crate::db::is_data_error(&err) => {
            // Retrying cannot help a value Postgres refuses to store.
            drop(tx);
            let message = err
                .as_database_error()
                .map_or_else(|| err.to_string(), |db| db.message().to_string());
            let error = ErrorBody::new(
                "unstorable_event",
                format!("the events cannot be stored: {message}"),
            );
            let mut tx = pool.begin().await?;
            finish(&mut tx, id, None, Some(error.to_json())).await?;
            tx.commit().await?;
        }
        Err(err) => {
            drop(tx);
            tracing::warn!(job = %id, error = %err, "async command failed, will retry");
            record_failed_attempt(pool, id).await?;
        }
    }
    Ok(true)
}

async fn finish(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    result: Option<Value>,
    error: Option<Value>,
) -> sqlx::Result<()> {
    let status = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    sqlx::query(
        "UPDATE command_jobs SET status = $2, result = $3, error = $4, attempts = attempts + 1, finished_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(result)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

async fn record_failed_attempt(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    let error = ErrorBody::new(
        "job_attempts_exhausted",
        format!("the append failed {MAX_ATTEMPTS} times"),
    )
    .to_json();
    sqlx::query(
        "UPDATE command_jobs SET attempts = attempts + 1, \
             status = CASE WHEN attempts + 1 >= $2 THEN 'failed' ELSE status END, \
             error = CASE WHEN attempts + 1 >= $2 THEN $3 ELSE error END, \
             finished_at = CASE WHEN attempts + 1 >= $2 THEN now() ELSE finished_at END \
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(MAX_ATTEMPTS)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Starts `workers` job runners, woken by `NOTIFY eventplane_jobs` and by a
/// periodic poll in case a notification was missed. `processed` counts the
/// jobs they finish.
pub fn start_workers(
    pool: PgPool,
    workers: usize,
    processed: Counter,
    signal: CommitSignal,
) -> Vec<JoinHandle<()>> {
    let wake = Arc::new(Notify::new());
    let forward = {
        let wake = wake.clone();
        crate::db::forward_notifications(pool.clone(), "eventplane_jobs", move || {
            wake.notify_waiters()
        })
    };
    let mut handles = vec![tokio::spawn(forward)];
    for _ in 0..workers {
        let pool = pool.clone();
        let wake = wake.clone();
        let processed = processed.clone();
        let signal = signal.clone();
        handles.push(tokio::spawn(async move {
            loop {
                match run_one(&pool).await {
                    Ok(true) => {
                        processed.inc();
                        signal.committed();
                        continue;
                    }
                    Ok(false) => {}
                    Err(err) => tracing::warn!(error = %err, "job worker could not claim a job"),
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            }
        }));
    }
    handles
}
