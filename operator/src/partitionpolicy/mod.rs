//! The PartitionPolicy controller: keeps a table partitioned by interval
//! through the same planner and executor as `eventplane partitions apply`.

pub mod decide;
pub mod reconcile;

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::Controller;
use kube::runtime::watcher;

use crate::context::Context;
use crate::metrics::{PARTITION_POLICY, follow_store};
use eventplane_api::PartitionPolicy;

pub async fn run(ctx: Arc<Context>) {
    let policies: Api<PartitionPolicy> = Api::all(ctx.client.clone());
    let controller = Controller::new(policies, watcher::Config::default().any_semantic());
    let live = tokio::spawn(follow_store(
        controller.store(),
        ctx.metrics.clone(),
        PARTITION_POLICY,
    ));
    controller
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::warn!(error = %err, "partitionpolicy reconcile failed");
            }
        })
        .await;
    live.abort();
}
