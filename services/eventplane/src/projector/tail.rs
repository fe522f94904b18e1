//! One projection's tailing task: reads the log below the horizon in
//! bounded batches (woken by `NOTIFY eventplane_events`, with a poll as a
//! safety net), applies them through the store's batch, publishes cache
//! invalidations after each commit, and keeps the lag metrics.

use std::sync::Arc;
use std::time::Duration;

use eventplane_store::Projection;
use eventplane_store::batch::{apply_batch, events_beyond};
use eventplane_telemetry::trace;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{Instrument as _, Span, field};

use super::ProjectorConfig;
use crate::invalidation::Invalidator;
use crate::metrics::{Metrics, ProjectionLabels};
use crate::traces::child;

/// While a transaction below the horizon keeps newer events hidden, re-read
/// starting this often and backing off to `MAX_BEHIND_WAIT`.
const MIN_BEHIND_WAIT: Duration = Duration::from_millis(1);
/// Pause after a short batch under load: well inside the 100 ms lag
/// target, long enough to turn many tiny batches into a few larger ones.
const GATHER: Duration = Duration::from_millis(5);
const MAX_BEHIND_WAIT: Duration = Duration::from_millis(50);

pub struct Tail {
    pub pool: PgPool,
    pub projection: Arc<Projection>,
    pub invalidator: Option<Invalidator>,
    pub metrics: Arc<Metrics>,
    pub config: ProjectorConfig,
}

impl Tail {
    /// Applies batches until `stop` turns true; it is looked at between
    /// batches and during every pause, so a stop never cuts a batch short
    /// (and would roll it back if it did).
    pub async fn run(mut self, mut wake: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
        let labels = ProjectionLabels {
            projection: self.projection.name.clone(),
        };
        let mut behind_wait = MIN_BEHIND_WAIT;
        let mut halted_logged = false;
        while !stopped(&stop) {
            // Created before the batch so that it times it; it joins the
            // trace of the batch's first command once the events are read
            // (a span's parent is fixed when it is first entered).
            let span = batch_span(&self.projection.name);
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
                    pause(&mut stop, None, Duration::from_secs(1)).await;
                    continue;
                }
            };
            trace::follow(&span, outcome.traceparents.iter().map(String::as_str));
            span.record("events", outcome.events as i64);
            self.metrics
                .projection_halted
                .get_or_create(&labels)
                .set(i64::from(outcome.halted.is_some()));
            if let Some(reason) = &outcome.halted {
                if !halted_logged {
                    tracing::error!(projection = %self.projection.name, %reason, "projection halted");
                    halted_logged = true;
                }
                pause(&mut stop, Some(&mut wake), self.config.poll_interval * 10).await;
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
                let keys = outcome.keys.len() as i64;
                invalidator
                    .invalidate(self.projection.spec.version, outcome.keys)
                    .instrument(child(&span, || {
                        tracing::info_span!("projector.invalidate", keys)
                    }))
                    .await;
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
                pause(&mut stop, None, GATHER).await;
                continue;
            }
            // Nothing below the horizon. Newer events may be committed
            // behind a transaction that is still running: no notification
            // will come when it ends, so look again shortly.
            match events_beyond(&self.pool, outcome.checkpoint.tx_id).await {
                Ok(true) => {
                    pause(&mut stop, None, behind_wait).await;
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
            pause(&mut stop, Some(&mut wake), self.config.poll_interval).await;
        }
    }
}

/// A batch's span, when spans are exported: an idle projector polls often
/// and its empty batches are not worth a span each unless someone looks.
fn batch_span(projection: &str) -> Span {
    if trace::exporting() {
        tracing::info_span!(
            trace::BATCH_SPAN,
            projection,
            events = field::Empty,
            trace_id = field::Empty,
        )
    } else {
        Span::none()
    }
}

/// Told to stop, or the supervisor that could tell it is gone.
fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Waits `duration`, or less if woken (when `wake` is given) or told to
/// stop.
async fn pause(
    stop: &mut watch::Receiver<bool>,
    wake: Option<&mut watch::Receiver<u64>>,
    duration: Duration,
) {
    let woken = async {
        match wake {
            Some(wake) => {
                let _ = wake.changed().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = woken => {}
        _ = stop.changed() => {}
    }
}
