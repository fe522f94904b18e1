//! Following the projection catalog: a process loads it at start, reloads
//! it when the catalog notification arrives, and looks at the catalog
//! generation every `resync` in case a notification was missed (a
//! listening connection that dropped, a backend terminated), so a process
//! is never more than `resync` behind. The same tick records the process's
//! heartbeat and loaded generation, which is what projectors share work by
//! and what status reports show.

use std::sync::Arc;
use std::time::Duration;

use eventplane_store::catalog::{self, Snapshot};
use eventplane_store::{db, processes};
use sqlx::PgPool;
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// This process's name among the database's processes.
    pub member: String,
    /// The roles it runs (`projector`, `query`).
    pub roles: Vec<&'static str>,
    /// Longest a missed notification can leave the process behind; also
    /// the heartbeat period.
    pub resync: Duration,
}

/// A unique name for this process: the pod name (or host name) and a
/// random suffix, so a restarted pod is a new member.
pub fn member_name() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "eventplane".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// The loaded catalog, shared by the roles of a process.
#[derive(Clone)]
pub struct Follower {
    pool: PgPool,
    config: Arc<FollowConfig>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// One reload at a time.
    loading: Arc<Mutex<()>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Follower {
    /// Loads the catalog, then keeps following it in the background.
    pub async fn start(
        pool: PgPool,
        config: FollowConfig,
        metrics: Arc<Metrics>,
    ) -> sqlx::Result<(Follower, Vec<JoinHandle<()>>)> {
        let snapshot = catalog::load(&pool).await?;
        metrics.catalog_generation.set(snapshot.generation);
        processes::heartbeat(&pool, &config.member, &config.roles, snapshot.generation).await?;
        let follower = Follower {
            pool: pool.clone(),
            config: Arc::new(config),
            snapshot: watch::Sender::new(Arc::new(snapshot)),
            loading: Arc::new(Mutex::new(())),
            wake: Arc::new(Notify::new()),
            metrics,
        };
        let forward = {
            let wake = follower.wake.clone();
            db::forward_notifications(pool, catalog::CHANNEL, move || wake.notify_one())
        };
        let follow = tokio::spawn(follower.clone().follow());
        Ok((follower, vec![tokio::spawn(forward), follow]))
    }

    async fn follow(self) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.config.resync) => {}
            }
            if let Err(err) = self.refresh().await {
                tracing::warn!(error = %err, "catalog not reloaded; serving what was loaded");
            }
            let generation = self.current().generation;
            if let Err(err) = processes::heartbeat(
                &self.pool,
                &self.config.member,
                &self.config.roles,
                generation,
            )
            .await
            {
                tracing::warn!(error = %err, "heartbeat not recorded");
            }
        }
    }

    /// Reloads the catalog now if its generation moved; returns the
    /// snapshot in force afterwards.
    pub async fn refresh(&self) -> sqlx::Result<Arc<Snapshot>> {
        let _one_at_a_time = self.loading.lock().await;
        let current = self.current();
        if catalog::generation(&self.pool).await? == current.generation {
            return Ok(current);
        }
        let loaded = Arc::new(catalog::load(&self.pool).await?);
        tracing::info!(
            generation = loaded.generation,
            projections = loaded.entries.len(),
            "catalog loaded"
        );
        self.metrics.catalog_generation.set(loaded.generation);
        self.snapshot.send_replace(loaded.clone());
        Ok(loaded)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn member(&self) -> &str {
        &self.config.member
    }

    pub fn config(&self) -> &FollowConfig {
        &self.config
    }

    /// Leaves the database's process list (and gives up any leases), for
    /// a clean shutdown.
    pub async fn leave(&self) -> sqlx::Result<()> {
        let mut conn = self.pool.acquire().await?;
        processes::leave(&mut conn, &self.config.member).await
    }
}
