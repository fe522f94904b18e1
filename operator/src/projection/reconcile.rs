//! The thin I/O layer of the Projection controller: the finalizer; reading
//! the Secret; declaring the spec in its database's projection catalog
//! (which sets up the first version) and reading back the version registry,
//! the lag, the query plans and how far the declaration reached the
//! services; the Jobs, the query Deployment and its pods' metrics; then
//! carrying out the actions `decide` returns and writing the Events and the
//! status. Deletion removes the catalog entry, so the services stop serving
//! it, and with `reclaimPolicy: Delete` the tables too.

use crate::events::publish;
use std::sync::Arc;
use std::time::Instant;

use chrono::DateTime;
use eventplane_api::resource::RoleServing;
use eventplane_api::{Projection, ReclaimPolicy};
use eventplane_store::Projection as Runtime;
use eventplane_store::catalog::{self, CatalogError};
use eventplane_store::{db, processes, status, versions};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, ResourceExt};
use serde_json::json;
use sqlx::PgPool;

use super::decide::{
    self, CatalogSeen, EventSpec, Input, Lag, Observation, Observed, Outcome, Problem, Version,
    event,
};
use super::scaling::ownership::{ApplyOutcome, apply_replicas};
use super::scaling::{self, Measured, ReadPath, scrape};
use super::{State, explain, job};
use crate::context::{Context, MANAGER, is_connection_error};
use crate::error::{Blocked, Error, RETRY_AFTER_ERROR};
use crate::metrics::{ControllerLabels, PROJECTION, ResourceLabels};
use eventplane_api::resource::Phase;

pub const FINALIZER: &str = "eventplane.io/cleanup";

/// How long a deletion with `reclaimPolicy: Delete` keeps retrying an
/// unreachable database before it lets the Projection go and leaves the
/// tables behind: a namespace deletion must not hang forever.
pub const CLEANUP_GIVE_UP: chrono::Duration = chrono::Duration::minutes(10);

const LABELS: ControllerLabels = ControllerLabels {
    controller: PROJECTION,
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
    ctx.metrics.succeeded(&LABELS, now);
    ctx.metrics.set_rebuild_failed(
        ResourceLabels::new(namespace, &name),
        plan.status.phase == Some(Phase::Failed),
    );
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

/// Who the operator declares a Projection as in the catalog: the resource
/// owns its entry.
pub fn catalog_source(namespace: &str, name: &str) -> String {
    format!("operator:{namespace}/{name}")
}

/// A process counts as running if it reported within this long.
const RUNNING_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// The roles whose processes serve a declaration.
const SERVING_ROLES: [&str; 2] = ["query", "projector"];

fn database_problem(err: &sqlx::Error) -> Problem {
    if is_connection_error(err) {
        Problem::DatabaseUnreachable(err.to_string())
    } else {
        Problem::DatabaseError(err.to_string())
    }
}

fn catalog_problem(err: CatalogError) -> Problem {
    match err {
        CatalogError::Invalid(invalid) => Problem::InvalidSpec(invalid.to_string()),
        CatalogError::Database(db) => database_problem(&db),
        refused => Problem::Refused(refused.to_string()),
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
    let registry = read_registry(projection, namespace, &pool, &url, state)
        .await
        .map_err(Blocked::By)?;
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

/// The database side: schema, the declaration (and with it the first
/// version), the registry, lag, plans, and who serves it.
async fn read_registry(
    projection: &Projection,
    namespace: &str,
    pool: &PgPool,
    url: &str,
    state: &State,
) -> Result<Observed, Problem> {
    let name = projection.name_any();
    // The projection's bookkeeping tables come with the service schema; a
    // Projection may be created before any service has started.
    if !state.migrated.lock().await.contains(url) {
        db::migrate(pool).await.map_err(|err| match err {
            sqlx::migrate::MigrateError::Execute(db) => database_problem(&db),
            other => Problem::DatabaseError(other.to_string()),
        })?;
        state.migrated.lock().await.insert(url.to_string());
    }
    let applied = catalog::apply(
        pool,
        &name,
        &projection.spec,
        &catalog_source(namespace, &name),
    )
    .await
    .map_err(catalog_problem)?;
    let db = |err: sqlx::Error| database_problem(&err);
    let active = {
        let mut conn = pool.acquire().await.map_err(db)?;
        versions::active(&mut conn, &name).await.map_err(db)?
    };
    let runtime = match active {
        Some(row) => Runtime::live(name.clone(), row.spec().map_err(db)?),
        None => Runtime::live(name.clone(), projection.spec.clone()),
    };
    let rows = versions::list(pool, &name).await.map_err(db)?;
    let entry_generation = catalog::load(pool)
        .await
        .map_err(db)?
        .get(&name)
        .map_or(applied.generation, |entry| entry.generation);
    let running = processes::live(pool, None, RUNNING_WINDOW)
        .await
        .map_err(db)?;
    let served_by = SERVING_ROLES
        .iter()
        .map(|role| {
            let of_role = running.iter().filter(|p| p.roles.iter().any(|r| r == role));
            let (mut loaded, mut total) = (0, 0);
            for process in of_role {
                total += 1;
                if process.catalog_generation >= entry_generation {
                    loaded += 1;
                }
            }
            RoleServing {
                role: role.to_string(),
                loaded,
                running: total,
            }
        })
        .collect();
    let lag = status::status(pool, &runtime)
        .await
        .map_err(db)?
        .map(|s| Lag {
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
        catalog: Some(CatalogSeen {
            generation: entry_generation,
            served_by,
        }),
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

/// Deletion: the catalog entry goes, so the services stop serving the
/// projection. `Retain` keeps its tables; `Delete` first stops any rebuild
/// and drops every table with the entry. Either gives up (with a Warning)
/// once the deletion is older than [`CLEANUP_GIVE_UP`] and the database
/// still cannot be reached.
async fn cleanup(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Action, ProjectionError> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let now = (ctx.now)();
    let deleted_at = projection
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
        .unwrap_or(now);
    let retain = projection.spec.reclaim_policy == ReclaimPolicy::Retain;
    let (warning, reason, note) = match remove(projection, namespace, state).await {
        Ok(_) if retain => (
            false,
            event::NO_LONGER_SERVED,
            "reclaimPolicy is Retain; the projection is no longer served and its tables stay"
                .to_string(),
        ),
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
                "the catalog entry of {name}{} was left behind: {why}",
                if retain {
                    String::new()
                } else {
                    format!(
                        " and its tables (view {} and its versions)",
                        projection.spec.table
                    )
                }
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
    ctx.metrics
        .rebuild_failed
        .remove(&ResourceLabels::new(namespace, &name));
    ctx.metrics.succeeded(&LABELS, now);
    Ok(Action::await_change())
}

/// Stops running rebuilds, then removes the catalog entry (with
/// `reclaimPolicy: Delete`, and every version's table); returns the tables
/// dropped, or is blocked by why it cannot be done yet.
async fn remove(
    projection: &Projection,
    namespace: &str,
    state: &State,
) -> Result<Vec<String>, Blocked<String>> {
    let ctx = &state.ctx;
    let name = projection.name_any();
    let drop_tables = projection.spec.reclaim_policy == ReclaimPolicy::Delete;
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
    let source = catalog_source(namespace, &name);
    match catalog::remove(&pool, &name, Some(&source), drop_tables).await {
        Ok(removed) => Ok(removed.dropped),
        // Never declared (a spec the catalog refused) or removed already:
        // nothing here is this resource's to drop.
        Err(CatalogError::NotFound(_)) => Ok(Vec::new()),
        // Declared from elsewhere: it is not this resource's to remove.
        Err(CatalogError::Owned { .. }) => Ok(Vec::new()),
        Err(err) => Err(Blocked::By(format!(
            "removing the catalog entry failed: {err}"
        ))),
    }
}
