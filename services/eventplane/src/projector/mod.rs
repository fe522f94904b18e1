//! The projector role: the projections of the catalog, shared among the
//! database's live projector processes (`supervisor`, `share`), each
//! applied by a tailing task (`tail`), or, when fed from Kafka, by a
//! consumer in every process started with a Kafka source (`kafka`), and
//! rebuilt beside the active version when its declared version changes
//! (`rebuild`).

pub mod kafka;
pub mod rebuild;
pub mod share;
pub mod supervisor;
pub mod tail;

use std::sync::Arc;
use std::time::Duration;

use eventplane_store::batch::horizon_age_seconds;
use eventplane_store::db;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::Follower;
use crate::invalidation::Scope;
use crate::metrics::Metrics;
use supervisor::Supervisor;

#[derive(Clone, Debug)]
pub struct ProjectorConfig {
    /// Most events read per batch.
    pub batch_size: i64,
    /// Poll this often even without a notification.
    pub poll_interval: Duration,
    /// Rebuild a projection whose spec asks for a new version in this
    /// process (local runs); in a cluster the operator runs a Job instead.
    pub rebuild_in_process: bool,
    /// How long a projection lease lasts unrenewed: the longest a
    /// projection waits for another process after its holder died.
    pub lease_ttl: Duration,
    /// Consume the Kafka-fed projections from these brokers; without it
    /// they are set up and rebuilt here but applied elsewhere.
    pub kafka: Option<kafka::KafkaSource>,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            rebuild_in_process: true,
            lease_ttl: Duration::from_secs(10),
            kafka: None,
        }
    }
}

/// Starts the projector: the supervisor that follows the catalog and its
/// share of the leases, the notification forwarder that wakes the tails,
/// and the horizon watch. Runs until the handles are aborted.
pub fn start(
    pool: PgPool,
    follower: Follower,
    redis: Option<(crate::redis_conn::Redis, Scope)>,
    metrics: Arc<Metrics>,
    config: ProjectorConfig,
) -> Vec<JoinHandle<()>> {
    let (wake_tx, wake) = watch::channel(0u64);
    let forward = db::forward_notifications(
        pool.clone(),
        eventplane_store::events::notify::CHANNEL,
        move || wake_tx.send_modify(|n| *n += 1),
    );
    let mut tasks = Vec::new();
    if let Some(source) = config.kafka.clone() {
        let consumers = kafka::KafkaProjectors {
            pool: pool.clone(),
            follower: follower.clone(),
            redis: redis.clone(),
            metrics: metrics.clone(),
            source,
            batch_size: usize::try_from(config.batch_size).unwrap_or(1),
        };
        tasks.push(tokio::spawn(consumers.run()));
    }
    let supervisor = Supervisor {
        pool: pool.clone(),
        follower,
        redis,
        metrics: metrics.clone(),
        config,
        wake,
    };
    tasks.extend([
        tokio::spawn(forward),
        tokio::spawn(watch_horizon(pool, metrics)),
        tokio::spawn(supervisor.run()),
    ]);
    tasks
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
