//! Group commit: concurrent appends share transactions. A few committer
//! tasks each take whatever requests are queued (up to a bound), write them
//! in one transaction and answer each request with its own outcome. Under
//! load batches grow by themselves; when idle a request commits alone, so
//! there is no fixed wait added to its latency. A committer that finds only
//! a small batch while another batch is being written keeps gathering
//! until that one commits (or its own batch is deep enough to be worth a
//! transaction beside it): each transaction has a fixed cost in Postgres,
//! so one larger batch serves more appends than two small ones at once.
//!
//! A request has a deadline: one still queued when it passes is answered
//! "busy" without being written, and the pool's statement timeout bounds
//! the batch it joins, so no client waits without bound and nothing
//! commits after its client was told it failed. A batch that fails on a
//! value Postgres cannot store is retried one request at a time, so only
//! the request that carries the value fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::append::{Outcome, append};
use super::model::AppendRequest;
use super::notify::CommitSignal;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug)]
pub struct GroupCommitConfig {
    /// Transactions in flight at once.
    pub writers: usize,
    /// Most requests in one transaction.
    pub max_batch: usize,
    /// Requests a batch needs before it is written beside another batch in
    /// flight; a smaller one waits for that batch to commit, gathering.
    pub parallel_batch: usize,
    /// How long a committer that found a small batch waits for more; zero
    /// commits at once.
    pub max_wait: Duration,
    /// Requests waiting for a committer before new ones are refused.
    pub queue: usize,
    /// Longest a request may wait in the queue before it is answered busy.
    pub deadline: Duration,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self {
            writers: 4,
            max_batch: 256,
            parallel_batch: 32,
            max_wait: Duration::ZERO,
            queue: 8192,
            deadline: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("the append queue is full")]
    Overloaded,
    /// The database was busy or out of reach (no connection in time, a
    /// statement or lock timeout): nothing was written; retry later.
    #[error("the database did not take the append in time: {0}")]
    Busy(String),
    /// The request carries a value Postgres cannot store.
    #[error("the events cannot be stored: {0}")]
    Unstorable(String),
    #[error("the append could not be committed: {0}")]
    Database(String),
}

impl SubmitError {
    fn of(err: &sqlx::Error) -> Self {
        if crate::db::is_busy(err) {
            SubmitError::Busy(err.to_string())
        } else if crate::db::is_data_error(err) {
            SubmitError::Unstorable(
                err.as_database_error()
                    .map_or_else(|| err.to_string(), |db| db.message().to_string()),
            )
        } else {
            SubmitError::Database(err.to_string())
        }
    }
}

struct Pending {
    request: AppendRequest,
    deadline: Instant,
    reply: oneshot::Sender<Result<Outcome, SubmitError>>,
}

#[derive(Clone)]
pub struct Appender {
    queue: mpsc::Sender<Pending>,
    deadline: Duration,
}

/// Retries of a whole batch after a deadlock or serialization failure.
const BATCH_RETRIES: usize = 3;

impl Appender {
    /// Starts the committer tasks; they stop when every `Appender` clone is
    /// dropped or their handles are aborted.
    pub fn start(
        pool: PgPool,
        config: GroupCommitConfig,
        batch_sizes: Histogram,
        signal: CommitSignal,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(config.queue);
        let rx = Arc::new(Mutex::new(rx));
        let (in_flight, _) = watch::channel(0usize);
        let handles = (0..config.writers.max(1))
            .map(|_| {
                tokio::spawn(committer(
                    rx.clone(),
                    in_flight.clone(),
                    pool.clone(),
                    config.clone(),
                    batch_sizes.clone(),
                    signal.clone(),
                ))
            })
            .collect();
        (
            Appender {
                queue: tx,
                deadline: config.deadline,
            },
            handles,
        )
    }

    pub async fn append(&self, request: AppendRequest) -> Result<Outcome, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending {
                request,
                deadline: Instant::now() + self.deadline,
                reply,
            })
            .map_err(|_| SubmitError::Overloaded)?;
        answer
            .await
            .unwrap_or_else(|_| Err(SubmitError::Database("committer stopped".into())))
    }
}

async fn next_batch(
    rx: &Mutex<mpsc::Receiver<Pending>>,
    in_flight: &watch::Sender<usize>,
    config: &GroupCommitConfig,
) -> Option<Vec<Pending>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = Instant::now() + config.max_wait;
    while batch.len() < config.max_batch {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) if config.max_wait.is_zero() => break,
            Err(_) => match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            },
        }
    }
    // Holding the queue, so what arrives joins this batch.
    let mut flight = in_flight.subscribe();
    while batch.len() < config.parallel_batch.min(config.max_batch) && *flight.borrow() > 0 {
        tokio::select! {
            biased;
            _ = flight.wait_for(|n| *n == 0) => break,
            next = rx.recv() => match next {
                Some(p) => batch.push(p),
                None => break,
            },
        }
    }
    while batch.len() < config.max_batch {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Counts a batch as in flight while it lives.
struct Flying<'a>(&'a watch::Sender<usize>);

impl<'a> Flying<'a> {
    fn start(in_flight: &'a watch::Sender<usize>) -> Self {
        in_flight.send_modify(|n| *n += 1);
        Flying(in_flight)
    }
}

impl Drop for Flying<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn committer(
    rx: Arc<Mutex<mpsc::Receiver<Pending>>>,
    in_flight: watch::Sender<usize>,
    pool: PgPool,
    config: GroupCommitConfig,
    batch_sizes: Histogram,
    signal: CommitSignal,
) {
    while let Some(batch) = next_batch(&rx, &in_flight, &config).await {
        let _flying = Flying::start(&in_flight);
        let now = Instant::now();
        let (batch, late): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(|p| p.deadline > now);
        for pending in late {
            let _ = pending.reply.send(Err(SubmitError::Busy(
                "the request waited in the append queue past its deadline".into(),
            )));
        }
        if batch.is_empty() {
            continue;
        }
        batch_sizes.observe(batch.len() as f64);
        let requests: Vec<&AppendRequest> = batch.iter().map(|p| &p.request).collect();
        let answers = match commit_with_retry(&pool, &requests).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(err) if crate::db::is_data_error(&err) && batch.len() > 1 => {
                tracing::info!(error = %err, batch = batch.len(), "a value in the batch cannot be stored; appending its requests one by one");
                one_by_one(&pool, &requests).await
            }
            Err(err) => {
                tracing::warn!(error = %err, batch = batch.len(), "append batch failed");
                let failure = SubmitError::of(&err);
                batch.iter().map(|_| Err(failure.clone())).collect()
            }
        };
        if answers
            .iter()
            .any(|a: &Result<Outcome, SubmitError>| matches!(a, Ok(Ok(_))))
        {
            signal.committed();
        }
        for (pending, answer) in batch.into_iter().zip(answers) {
            let _ = pending.reply.send(answer);
        }
    }
}

/// Each request in a transaction of its own, so a value that cannot be
/// stored fails only the request that carries it.
async fn one_by_one(
    pool: &PgPool,
    requests: &[&AppendRequest],
) -> Vec<Result<Outcome, SubmitError>> {
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        answers.push(match commit_with_retry(pool, &[request]).await {
            Ok(mut outcomes) => Ok(outcomes.remove(0)),
            Err(err) => Err(SubmitError::of(&err)),
        });
    }
    answers
}

/// Appends a batch (one statement, its own transaction), again after a
/// deadlock or serialization failure.
pub async fn commit_with_retry(
    pool: &PgPool,
    requests: &[&AppendRequest],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut attempt = 0;
    loop {
        match append(pool, requests).await {
            Err(err) if attempt < BATCH_RETRIES && is_retryable(&err) => {
                attempt += 1;
                tracing::warn!(error = %err, attempt, "retrying append batch");
            }
            other => return other,
        }
    }
}

/// Deadlocks and serialization failures are safe to retry: the transaction
/// was rolled back as a whole.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}
