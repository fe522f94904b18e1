//! Which projections this projector process applies, following the
//! catalog: every tick (and on every catalog change) it reads the live
//! projector processes, computes its share, renews or takes the leases on
//! it, starts a tailing task (none for a Kafka-fed projection, which the
//! consumers apply) and, when a version change asks for one, a rebuild
//! for each projection it holds, and stops the tasks of those it
//! no longer holds or that were removed or changed. A task is stopped
//! before its lease is given up, so two processes never tail one
//! projection on purpose; the checkpoint lock keeps even an overlap
//! exactly-once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventplane_store::catalog::{Entry, Snapshot};
use eventplane_store::versions::{self, Ensured};
use eventplane_store::{Projection, leases, processes};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::tail::Tail;
use super::{ProjectorConfig, rebuild, share};
use crate::catalog::Follower;
use crate::invalidation::{Invalidator, Scope};
use crate::metrics::{Metrics, ProjectionLabels};

/// The role name projectors register under.
pub const ROLE: &str = "projector";

/// Longest a stopping task may take to finish its batch before it is
/// aborted (an abort rolls the batch back, so nothing is lost either way).
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A task that is aborted when dropped, so a supervisor that is itself
/// aborted (its process stopping) takes its tasks with it.
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Running {
    /// The catalog generation of the entry this task was started for.
    generation: i64,
    stop: watch::Sender<bool>,
    /// None for a Kafka-fed projection: consumers apply it.
    tail: Option<Owned>,
    rebuild: Option<Owned>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(rebuild) = self.rebuild.take() {
            rebuild.0.abort();
        }
        if let Some(tail) = &mut self.tail
            && tokio::time::timeout(STOP_GRACE, &mut tail.0).await.is_err()
        {
            tracing::warn!("a tailing task did not stop in time; aborted");
        }
    }
}

pub struct Supervisor {
    pub pool: PgPool,
    pub follower: Follower,
    /// Redis for cache invalidations, and this database's scope in it.
    pub redis: Option<(crate::redis_conn::Redis, Scope)>,
    pub metrics: Arc<Metrics>,
    pub config: ProjectorConfig,
    /// Bumped on every `NOTIFY eventplane_events`; tails wait on it.
    pub wake: watch::Receiver<u64>,
}

impl Supervisor {
    pub async fn run(self) {
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut catalog = self.follower.subscribe();
        let tick = self.config.lease_ttl / 5;
        // Until this instant the leases renewed last are surely ours.
        let mut held_until = Instant::now();
        loop {
            let snapshot = self.follower.current();
            match self.hold(&snapshot).await {
                Ok(held) => {
                    held_until = Instant::now() + self.config.lease_ttl;
                    self.converge(&snapshot, &held, &mut running).await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "projection leases not renewed");
                    if Instant::now() >= held_until && !running.is_empty() {
                        tracing::warn!(
                            "leases expired; stopping every projection until the database answers"
                        );
                        self.converge(&snapshot, &HashSet::new(), &mut running)
                            .await;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = catalog.changed() => {}
            }
        }
    }

    /// Renews or takes the leases of this process's share; returns the
    /// projections it holds.
    async fn hold(&self, snapshot: &Snapshot) -> sqlx::Result<HashSet<String>> {
        let me = self.follower.member();
        // Liveness is judged against the lease time, which may be shorter
        // than the follower's heartbeat period.
        processes::heartbeat(
            &self.pool,
            me,
            &self.follower.config().roles,
            snapshot.generation,
        )
        .await?;
        let mut members: Vec<String> =
            processes::live(&self.pool, Some(ROLE), self.config.lease_ttl)
                .await?
                .into_iter()
                .map(|p| p.member)
                .collect();
        if !members.iter().any(|m| m == me) {
            // Our own heartbeat may not have landed yet.
            members.push(me.to_string());
        }
        let share: Vec<String> = snapshot
            .entries
            .iter()
            .filter(|entry| share::owner(&entry.name, &members) == Some(me))
            .map(|entry| entry.name.clone())
            .collect();
        let held = leases::hold(&self.pool, me, &share, self.config.lease_ttl).await?;
        Ok(held.into_iter().collect())
    }

    /// Stops what should not run, then starts what should.
    async fn converge(
        &self,
        snapshot: &Snapshot,
        held: &HashSet<String>,
        running: &mut HashMap<String, Running>,
    ) {
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, run)| {
                !held.contains(*name)
                    || snapshot
                        .get(name)
                        .is_none_or(|entry| entry.generation != run.generation)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(run) = running.remove(&name) {
                tracing::info!(projection = %name, "stopping projection");
                run.stop().await;
                self.set_held(&name, false);
            }
            if (!held.contains(&name) || snapshot.get(&name).is_none())
                && let Err(err) = leases::release(&self.pool, self.follower.member(), &name).await
            {
                tracing::warn!(projection = %name, error = %err, "lease not released; it expires by itself");
            }
        }
        for entry in &snapshot.entries {
            if held.contains(&entry.name) && !running.contains_key(&entry.name) {
                match self.launch(entry).await {
                    Ok(run) => {
                        tracing::info!(projection = %entry.name, "applying projection");
                        self.set_held(&entry.name, true);
                        running.insert(entry.name.clone(), run);
                    }
                    Err(err) => {
                        tracing::error!(projection = %entry.name, error = %err, "projection not started; retrying")
                    }
                }
            }
        }
    }

    /// Sets the projection up (first version, in-place changes) and starts
    /// its tail, and its rebuild when the declared version is not active.
    async fn launch(&self, entry: &Entry) -> sqlx::Result<Running> {
        let declared = Projection::live(entry.name.clone(), entry.desired.clone());
        let (ensured, active) = versions::ensure(&self.pool, &declared).await?;
        let rebuild = match ensured {
            Ensured::NeedsRebuild { active, wanted } if self.config.rebuild_in_process => {
                tracing::info!(projection = %entry.name, active, wanted, "version change: rebuilding in the background");
                Some(Owned(self.spawn_rebuild(declared)))
            }
            _ => None,
        };
        let invalidator = self
            .redis
            .clone()
            .map(|(r, scope)| Invalidator::new(scope, &entry.name, r, self.metrics.clone()));
        let tail = Tail {
            pool: self.pool.clone(),
            projection: active,
            invalidator,
            metrics: self.metrics.clone(),
            config: self.config.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let tail = entry
            .desired
            .kafka_topic()
            .is_none()
            .then(|| Owned(tokio::spawn(tail.run(self.wake.clone(), stopped))));
        Ok(Running {
            generation: entry.generation,
            stop,
            tail,
            rebuild,
        })
    }

    fn spawn_rebuild(&self, projection: Projection) -> JoinHandle<()> {
        let (pool, metrics) = (self.pool.clone(), self.metrics.clone());
        let redis = self.redis.as_ref().map(|(r, _)| r.clone());
        tokio::spawn(async move {
            let options = rebuild::RebuildOptions::from_spec(&projection.spec);
            if let Err(err) = rebuild::run(&pool, &projection, redis, metrics, &options).await {
                tracing::error!(projection = %projection.name, error = %err, "rebuild failed; the active version keeps serving");
            }
        })
    }

    fn set_held(&self, projection: &str, held: bool) {
        let labels = ProjectionLabels {
            projection: projection.to_string(),
        };
        self.metrics
            .projection_lease_held
            .get_or_create(&labels)
            .set(i64::from(held));
        if !held {
            // Whether it is halted is the new holder's to report.
            self.metrics.projection_halted.get_or_create(&labels).set(0);
        }
    }
}
