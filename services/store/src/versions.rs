//! The projection version registry (`projection_versions`): which version
//! of each projection is active, which is being built, which are kept for
//! swapping back, and the spec each was built from. The live projector
//! follows the active version; rebuilds add versions; the operator reads it
//! for status.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use eventplane_api::{ProjectionSpec, VersionState, quote_ident};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, PgPool};

use crate::checkpoints::{self, version_checkpoint};
use crate::projection::{Projection, version_table};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct VersionRow {
    pub projection: String,
    pub version: i32,
    pub table_name: String,
    pub spec: Value,
    #[sqlx(try_from = "String")]
    pub state: VersionState,
    pub events_done: i64,
    pub events_total: i64,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl VersionRow {
    /// The spec this version was built from.
    pub fn spec(&self) -> sqlx::Result<ProjectionSpec> {
        decode_spec(self.spec.clone())
    }
}

/// A stored spec that no longer parses is a decode error like any other
/// unreadable column.
fn decode_spec(spec: Value) -> sqlx::Result<ProjectionSpec> {
    serde_json::from_value(spec).map_err(|e| sqlx::Error::Decode(e.into()))
}

/// What `ensure` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Ensured {
    /// The first version was created (or an unversioned table adopted).
    Created,
    /// The active version is the one the spec asks for.
    Current,
    /// The spec asks for another version than the active one.
    NeedsRebuild { active: u32, wanted: u32 },
}

const COLUMNS: &str = "projection, version, table_name, spec, state, events_done, events_total, created_at, activated_at, retired_at";

pub async fn list(pool: &PgPool, name: &str) -> sqlx::Result<Vec<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 ORDER BY version"
    )))
    .bind(name)
    .fetch_all(pool)
    .await
}

pub async fn get(
    conn: &mut PgConnection,
    name: &str,
    version: u32,
) -> sqlx::Result<Option<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 AND version = $2"
    )))
    .bind(name)
    .bind(version as i32)
    .fetch_optional(conn)
    .await
}

pub async fn active(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<VersionRow>> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM projection_versions WHERE projection = $1 AND state = 'active'"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// The spec of the active version, if another version than `version` is
/// active (a swap happened).
pub async fn active_other_than(
    conn: &mut PgConnection,
    name: &str,
    version: u32,
) -> sqlx::Result<Option<ProjectionSpec>> {
    let spec: Option<Value> = sqlx::query_scalar(
        "SELECT spec FROM projection_versions \
         WHERE projection = $1 AND state = 'active' AND version <> $2",
    )
    .bind(name)
    .bind(version as i32)
    .fetch_optional(conn)
    .await?;
    spec.map(decode_spec).transpose()
}

/// Registers `build` as a version being built, with the events it has to
/// replay.
pub async fn register_build(
    conn: &mut PgConnection,
    build: &Projection,
    events_total: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_versions (projection, version, table_name, spec, state, events_total) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&build.name)
    .bind(build.spec.version as i32)
    .bind(&build.table)
    .bind(sqlx::types::Json(&build.spec))
    .bind(VersionState::Building.as_str())
    .bind(events_total)
    .execute(conn)
    .await?;
    Ok(())
}

/// Counts `events` more replayed into a version being built.
pub async fn add_progress(
    conn: impl PgExecutor<'_>,
    name: &str,
    version: u32,
    events: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_versions SET events_done = events_done + $3 WHERE projection = $1 AND version = $2",
    )
    .bind(name)
    .bind(version as i32)
    .bind(events)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets a version without touching its table.
pub async fn forget(conn: &mut PgConnection, name: &str, version: u32) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_versions WHERE projection = $1 AND version = $2")
        .bind(name)
        .bind(version as i32)
        .execute(conn)
        .await?;
    Ok(())
}

/// The registry side of a swap, inside the swap's transaction: `old` (if
/// any) is retained from now on, `new` is active and counted as fully
/// loaded.
pub async fn swap(
    conn: &mut PgConnection,
    name: &str,
    old: Option<u32>,
    new: u32,
) -> sqlx::Result<()> {
    if let Some(old) = old {
        sqlx::query(
            "UPDATE projection_versions SET state = $3, retired_at = now() WHERE projection = $1 AND version = $2",
        )
        .bind(name)
        .bind(old as i32)
        .bind(VersionState::Retained.as_str())
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE projection_versions SET state = $3, activated_at = now(), retired_at = NULL, \
             events_done = GREATEST(events_done, events_total) \
         WHERE projection = $1 AND version = $2",
    )
    .bind(name)
    .bind(new as i32)
    .bind(VersionState::Active.as_str())
    .execute(&mut *conn)
    .await?;
    // Readers must learn that another version (with its own columns and
    // queries) serves now.
    crate::catalog::bump(conn).await?;
    Ok(())
}

/// Points the stable name at `table`: readers see the old view or the new
/// one, never neither (both statements commit together).
pub async fn point_view(conn: &mut PgConnection, base: &str, table: &str) -> sqlx::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP VIEW IF EXISTS {}",
        quote_ident(base)
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE VIEW {} AS SELECT * FROM {}",
        quote_ident(base),
        quote_ident(table)
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The kind (`r` table, `v` view, ...) of a relation in the current schema.
pub(crate) async fn relkind(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relname = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Makes sure the projection has an active version, its table, indexes and
/// view, and a checkpoint; returns what it found and the runtime of the
/// active version (whose spec may differ from `projection`'s if a rebuild
/// is due).
pub async fn ensure(
    pool: &PgPool,
    projection: &Projection,
) -> sqlx::Result<(Ensured, Arc<Projection>)> {
    let mut tx = pool.begin().await?;
    let ensured = ensure_in(&mut tx, projection).await?;
    tx.commit().await?;
    Ok(ensured)
}

/// [`ensure`] inside the caller's transaction (the catalog applies a spec
/// and sets up its tables in one).
pub async fn ensure_in(
    tx: &mut PgConnection,
    projection: &Projection,
) -> sqlx::Result<(Ensured, Arc<Projection>)> {
    // Concurrent set-ups of one projection (several replicas starting
    // together) take turns.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7341))")
        .bind(&projection.name)
        .execute(&mut *tx)
        .await?;
    let spec = &projection.spec;
    let base = &spec.table;
    let ensured = match active(&mut *tx, &projection.name).await? {
        None => {
            let table = version_table(base, spec.version);
            if relkind(&mut *tx, base).await?.as_deref() == Some("r") {
                // A table from before versioning: it becomes this version.
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE {} RENAME TO {}",
                    quote_ident(base),
                    quote_ident(&table)
                )))
                .execute(&mut *tx)
                .await?;
            }
            for statement in eventplane_plan::create_table_sql(spec, &table) {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            point_view(&mut *tx, base, &table).await?;
            sqlx::query(
                "INSERT INTO projection_versions (projection, version, table_name, spec, state, activated_at) \
                 VALUES ($1, $2, $3, $4, $5, now())",
            )
            .bind(&projection.name)
            .bind(spec.version as i32)
            .bind(&table)
            .bind(sqlx::types::Json(spec))
            .bind(VersionState::Active.as_str())
            .execute(&mut *tx)
            .await?;
            Ensured::Created
        }
        Some(row) if row.version as u32 == spec.version => {
            let stored = row.spec()?;
            if stored.columns != spec.columns || stored.key_names() != spec.key_names() {
                tracing::warn!(
                    projection = %projection.name,
                    "columns changed without a version bump; increase spec.version to rebuild"
                );
            } else {
                // Handlers, indexes and queries may change in place; new
                // indexes are created, the handlers apply from now on.
                for statement in eventplane_plan::index_sql(spec, &row.table_name) {
                    sqlx::query(AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE projection_versions SET spec = $3 WHERE projection = $1 AND version = $2")
                    .bind(&projection.name)
                    .bind(row.version)
                    .bind(sqlx::types::Json(spec))
                    .execute(&mut *tx)
                    .await?;
            }
            if relkind(&mut *tx, base).await?.is_none() {
                point_view(&mut *tx, base, &row.table_name).await?;
            }
            Ensured::Current
        }
        Some(row) => Ensured::NeedsRebuild {
            active: row.version as u32,
            wanted: spec.version,
        },
    };
    checkpoints::create(&mut *tx, &projection.name).await?;
    let row = active(&mut *tx, &projection.name)
        .await?
        .expect("an active version exists now");
    let runtime = if row.version as u32 == spec.version {
        Projection::live(projection.name.clone(), spec.clone())
    } else {
        Projection::live(projection.name.clone(), row.spec()?)
    };
    Ok((ensured, Arc::new(runtime)))
}

/// Drops the retained versions retired before `cutoff`; returns their tables.
pub async fn drop_expired(
    pool: &PgPool,
    name: &str,
    cutoff: DateTime<Utc>,
) -> sqlx::Result<Vec<String>> {
    let expired: Vec<(i32, String)> = sqlx::query_as(
        "SELECT version, table_name FROM projection_versions \
         WHERE projection = $1 AND state = $3 AND retired_at < $2",
    )
    .bind(name)
    .bind(cutoff)
    .bind(VersionState::Retained.as_str())
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for (version, table) in expired {
        let mut tx = pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(&table)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM projection_versions WHERE projection = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        checkpoints::delete(&mut tx, &version_checkpoint(name, version as u32)).await?;
        tx.commit().await?;
        dropped.push(table);
    }
    Ok(dropped)
}

/// Drops every trace of a projection: its view, every version's table, its
/// checkpoints, versions and dead letters (`reclaimPolicy: Delete`).
pub async fn drop_all(pool: &PgPool, name: &str, base: &str) -> sqlx::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let tables = drop_all_in(&mut tx, name, base).await?;
    tx.commit().await?;
    Ok(tables)
}

/// [`drop_all`] inside the caller's transaction.
pub async fn drop_all_in(
    tx: &mut PgConnection,
    name: &str,
    base: &str,
) -> sqlx::Result<Vec<String>> {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT table_name FROM projection_versions WHERE projection = $1")
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
    // The stable name is this projection's only if it has versions: a
    // view of that name without them belongs to something else.
    if !tables.is_empty() && relkind(&mut *tx, base).await?.as_deref() == Some("v") {
        sqlx::query(AssertSqlSafe(format!("DROP VIEW {}", quote_ident(base))))
            .execute(&mut *tx)
            .await?;
    }
    for table in &tables {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(table)
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM projection_versions WHERE projection = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    checkpoints::delete_projection(&mut *tx, name).await?;
    crate::kafka_offsets::delete_projection(&mut *tx, name).await?;
    Ok(tables)
}
