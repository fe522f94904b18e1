//! The Projection controller: keeps each projection's tables current
//! (first version, rebuild Jobs that end in an atomic swap, retention of
//! replaced versions), reports progress, lag and query plans in the status,
//! cleans up on deletion, and scales the read path.

pub mod decide;
pub mod explain;
pub mod job;
pub mod reconcile;
pub mod scaling;

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use eventplane_api::Projection;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::ResourceExt;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, reflector, watcher};
use tokio::sync::Mutex;

use crate::context::{Context, MANAGER};
use crate::metrics::{PROJECTION, follow_store};
pub use job::JobConfig;

/// The controller's own state beside the shared [`Context`].
pub struct State {
    pub ctx: Arc<Context>,
    pub jobs: JobConfig,
    /// Database URLs whose schema this process has migrated already.
    migrated: Mutex<HashSet<String>>,
    /// By `namespace/name`.
    scaling: Mutex<HashMap<String, scaling::Memory>>,
}

impl State {
    pub fn new(ctx: Arc<Context>, jobs: JobConfig) -> Arc<State> {
        Arc::new(State {
            ctx,
            jobs,
            migrated: Mutex::new(HashSet::new()),
            scaling: Mutex::new(HashMap::new()),
        })
    }
}

/// What a reconcile depends on in the resource itself: its spec (through
/// `generation`), its finalizers and whether it is being deleted. The
/// reconcile writes the status, so a change of status alone (the lag
/// moving during a rebuild) must not start another one at once; the
/// requeue interval refreshes it.
pub fn reconcile_trigger(projection: &Projection) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    (
        projection.metadata.generation,
        projection.metadata.deletion_timestamp.is_some(),
        projection.finalizers(),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

pub async fn run(ctx: Arc<Context>, jobs: JobConfig) {
    let projections: Api<Projection> = Api::all(ctx.client.clone());
    let rebuilds: Api<Job> = Api::all(ctx.client.clone());
    let ours = format!("{}={MANAGER}", job::MANAGED_BY_LABEL);
    let (reader, writer) = reflector::store();
    let changes = watcher(projections, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_trigger, PredicateConfig::default());
    let live = tokio::spawn(follow_store(
        reader.clone(),
        ctx.metrics.clone(),
        PROJECTION,
    ));
    Controller::for_stream(changes, reader)
        .owns(rebuilds, watcher::Config::default().labels(&ours))
        .shutdown_on_signal()
        .run(
            reconcile::reconcile,
            reconcile::error_policy,
            State::new(ctx, jobs),
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::warn!(error = %err, "projection reconcile failed");
            }
        })
        .await;
    live.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Projection {
        let mut p = Projection::new("orders", eventplane_api::examples::orders());
        p.metadata.generation = Some(3);
        p
    }

    #[test]
    fn a_status_change_alone_does_not_trigger_a_reconcile() {
        let p = sample();
        let mut lagging = p.clone();
        lagging.status = Some(eventplane_api::resource::ProjectionStatus {
            lag_seconds: Some(4.2),
            ..Default::default()
        });
        assert_eq!(reconcile_trigger(&p), reconcile_trigger(&lagging));

        let mut changed = p.clone();
        changed.metadata.generation = Some(4);
        let mut finalized = p.clone();
        finalized.metadata.finalizers = Some(vec!["eventplane.io/cleanup".into()]);
        let mut deleting = p.clone();
        deleting.metadata.deletion_timestamp = Some(crate::conditions::time(chrono::Utc::now()));
        for other in [changed, finalized, deleting] {
            assert_ne!(reconcile_trigger(&p), reconcile_trigger(&other));
        }
    }
}
