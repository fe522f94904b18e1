//! The thin I/O layer of the PartitionPolicy controller: read the Secret,
//! connect, run the executor, then write what `decide` says.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use eventplane_api::PartitionPolicy;
use eventplane_store::partitions::{ApplyOptions, PartitionError, apply};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::decide::{Applied, Outcome, decide};
use crate::context::{Context, MANAGER, is_connection_error};
use crate::error::{Blocked, Error, RETRY_AFTER_ERROR, Result};
use crate::metrics::{ControllerLabels, PARTITION_POLICY, ResourceLabels};

const LABELS: ControllerLabels = ControllerLabels {
    controller: PARTITION_POLICY,
};

pub async fn reconcile(policy: Arc<PartitionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.get_or_create(&LABELS).inc();
    let namespace = policy.namespace().ok_or_else(|| Error::MissingNamespace {
        kind: "PartitionPolicy",
        name: policy.name_any(),
    })?;
    let now = (ctx.now)();
    let outcome = observe_and_apply(&policy, &namespace, &ctx).await?;
    let decision = decide(
        policy.status.as_ref(),
        policy.metadata.generation,
        outcome,
        now,
    );
    crate::events::publish(&ctx.recorder, &*policy, &decision.events).await?;
    let api: Api<PartitionPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": "eventplane.io/v1alpha1",
        "kind": "PartitionPolicy",
        "status": decision.status,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics.succeeded(&LABELS, now);
    let premade_until = decision
        .status
        .premade_until
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    ctx.metrics.set_premade_until(
        ResourceLabels::new(&namespace, &policy.name_any()),
        premade_until,
    );
    ctx.metrics
        .duration
        .get_or_create(&LABELS)
        .observe(started.elapsed().as_secs_f64());
    Ok(decision
        .requeue
        .map(Action::requeue)
        .unwrap_or_else(Action::await_change))
}

pub fn error_policy(_policy: Arc<PartitionPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failures.get_or_create(&LABELS).inc();
    tracing::warn!(error = %err, "partitionpolicy reconcile failed; retrying");
    Action::requeue(RETRY_AFTER_ERROR)
}

/// Everything that can go wrong with the policy's content or its database
/// becomes an `Outcome`; only Kubernetes API failures are errors.
async fn observe_and_apply(
    policy: &PartitionPolicy,
    namespace: &str,
    ctx: &Context,
) -> Result<Outcome> {
    let spec = &policy.spec;
    if spec.suspend {
        return Ok(Outcome::Suspended);
    }
    if let Err(err) = spec.validate() {
        return Ok(Outcome::InvalidSpec(err.to_string()));
    }
    let url = match ctx.database_url(namespace, &spec.database).await {
        Ok(url) => url,
        Err(Blocked::By(problem)) => return Ok(Outcome::Secret(problem)),
        Err(Blocked::Kube(err)) => return Err(err.into()),
    };
    let pool = match ctx.pool(&url).await {
        Ok(pool) => pool,
        Err(err) => return Ok(Outcome::DatabaseUnreachable(err.to_string())),
    };
    let options = ApplyOptions {
        dry_run: spec.dry_run,
        ..ApplyOptions::default()
    };
    Ok(match apply(&pool, spec, (ctx.now)(), &options).await {
        Ok(report) => Outcome::Applied(Applied {
            plan: report.plan,
            executed: report.executed,
            partitions: report.partitions_after,
            archived: report.archived,
            dry_run: spec.dry_run,
        }),
        Err(PartitionError::Plan(err)) => Outcome::PlanFailed(err),
        Err(PartitionError::LockBusy) => Outcome::LockBusy,
        Err(PartitionError::Database(err)) if is_connection_error(&err) => {
            Outcome::DatabaseUnreachable(err.to_string())
        }
        Err(err) => Outcome::DdlFailed {
            message: err.to_string(),
            executed: Vec::new(),
        },
    })
}
