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
use std::sync::Arc;

use eventplane_api::Projection;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::runtime::Controller;
use kube::runtime::watcher;
use tokio::sync::Mutex;

use crate::context::{Context, MANAGER};
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

pub async fn run(ctx: Arc<Context>, jobs: JobConfig) {
    let projections: Api<Projection> = Api::all(ctx.client.clone());
    let rebuilds: Api<Job> = Api::all(ctx.client.clone());
    let ours = format!("{}={MANAGER}", job::MANAGED_BY_LABEL);
    Controller::new(projections, watcher::Config::default().any_semantic())
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
}
