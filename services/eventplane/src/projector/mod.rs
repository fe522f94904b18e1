//! The projector role: one task per projection tails the event log in
//! bounded batches, woken by `NOTIFY eventplane_events` (with a periodic poll
//! as a safety net), and publishes cache invalidations after each commit.

pub mod rebuild;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use eventplane_store::batch::{apply_batch, events_beyond, horizon_age_seconds};
use eventplane_store::versions::{self, Ensured};
use eventplane_store::{Projection, db};

use crate::invalidation::Invalidator;
use crate::metrics::{Metrics, ProjectionLabels};

#[derive(Clone, Debug)]
pub struct ProjectorConfig {
    /// Most events read per batch.
    pub batch_size: i64,
    /// Poll this often even without a notification.
    pub poll_interval: Duration,
    /// Rebuild a projection whose spec asks for a new version in this
    /// process (local runs); in a cluster the operator runs a Job instead.
    pub rebuild_in_process: bool,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            rebuild_in_process: true,
        }
    }
}

/// While a transaction below the horizon keeps newer events hidden, re-read
/// starting this often and backing off to `MAX_BEHIND_WAIT`.
const MIN_BEHIND_WAIT: Duration = Duration::from_millis(1);
/// Pause after a short batch under load: well inside the 100 ms lag
/// target, long enough to turn many tiny batches into a few larger ones.
const GATHER: Duration = Duration::from_millis(5);
const MAX_BEHIND_WAIT: Duration = Duration::from_millis(50);

/// Creates every projection's table and checkpoint, then starts one tailing
/// task per projection. Each task runs until the process ends or the handle
/// is aborted.
pub async fn start(
    pool: PgPool,
    projections: &[Arc<Projection>],
    redis: Option<redis::aio::ConnectionManager>,
    metrics: Arc<Metrics>,
    config: ProjectorConfig,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut runtimes = Vec::with_capacity(projections.len());
    let mut rebuilds = Vec::new();
    for projection in projections {
        let (ensured, runtime) = versions::ensure(&pool, projection).await?;
        if let Ensured::NeedsRebuild { active, wanted } = ensured {
            tracing::info!(projection = %projection.name, active, wanted, "version change: rebuilding in the background");
            rebuilds.push(projection.clone());
        }
        runtimes.push(runtime);
    }
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let forward = db::forward_notifications(
        pool.clone(),
        eventplane_store::events::notify::CHANNEL,
        move || wake_tx.send_modify(|n| *n += 1),
    );
    let mut handles = vec![tokio::spawn(forward)];
    handles.push(tokio::spawn(watch_horizon(pool.clone(), metrics.clone())));
    if config.rebuild_in_process {
        for projection in rebuilds {
            let (pool, redis, metrics) = (pool.clone(), redis.clone(), metrics.clone());
            handles.push(tokio::spawn(async move {
                let options = rebuild::RebuildOptions::from_spec(&projection.spec);
                if let Err(err) = rebuild::run(&pool, &projection, redis, metrics, &options).await {
                    tracing::error!(projection = %projection.name, error = %err, "rebuild failed; the active version keeps serving");
                }
            }));
        }
    }
    for projection in runtimes {
        let invalidator = redis
            .clone()
            .map(|r| Invalidator::new(&projection.name, r, metrics.clone()));
        let task = Tail {
            pool: pool.clone(),
            projection,
            invalidator,
            metrics: metrics.clone(),
            config: config.clone(),
        };
        handles.push(tokio::spawn(task.run(wake_rx.clone())));
    }
    Ok(handles)
}

struct Tail {
    pool: PgPool,
    projection: Arc<Projection>,
    invalidator: Option<Invalidator>,
    metrics: Arc<Metrics>,
    config: ProjectorConfig,
}

impl Tail {
    async fn run(mut self, mut wake: watch::Receiver<u64>) {
        let labels = ProjectionLabels {
            projection: self.projection.name.clone(),
        };
        let mut behind_wait = MIN_BEHIND_WAIT;
        let mut halted_logged = false;
        loop {
            let outcome = match apply_batch(
                &self.pool,
                &mut self.projection,
                self.config.batch_size,
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(err) => {
                    tracing::error!(projection = %self.projection.name, error = %err, "projector batch failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(reason) = &outcome.halted {
                if !halted_logged {
                    tracing::error!(projection = %self.projection.name, %reason, "projection halted");
                    halted_logged = true;
                }
                let _ = tokio::time::timeout(self.config.poll_interval * 10, wake.changed()).await;
                continue;
            }
            halted_logged = false;
            if outcome.events > 0 {
                self.metrics
                    .projection_batch_size
                    .get_or_create(&labels)
                    .observe(outcome.events as f64);
                self.metrics
                    .projection_applied
                    .get_or_create(&labels)
                    .inc_by(outcome.events as u64);
                self.metrics
                    .projection_lag_seconds
                    .get_or_create(&labels)
                    .set(outcome.max_lag_seconds);
            }
            if outcome.dead_letters > 0 {
                self.metrics
                    .projection_dead_letters
                    .get_or_create(&labels)
                    .inc_by(outcome.dead_letters as u64);
            }
            if let Some(invalidator) = &self.invalidator
                && !outcome.keys.is_empty()
            {
                invalidator.invalidate(outcome.keys).await;
            }
            if outcome.full {
                behind_wait = MIN_BEHIND_WAIT;
                continue;
            }
            if outcome.events > 0 {
                // More may have committed below a newer horizon meanwhile.
                // A short pause lets them gather into one batch instead of
                // a transaction per append under a steady load.
                behind_wait = MIN_BEHIND_WAIT;
                tokio::time::sleep(GATHER).await;
                continue;
            }
            // Nothing below the horizon. Newer events may be committed
            // behind a transaction that is still running: no notification
            // will come when it ends, so look again shortly.
            match events_beyond(&self.pool, outcome.checkpoint.tx_id).await {
                Ok(true) => {
                    tokio::time::sleep(behind_wait).await;
                    behind_wait = (behind_wait * 2).min(MAX_BEHIND_WAIT);
                    continue;
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "could not check for events beyond the horizon")
                }
            }
            behind_wait = MIN_BEHIND_WAIT;
            self.metrics
                .projection_lag_seconds
                .get_or_create(&labels)
                .set(0.0);
            self.metrics
                .projection_lag_events
                .get_or_create(&labels)
                .set(0);
            let _ = tokio::time::timeout(self.config.poll_interval, wake.changed()).await;
        }
    }
}

/// How long the oldest running write transaction has been holding back the
/// tail horizon.
async fn watch_horizon(pool: PgPool, metrics: Arc<Metrics>) {
    loop {
        if let Ok(age) = horizon_age_seconds(&pool).await {
            metrics.horizon_age_seconds.set(age.unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
