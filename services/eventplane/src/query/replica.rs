//! Where reads go. Reads run on the read pool, which points at a streaming
//! replica when `--read-database-url` names one. A monitor learns whether
//! it is a replica and how far behind it is (`replica_lag_seconds`); with
//! fallback on, reads go to the primary while the replica is down or
//! further behind than allowed, and each such read is counted.
//!
//! A request picks its pool once and keeps it: a token wait on one server
//! followed by a read on another could see the token passed on the first
//! and read an older state on the second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::metrics::Metrics;

/// How often the replica's state is read.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Longest a read waits for a lock. Only a swap or DDL holds one that
/// readers wait for: on the primary for at most the swap's own lock
/// timeout (50 ms); on a replica until the startup process replays the
/// commit. A reader waiting there holds a snapshot, and when the replay
/// must first resolve a conflict with that snapshot (a vacuum record), the
/// two wait on each other until `max_standby_streaming_delay` (30 s by
/// default). Giving up the wait after this long lets the replay go on; the
/// query service reads again (see `QueryService::read`).
pub const READ_LOCK_TIMEOUT: Duration = Duration::from_millis(250);

/// A read connection idle this long is checked before a read gets it;
/// busier ones are not (a check is a round trip, as costly as a short
/// read). A dead one that slips through fails its read, which runs once
/// more on another (`db::read_retrying`).
pub const READ_CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Read from the primary while the replica is down or behind. Off by
    /// default: a primary sized for writes alone must not get the reads.
    pub fallback: bool,
    /// Further behind than this counts as behind.
    pub max_lag: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            fallback: false,
            max_lag: Duration::from_secs(10),
        }
    }
}

/// The read pool's state as last probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    /// The read pool answered the last probe.
    pub up: bool,
    /// It is a server in recovery (a replica).
    pub replica: bool,
    /// Seconds the replica's applied state trails the primary's commits it
    /// has received (0 when it has applied all it received).
    pub lag_seconds: f64,
}

pub struct Reads {
    pool: PgPool,
    primary: PgPool,
    config: ReplicaConfig,
    /// Whether a separate read URL was given at all.
    separate: bool,
    up: AtomicBool,
    replica: AtomicBool,
    lag_millis: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Reads {
    pub fn new(
        pool: PgPool,
        primary: PgPool,
        separate: bool,
        config: ReplicaConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Reads {
            pool,
            primary,
            config,
            separate,
            // Until the first probe says otherwise the read pool is assumed
            // fine, as it was before there was a monitor.
            up: AtomicBool::new(true),
            replica: AtomicBool::new(false),
            lag_millis: AtomicU64::new(0),
            metrics,
        })
    }

    /// The pool a read goes to now; a request takes it once, when it reads
    /// Postgres, and keeps it (fallbacks are counted here).
    pub fn pool(&self) -> &PgPool {
        if self.separate && self.config.fallback && !self.healthy() {
            self.metrics.replica_fallback_reads.inc();
            &self.primary
        } else {
            &self.pool
        }
    }

    fn healthy(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && Duration::from_millis(self.lag_millis.load(Ordering::Relaxed)) <= self.config.max_lag
    }

    /// Marks the read pool down after a read found it unreachable, so the
    /// next reads fall back at once rather than at the next probe.
    pub fn failed(&self) -> bool {
        let fell_back = self.separate && self.config.fallback;
        if fell_back {
            self.up.store(false, Ordering::Relaxed);
        }
        fell_back
    }

    pub fn state(&self) -> Option<ReplicaState> {
        self.separate.then(|| ReplicaState {
            up: self.up.load(Ordering::Relaxed),
            replica: self.replica.load(Ordering::Relaxed),
            lag_seconds: self.lag_millis.load(Ordering::Relaxed) as f64 / 1000.0,
        })
    }

    /// Probes the read pool until the process ends.
    pub async fn monitor(self: Arc<Self>) {
        if !self.separate {
            return;
        }
        loop {
            match probe(&self.pool).await {
                Ok((replica, lag)) => {
                    self.replica.store(replica, Ordering::Relaxed);
                    self.lag_millis
                        .store((lag * 1000.0).max(0.0) as u64, Ordering::Relaxed);
                    self.up.store(true, Ordering::Relaxed);
                    self.metrics.replica_lag_seconds.set(lag);
                    self.metrics.replica_up.set(1);
                }
                Err(err) => {
                    if self.up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %err, fallback = self.config.fallback, "read database unreachable");
                    }
                    self.metrics.replica_up.set(0);
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// Whether the server is a replica, and its apply lag in seconds.
async fn probe(pool: &PgPool) -> sqlx::Result<(bool, f64)> {
    sqlx::query_as(
        "SELECT pg_is_in_recovery(), \
         CASE WHEN NOT pg_is_in_recovery() \
                OR pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
              ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) \
         END::float8",
    )
    .fetch_one(pool)
    .await
}
