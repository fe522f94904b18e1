//! The thin I/O layer of the Projection controller: the finalizer; reading
//! the Secret, the version registry, the Jobs, the lag, the query plans,
//! the query Deployment and its pods' metrics; then carrying out the
//! actions `decide` returns and writing the Events and the status.

use crate::events::publish;
use std::sync::Arc;
use std::time::Instant;

use chrono::DateTime;
use eventplane_api::{Projection, ReclaimPolicy};
use eventplane_store::Projection as Runtime;
use eventplane_store::{db, status, versions};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, ResourceExt};
use serde_json::json;
use sqlx::PgPool;

use super::decide::{
    self, EventSpec, Input, Lag, Observation, Observed, Outcome, Problem, Version, event,
};
use super::scaling::ownership::{ApplyOutcome, apply_replicas};
use super::scaling::{self, Measured, ReadPath, scrape};
use super::{State, explain, job};
use crate::context::{Context, MANAGER, is_connection_error};
use crate::error::{Blocked, Error, RETRY_AFTER_ERROR};
use crate::metrics::ControllerLabels;

pub const FINALIZER: &str = "eventplane.io/cleanup";

/// How long a deletion with `reclaimPolicy: Delete` keeps retrying an
/// unreachable database before it lets the Projection go and leaves the
/// tables behind: a namespace deletion must not hang forever.
pub const CLEANUP_GIVE_UP: chrono::Duration = chrono::Duration::minutes(10);

const LABELS: ControllerLabels = ControllerLabels {
    controller: "projection",
};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Operator(#[from] Error),
    /// Deletion waits for the tables to be dropped.
    #[error("tables of projection {name} not dropped yet: {why}")]
    CleanupPending { name: String, why: String },
}

impl From<kube::Error> for ProjectionError {
    fn from(err: kube::Error) -> Self {
        ProjectionError::Operator(Error::Kube(err))
    }
}

pub type ReconcileError = finalizer::Error<ProjectionError>;

pub async fn reconcile(
    projection: Arc<Projection>,
    state: Arc<State>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let ctx = &state.ctx;
    ctx.metrics.reconciles.get_or_create(&LABELS).inc();
    let Some(namespace) = projection.namespace() else {
        return Err(finalizer::Error::ApplyFailed(
            Error::MissingNamespace {
                kind: "Projection",
                name: projection.name_any(),
            }
            .into(),
        ));
    };
    let api: Api<Projection> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, projection, |event| async {
        match event {
            finalizer::Event::Apply(p) => apply(&p, &namespace, &state).await,
            finalizer::Event::Cleanup(p) => cleanup(&p, &namespace, &state).await,
        }
    })
    .await;
    ctx.metrics
        .duration
        .get_or_create(&LABELS)
        .observe(started.elapsed().as_secs_f64());
    result
}

pub fn error_policy(
    _projection: Arc<Projection>,
    err: &ReconcileError,
    state: Arc<State>,
) -> Action {
    // Waiting for a deletion's cleanup is expected, not a failure.
    if let finalizer::Error::CleanupFailed(ProjectionError::CleanupPending { .. }) = err {
        tracing::info!(error = %err, "projection cleanup pending; retrying");
    } else {
        state.ctx.metrics.failures.get_or_create(&LABELS).inc();
        tracing::warn!(error = %err, "projection reconcile failed; retrying");
    }
    Action::requeue(RETRY_AFTER_ERROR)
}

async fn apply(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Action, ProjectionError> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let now = (ctx.now)();
    let (observation, pool) = match observe(projection, namespace, state).await {
        Ok((observed, pool)) => (Observation::Seen(observed), Some(pool)),
        Err(Blocked::By(problem)) => (Observation::Problem(problem), None),
        Err(Blocked::Kube(err)) => return Err(err.into()),
    };
    let mut plan = decide::decide(
        Input {
            name: &name,
            spec: &projection.spec,
            generation: projection.metadata.generation,
            previous: projection.status.as_ref(),
            now,
        },
        observation,
    );
    if let Some(memory) = plan.memory.take() {
        state
            .scaling
            .lock()
            .await
            .insert(scaling_key(namespace, &name), memory);
    }

    let mut outcomes = Vec::new();
    for action in &plan.actions {
        outcomes.extend(carry_out(action, projection, namespace, state, pool.as_ref()).await?);
    }
    for outcome in outcomes {
        plan.record(outcome);
    }
    publish(&ctx.recorder, projection, &plan.events).await?;

    let api: Api<Projection> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": "eventplane.io/v1alpha1",
        "kind": "Projection",
        "status": plan.status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(Action::requeue(plan.requeue))
}

/// Carries out one action of the plan; what it changed, if the status or
/// the Events tell of it.
async fn carry_out(
    action: &decide::Action,
    projection: &Projection,
    namespace: &str,
    state: &State,
    pool: Option<&PgPool>,
) -> Result<Option<Outcome>, ProjectionError> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    match action {
        decide::Action::DeleteJob { name } => delete_job(&jobs, name).await?,
        decide::Action::CreateJob { version } => {
            let Some(manifest) = job::build(projection, &state.jobs) else {
                tracing::warn!(projection = %name, version, "no rebuild Job without a database and a uid");
                return Ok(None);
            };
            jobs.patch(
                &job::job_name(&name, *version),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&manifest),
            )
            .await?;
        }
        decide::Action::DropExpired { cutoff } => {
            let Some(pool) = pool else { return Ok(None) };
            match versions::drop_expired(pool, &name, *cutoff).await {
                Ok(tables) => return Ok(Some(Outcome::Dropped { tables })),
                Err(err) => {
                    tracing::warn!(projection = %name, error = %err, "dropping expired versions failed")
                }
            }
        }
        decide::Action::Scale {
            deployment,
            replicas,
            why,
        } => match apply_replicas(&ctx.client, namespace, deployment, *replicas).await {
            Ok(ApplyOutcome::Applied { from, to }) => {
                return Ok(Some(Outcome::Scaled {
                    deployment: deployment.clone(),
                    from,
                    to,
                    why: why.clone(),
                }));
            }
            Ok(ApplyOutcome::OwnedBy(owner)) => {
                tracing::debug!(projection = %name, %deployment, %owner, "replicas owned by another manager; not scaling");
            }
            Ok(ApplyOutcome::Unchanged | ApplyOutcome::Missing) => {}
            Err(err) => {
                tracing::warn!(projection = %name, %deployment, error = %err, "scaling failed");
            }
        },
    }
    Ok(None)
}

/// Deletes a rebuild Job, its pods first (foreground propagation); a Job
/// that is gone already is what was wanted.
async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<(), kube::Error> {
    match jobs.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Where a projection's scaling memory is kept in [`State`].
fn scaling_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The database URL from the Secret the spec names.
async fn database_url(
    projection: &Projection,
    namespace: &str,
    ctx: &Context,
) -> Result<String, Blocked<Problem>> {
    let Some(database) = &projection.spec.database else {
        return Err(Blocked::By(Problem::DatabaseNotSet));
    };
    ctx.database_url(namespace, database)
        .await
        .map_err(|blocked| blocked.map(Problem::Secret))
}

fn database_problem(err: &anyhow::Error) -> Problem {
    match err.downcast_ref::<sqlx::Error>() {
        Some(sqlx) if is_connection_error(sqlx) => Problem::DatabaseUnreachable(err.to_string()),
        _ => Problem::DatabaseError(format!("{err:#}")),
    }
}

/// Everything wrong with the projection's content or its database becomes
/// a `Problem`; only Kubernetes API failures are errors.
async fn observe(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<(Observed, PgPool), Blocked<Problem>> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let spec = &projection.spec;
    eventplane_api::validate_name(&name)
        .and_then(|()| spec.validate())
        .map_err(|err| Blocked::By(Problem::InvalidSpec(err.to_string())))?;
    let url = database_url(projection, namespace, ctx).await?;
    let pool = ctx
        .pool(&url)
        .await
        .map_err(|err| Blocked::By(Problem::DatabaseUnreachable(err.to_string())))?;
    let registry = read_registry(projection, &pool, &url, state)
        .await
        .map_err(|err| Blocked::By(database_problem(&err)))?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = jobs
        .list(&ListParams::default().labels(&job::selector(&name)))
        .await?;
    let observed = Observed {
        jobs: listed.items.iter().map(job::observe).collect(),
        read_path: read_path(projection, namespace, state).await?,
        ..registry
    };
    Ok((observed, pool))
}

/// The database side: schema, first version, the registry, lag, plans.
async fn read_registry(
    projection: &Projection,
    pool: &PgPool,
    url: &str,
    state: &State,
) -> anyhow::Result<Observed> {
    let name = projection.name_any();
    // The projection's bookkeeping tables come with the service schema; a
    // Projection may be created before any service has started.
    if !state.migrated.lock().await.contains(url) {
        db::migrate(pool).await?;
        state.migrated.lock().await.insert(url.to_string());
    }
    let (_, runtime) =
        versions::ensure(pool, &Runtime::live(name.clone(), projection.spec.clone())).await?;
    let rows = versions::list(pool, &name).await?;
    let lag = status::status(pool, &runtime).await?.map(|s| Lag {
        seconds: s.lag_seconds,
        events: s.lag_events,
        halted: s.halted_reason,
    });
    let queries = explain_queries(pool, &runtime).await;
    Ok(Observed {
        versions: rows
            .iter()
            .filter_map(|row| {
                Some(Version {
                    version: u32::try_from(row.version).ok()?,
                    table: row.table_name.clone(),
                    state: row.state,
                    events_done: row.events_done,
                    events_total: row.events_total,
                    retired_at: row.retired_at,
                })
            })
            .collect(),
        lag,
        queries,
        jobs: Vec::new(),
        read_path: None,
    })
}

/// The active version's queries, planned against the stable name. A query
/// that cannot be planned is logged and left out; it does not hold up the
/// rest of the reconcile.
async fn explain_queries(
    pool: &PgPool,
    runtime: &Runtime,
) -> Vec<eventplane_api::resource::QueryCheck> {
    match explain::check_queries(pool, &runtime.spec, &runtime.spec.table, &runtime.table).await {
        Ok(checks) => checks,
        Err(err) => {
            tracing::warn!(projection = %runtime.name, error = %err, "explaining list queries failed");
            Vec::new()
        }
    }
}

/// The query Deployment, if it exists, and the scrape of its pods.
async fn read_path(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Option<ReadPath>, kube::Error> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let target = scaling::deployment_name(&name, &projection.spec.scaling);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(deployment) = deployments.get_opt(&target).await? else {
        return Ok(None);
    };
    let selector = scrape::pod_selector(&deployment);
    let measured = if selector.is_empty() {
        None
    } else {
        let memory = state
            .scaling
            .lock()
            .await
            .get(&scaling_key(namespace, &name))
            .cloned()
            .unwrap_or_default();
        let (signals, scrape) =
            scrape::observe(&ctx.client, namespace, &selector, memory.scrape.as_ref()).await;
        Some(Measured {
            signals,
            scrape,
            history: memory.history,
        })
    };
    Ok(Some(ReadPath {
        deployment: target,
        // The API server defaults an unset count to 1.
        replicas: deployment.spec.replicas.unwrap_or(1),
        selector,
        measured,
    }))
}

/// Deletion. `Retain` lets the Projection go at once; `Delete` first stops
/// any rebuild and drops every table, but gives up (with a Warning) once
/// the deletion is older than [`CLEANUP_GIVE_UP`].
async fn cleanup(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Action, ProjectionError> {
    if projection.spec.reclaim_policy == ReclaimPolicy::Retain {
        return Ok(Action::await_change());
    }
    let ctx = &state.ctx;
    let name = projection.name_any();
    let now = (ctx.now)();
    let deleted_at = projection
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
        .unwrap_or(now);
    let (warning, reason, note) = match drop_tables(projection, namespace, state).await {
        Ok(tables) if tables.is_empty() => (
            false,
            event::TABLES_DROPPED,
            "reclaimPolicy is Delete; no tables to drop".to_string(),
        ),
        Ok(tables) => (
            false,
            event::TABLES_DROPPED,
            format!("reclaimPolicy is Delete; dropped {}", tables.join(", ")),
        ),
        Err(Blocked::By(why)) if now - deleted_at >= CLEANUP_GIVE_UP => (
            true,
            event::TABLES_LEFT_BEHIND,
            format!(
                "reclaimPolicy is Delete, but the tables of {name} (view {} and its versions) were left behind: {why}",
                projection.spec.table
            ),
        ),
        Err(Blocked::By(why)) => return Err(ProjectionError::CleanupPending { name, why }),
        Err(Blocked::Kube(err)) => return Err(err.into()),
    };
    let event = EventSpec {
        warning,
        reason,
        action: "Cleanup".into(),
        note,
    };
    publish(&ctx.recorder, projection, &[event]).await?;
    Ok(Action::await_change())
}

/// Stops running rebuilds, then drops every version's table; blocked by
/// why it cannot be done yet.
async fn drop_tables(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Vec<String>, Blocked<String>> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let running: Vec<job::RebuildJob> = jobs
        .list(&ListParams::default().labels(&job::selector(&name)))
        .await?
        .items
        .iter()
        .map(job::observe)
        .filter(|j| !j.finished())
        .collect();
    if !running.is_empty() {
        for job in running.iter().filter(|j| !j.deleting) {
            delete_job(&jobs, &job.name).await?;
        }
        let names: Vec<&str> = running.iter().map(|j| j.name.as_str()).collect();
        return Err(Blocked::By(format!(
            "waiting for rebuild Job {} to stop",
            names.join(", ")
        )));
    }
    let url = database_url(projection, namespace, ctx)
        .await
        .map_err(|blocked| blocked.map(|problem| problem.describe().1))?;
    let pool = ctx
        .pool(&url)
        .await
        .map_err(|err| Blocked::By(format!("cannot connect to the database: {err}")))?;
    versions::drop_all(&pool, &name, &projection.spec.table)
        .await
        .map_err(|err| Blocked::By(format!("dropping the tables failed: {err}")))
}
